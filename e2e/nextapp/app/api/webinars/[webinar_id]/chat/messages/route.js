import { seen } from '../../../../../../lib/counts';

export async function GET(request, { params }) {
  const { webinar_id } = await params;
  seen('chat_poll', request);
  return Response.json({ webinar_id, messages: [] });
}
