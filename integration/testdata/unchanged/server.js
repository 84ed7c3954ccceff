// A plain Node.js http.Server on the listener upgrader passes as fd 3,
// closed on SIGTERM: the shape a new user brings, with no upgrader module
// (docs/unchanged-servers.md).
'use strict';
const http = require('http');

const server = http.createServer((req, res) => {
  req.resume();
  req.on('end', () => res.end('hello\n'));
});
server.listen({ fd: 3 });
process.on('SIGTERM', () => server.close());
