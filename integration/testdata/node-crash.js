// A worker on upgrader-drain (nodejs/) for TestNodeModuleUncaughtException-
// UnderLoad: like examples/node/server.js, plus GET /slow, answered after
// 300 ms, and POST /crash, which throws from the request handler after its
// response, an uncaught exception.
'use strict';
const http = require('http');
const path = require('path');
const upgrader = require(path.join(__dirname, '../../nodejs'));

const pid = String(process.pid);
const gen = process.env.UPGRADER_GENERATION || '0';

// Whether upgrader also sends the drain signal to a worker that sent
// "stopping" is what the test checks: the module's own SIGTERM handler
// stays, this one only says it came.
process.on('SIGTERM', () => process.stderr.write(`node-crash: pid ${pid} got SIGTERM\n`));

function answer(res, code, body) {
  res.writeHead(code, {
    'Content-Type': 'text/plain',
    'Content-Length': Buffer.byteLength(body),
    'X-Pid': pid,
    'X-Generation': gen,
  });
  res.end(body);
}

const server = http.createServer((req, res) => {
  req.resume();
  req.on('end', () => {
    if (req.method === 'POST' && req.url === '/crash') {
      answer(res, 200, `crashing pid ${pid}\n`);
      throw new Error(`crash asked for by POST /crash (pid ${pid})`);
    }
    if (req.url === '/slow') {
      setTimeout(() => answer(res, 200, `slow from pid ${pid}\n`), 300);
      return;
    }
    answer(res, 200, `hello from node pid ${pid} generation ${gen}\n`);
  });
});

upgrader.serve(server);
