// What the app saw, shared by every route handler of the process (route bundles are
// separate modules, so the state lives on globalThis). Read and reset through
// GET/DELETE /api/test-counts.
export function counts() {
  if (!globalThis.__edgeCounts) {
    globalThis.__edgeCounts = { calls: {}, byUser: {}, identity: [] };
  }
  return globalThis.__edgeCounts;
}

export function seen(route, request) {
  const c = counts();
  c.calls[route] = (c.calls[route] || 0) + 1;
  const user = request.headers.get('x-edge-user-id') || '-';
  const key = `${route}:${user}`;
  c.byUser[key] = (c.byUser[key] || 0) + 1;
  c.identity.push({
    route,
    user: request.headers.get('x-edge-user-id'),
    role: request.headers.get('x-edge-user-role'),
    session: request.headers.get('x-edge-session-id'),
  });
  if (c.identity.length > 200) c.identity.shift();
}
