import { counts } from '../../../lib/counts';

export const dynamic = 'force-dynamic';

export async function GET() {
  return Response.json(counts());
}

export async function DELETE() {
  globalThis.__edgeCounts = undefined;
  return Response.json({ ok: true });
}
