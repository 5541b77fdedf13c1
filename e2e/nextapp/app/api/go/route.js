import { NextResponse } from 'next/server';

// The way Next.js apps redirect: an absolute URL built from req.url, which carries
// Next's own hostname (http://localhost:<port>), not the one the browser used.
export async function GET(request) {
  return NextResponse.redirect(new URL('/dashboard?from=go', request.url));
}
