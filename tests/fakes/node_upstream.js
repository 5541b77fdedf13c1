// A plain Node `http` upstream for the proxy tests: Node's own keep-alive behaviour
// (it closes an idle socket keepAliveTimeout + 1 s after the last answer, and says
// `Keep-Alive: timeout=N`), redirects built the way Next.js builds them, and a route
// that drops a request arriving on a reused socket without answering, which is what a
// request written into a socket the server is closing sees.
//
//   node node_upstream.js <keepAliveTimeoutMs>     prints the port on stdout
//
// GET  /_count                   {"handled": n, "sockets": n}
// POST /echo                     {"n": <handled>, "bytes": <body length>}
// POST /drop-reused              as /echo on a socket's first request; later requests on
//                                the same socket are dropped (socket destroyed, no answer)
// POST /drop-always              every request dropped
// GET  /redirect?to=/p           307 to http://localhost:<port>/p (Next.js style)
// GET  /refresh                  200 with `Refresh: 0; url=http://localhost:<port>/r`
'use strict';
const http = require('http');

const keepAliveMs = Number(process.argv[2] || 5000);
let handled = 0;
let sockets = 0;

const server = http.createServer((req, res) => {
  const sock = req.socket;
  sock.requests = (sock.requests || 0) + 1;
  const url = new URL(req.url, `http://localhost:${server.address().port}`);
  if (url.pathname === '/drop-always' || (url.pathname === '/drop-reused' && sock.requests > 1)) {
    sock.destroy();
    return;
  }
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    const body = Buffer.concat(chunks);
    if (url.pathname === '/_count') {
      res.setHeader('content-type', 'application/json');
      res.end(JSON.stringify({ handled, sockets }));
      return;
    }
    handled += 1;
    if (url.pathname === '/redirect') {
      const to = new URL(url.searchParams.get('to') || '/', url);
      res.writeHead(307, { Location: to.toString() });
      res.end();
      return;
    }
    if (url.pathname === '/refresh') {
      res.writeHead(200, { Refresh: `0; url=${new URL('/r', url)}`, 'content-type': 'text/plain' });
      res.end('refresh');
      return;
    }
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify({ n: handled, bytes: body.length }));
  });
});
server.on('connection', () => { sockets += 1; });
server.keepAliveTimeout = keepAliveMs;
server.listen(0, '127.0.0.1', () => {
  process.stdout.write(`${server.address().port}\n`);
});
process.on('SIGTERM', () => process.exit(0));
