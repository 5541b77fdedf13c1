export default function Dashboard() {
  return <main>dashboard</main>;
}
