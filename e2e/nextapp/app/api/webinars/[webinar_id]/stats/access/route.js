import { counts, seen } from '../../../../../../lib/counts';

// Admins decide from the identity the gateway verified (X-Edge-User-Id), as the real app
// does from its session. Next.js adds its own `Vary: rsc, next-router-state-tree, ...`.
const ADMINS = new Set((process.env.E2E_ADMINS || 'admin-1,admin-2,admin-3').split(','));

export async function GET(request, { params }) {
  const { webinar_id } = await params;
  seen('admin_stats', request);
  const user = request.headers.get('x-edge-user-id');
  if (!user || !ADMINS.has(user)) {
    return Response.json({ error: 'forbidden' }, { status: 403 });
  }
  // Slow enough that concurrent polls overlap, like the real aggregate query.
  await new Promise((r) => setTimeout(r, 150));
  const c = counts();
  return Response.json({ webinar_id, viewers: 42, fills: c.calls.admin_stats });
}
