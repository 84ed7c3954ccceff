#!/usr/bin/env node
// Example upgrader worker in Node.js.
//
// Node has no datagram Unix sockets, so it cannot speak sd_notify: it uses
// upgrader's s6-style readiness instead, writing a newline to the fd given as
// --ready fd:N (passed to this script as READY_FD, default 4). It serves the
// listener at fd 3 (LISTEN_FDS) with server.listen({fd: 3}).
//
//   upgrader -l 127.0.0.1:8080 --ready fd:4 -- node examples/node/server.js
//
// On SIGTERM it drains: stops accepting, answers each further request with
// "Connection: close", and exits once every connection is closed.
'use strict';
const fs = require('fs');
const http = require('http');
const net = require('net');

const pid = String(process.pid);
const gen = process.env.UPGRADER_GENERATION || '0';
const readyFd = Number(process.env.READY_FD || 4);
const inherited = process.env.LISTEN_PID === pid && Number(process.env.LISTEN_FDS) >= 1;
let draining = false;

const server = http.createServer((req, res) => {
  req.resume();
  req.on('end', () => {
    const body = `hello from node pid ${pid} generation ${gen}\n`;
    const headers = {
      'Content-Type': 'text/plain',
      'Content-Length': Buffer.byteLength(body),
      'X-Pid': pid,
      'X-Generation': gen,
    };
    if (draining) headers.Connection = 'close';
    res.writeHead(200, headers);
    res.end(body);
  });
});

const sockets = new Set();
server.on('connection', (s) => {
  sockets.add(s);
  s.on('close', () => sockets.delete(s));
});

server.listen(inherited ? { fd: 3 } : { host: '127.0.0.1', port: 8080 }, () => {
  if (inherited) {
    try {
      fs.writeSync(readyFd, '\n');
      fs.closeSync(readyFd);
    } catch (e) {
      console.error(`node worker: cannot signal readiness on fd ${readyFd}: ${e.message}`);
    }
  }
});

process.on('SIGTERM', () => {
  draining = true;
  // net.Server's close stops accepting and waits for open connections;
  // http.Server's own close() would also drop idle keep-alive connections
  // at once, racing a client that is sending its next request.
  net.Server.prototype.close.call(server, () => process.exit(0));
  // An idle keep-alive connection that never sends again: close at deadline.
  setTimeout(() => {
    for (const s of sockets) s.destroy();
  }, 25000).unref();
});
