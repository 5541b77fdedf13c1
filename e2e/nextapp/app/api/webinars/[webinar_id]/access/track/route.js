import { seen } from '../../../../../../lib/counts';

export async function POST(request, { params }) {
  const { webinar_id } = await params;
  const body = await request.text();
  seen('access_track', request);
  return Response.json({ ok: true, webinar_id, bytes: body.length });
}
