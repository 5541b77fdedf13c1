// Server-sent events, one every 200 ms: the gateway must pass each on as it comes.
export const dynamic = 'force-dynamic';

export async function GET() {
  const encoder = new TextEncoder();
  let i = 0;
  const stream = new ReadableStream({
    async pull(controller) {
      if (i >= 5) {
        controller.close();
        return;
      }
      if (i > 0) await new Promise((r) => setTimeout(r, 200));
      controller.enqueue(encoder.encode(`data: ${i}\n\n`));
      i += 1;
    },
  });
  return new Response(stream, {
    headers: { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' },
  });
}
