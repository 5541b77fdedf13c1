export default function Home() {
  return <main>EventLive e2e app</main>;
}
