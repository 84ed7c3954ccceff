'use strict';
// A worker for the tests: an http.Server on upgrader-drain, configured by
// environment. It tells the test what it sees over the IPC channel as
// {test: ...} messages, which upgrader would log and ignore.
const http = require('http');
const upgrader = require('..');

const pid = String(process.pid);
const tell = (m) => { if (process.send) process.send({ test: m.test, ...m }); };
let release = null;
let held = null;
// Registered before serve(): the module's explicit unref of the channel
// then also covers this listener, so it never keeps the worker alive.
process.on('message', (m) => {
  // A round trip through this worker's event loop: the ping is handled in
  // the turn that also reads what came to its sockets before it (were they
  // reading), so a message sent once 'pong' is back comes after that read.
  if (m && m.test === 'ping') tell({ test: 'pong', n: m.n });
  if (m && m.test === 'release' && held) {
    const r = held;
    held = null;
    r();
  }
});

const fs = require('fs');
const https = require('https');
const tlsOpts = process.env.TEST_TLS_DIR
  ? { key: fs.readFileSync(`${process.env.TEST_TLS_DIR}/key.pem`), cert: fs.readFileSync(`${process.env.TEST_TLS_DIR}/cert.pem`) }
  : null;
const handler = (req, res) => {
  const body = `hello from ${pid} ${req.url}\n`;
  const reply = () => {
    res.writeHead(200, { 'Content-Length': Buffer.byteLength(body), 'X-Pid': pid });
    res.end(body);
  };
  tell({ test: 'request', url: req.url });
  if (req.url === '/held') {
    // Answered only on the test's {test: 'release'}: a request in flight
    // for as long as the test needs one, whatever the drain does.
    held = reply;
    return;
  }
  if (req.url.startsWith('/block?ms=')) {
    // Once its body has come (read in the poll phase, from the socket),
    // the event loop is blocked, as by a synchronous handler, for ms,
    // after telling the test.
    req.resume();
    req.on('end', () => {
      tell({ test: 'blocking' });
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, Number(req.url.slice('/block?ms='.length)));
      reply();
    });
    return;
  }
  if (req.url === '/slow') {
    // Answered only once the drain has begun: the response in flight.
    release = reply;
    return;
  }
  reply();
  if (req.url === '/throw') setImmediate(() => { throw new Error('boom from /throw'); });
};
const server = tlsOpts ? https.createServer(tlsOpts, handler) : http.createServer(handler);
// Code that listens for 'data' on a connection (byte counting, say):
// Node then feeds the request parser from the stream, not the handle.
if (process.env.TEST_DATA_LISTENER) server.on('connection', (s) => s.on('data', () => {}));
// Behind a balancer keep-alive often outlasts a minute; Node's 5 s would
// close an idle connection during a test's longer wait.
if (process.env.TEST_KEEPALIVE_TIMEOUT) server.keepAliveTimeout = Number(process.env.TEST_KEEPALIVE_TIMEOUT);

upgrader.on('drain', () => {
  tell({ test: 'drain' });
  if (release) setImmediate(release);
});

const fds = process.env.TEST_FDS ? upgrader.listenFds() : null;
if (fds) tell({ test: 'fds', fds, env: ['LISTEN_FDS', 'LISTEN_FDNAMES', 'LISTEN_PID'].filter((k) => k in process.env) });

upgrader.serve(server, {
  name: process.env.TEST_NAME || undefined,
  port: 0,
  host: '127.0.0.1',
  idleGrace: Number(process.env.TEST_IDLE_GRACE || 1000),
  drainTimeout: Number(process.env.TEST_DRAIN_TIMEOUT || 30000),
  readyFd: process.env.TEST_READY_FD ? Number(process.env.TEST_READY_FD) : undefined,
});
server.on('listening', () => {
  tell({ test: 'listening', port: server.address().port });
  if (process.env.TEST_STATUS) upgrader.status(process.env.TEST_STATUS);
});
