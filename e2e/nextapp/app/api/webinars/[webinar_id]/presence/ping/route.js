import { seen } from '../../../../../../lib/counts';

export async function POST(request, { params }) {
  const { webinar_id } = await params;
  seen('presence_ping', request);
  return Response.json({ ok: true, webinar_id });
}
