#!/usr/bin/env node
// Example upgrader worker in Node.js, on the upgrader-drain module
// (nodejs/): it serves the inherited listener, says when it is ready and
// drains right on SIGTERM.
//
//   upgrader --ipc node -l 127.0.0.1:8080 -- node examples/node/server.js
//
// Without --ipc node there is no IPC channel: it says ready by a newline
// on fd 4 instead (READY_FD), for
//
//   upgrader -l 127.0.0.1:8080 --ready fd:4 -- node examples/node/server.js
'use strict';
const http = require('http');
const upgrader = require('../../nodejs');

const pid = String(process.pid);
const gen = process.env.UPGRADER_GENERATION || '0';

const server = http.createServer((req, res) => {
  req.resume();
  req.on('end', () => {
    const body = `hello from node pid ${pid} generation ${gen}\n`;
    res.writeHead(200, {
      'Content-Type': 'text/plain',
      'Content-Length': Buffer.byteLength(body),
      'X-Pid': pid,
      'X-Generation': gen,
    });
    res.end(body);
  });
});

upgrader.serve(server, {
  port: 8080,
  host: '127.0.0.1',
  // Only under upgrader: run on its own, fd 4 is nothing.
  readyFd: process.env.UPGRADER_GENERATION ? Number(process.env.READY_FD || 4) : undefined,
});
