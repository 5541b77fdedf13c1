import { seen } from '../../../lib/counts';

// A POST that always reaches the app (the default route): the keep-alive sweep.
export async function POST(request) {
  const body = await request.text();
  seen('echo', request);
  return Response.json({ bytes: body.length });
}
