'use strict';
// The fake upgrader: spawns workers with a real Node IPC channel and
// listeners at fd 3…, and plays upgrader's end of the channel.
const { spawn } = require('child_process');
const net = require('net');
const path = require('path');
const { once, EventEmitter } = require('events');

const WORKER = path.join(__dirname, 'worker.js');

function listen() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => resolve(s));
  });
}

// A listening socket the test holds but does not serve: bound by a
// net.Server, its fd given to the worker, and closed here before the event
// loop could accept on it.
// One after-hook per test stops all of its workers, and fails the test only
// once every one is stopped: node:test runs no later after-hook once one
// throws, so a hook per worker that threw would leave the others running
// and hang the whole run.
const workersOf = new WeakMap();

function track(t, w) {
  let ws = workersOf.get(t);
  if (!ws) {
    ws = new Set();
    workersOf.set(t, ws);
    t.after(async () => {
      const left = [...ws].filter((x) => x.running());
      for (const x of left) process.kill(x.pid, 'SIGKILL');
      await Promise.all(left.map((x) => x.exited));
      if (left.length > 0) {
        const what = left.map((x) => `worker ${x.pid} was left running; messages ${JSON.stringify(x.messages)}; stderr ${JSON.stringify(x.stderr)}`);
        throw new Error(what.join('\n'));
      }
    });
  }
  ws.add(w);
}

// stopReading stops the reads from a socket's fd, as http.Server's own
// onSocketPause does; startReading starts them again. Both act on the
// handle: a net.Socket's pause() and resume() only gate what was read.
function stopReading(sock) {
  sock.pause();
  const h = sock._handle;
  if (h && h.reading) {
    h.reading = false;
    h.readStop();
  }
}

function startReading(sock) {
  const h = sock._handle;
  if (h && !h.reading) {
    h.reading = true;
    h.readStart();
  }
  sock.resume();
}

class Worker extends EventEmitter {
  constructor(t, { listeners = [], env = {}, ipc = true, extraPipe = false } = {}) {
    super();
    const stdio = ['ignore', 'pipe', 'pipe', ...listeners.map((l) => l._handle.fd)];
    if (extraPipe) stdio.push('pipe');
    if (ipc) stdio.push('ipc');
    const e = { ...process.env, ...env };
    delete e.NODE_CHANNEL_FD;
    if (listeners.length > 0) {
      e.LISTEN_FDS = String(listeners.length);
      e.LISTEN_FDNAMES = env.LISTEN_FDNAMES || listeners.map((_, i) => `l${i}`).join(':');
    }
    // sh's $$ is the pid node runs as after exec: LISTEN_PID is the worker's own.
    const script = listeners.length > 0 && !env.LISTEN_PID ? 'LISTEN_PID=$$ exec "$0" "$@"' : 'exec "$0" "$@"';
    this.proc = spawn('sh', ['-c', script, process.execPath, WORKER], { stdio, env: e });
    for (const l of listeners) l.close();
    this.pid = this.proc.pid;
    this.messages = [];
    this.stderr = '';
    this.proc.stderr.on('data', (d) => { this.stderr += d; });
    this.proc.stdout.resume();
    this.exited = once(this.proc, 'exit').then(([code, signal]) => ({ code, signal }));
    this.proc.on('message', (m, handle) => {
      this.messages.push(m);
      // upgrader only relays a handed-off fd; the test, playing it, must
      // not read from it either. Node's child_process wraps a received fd
      // in a net.Socket that reads at once, and pause() only stops the flow
      // of what was read: a request the test's client sent meanwhile would
      // be read here, and dropped when the handle is passed on (keepOpen
      // false: read into a no-op until the receiver's NODE_HANDLE_ACK).
      if (handle) stopReading(handle);
      this.emit('msg', m, handle);
    });
    track(t, this);
  }

  running() {
    return this.proc.exitCode === null && this.proc.signalCode === null;
  }

  // waitMsg resolves with the first message (past or future) matching pred.
  waitMsg(pred) {
    const i = this.messages.findIndex((m) => pred(m));
    if (i >= 0) return Promise.resolve({ m: this.messages[i], handle: null, index: i });
    return new Promise((resolve) => {
      const on = (m, handle) => {
        if (!pred(m)) return;
        this.off('msg', on);
        resolve({ m, handle, index: this.messages.length - 1 });
      };
      this.on('msg', on);
    });
  }

  ready() {
    return this.waitMsg((m) => m.upgrader === 'ready');
  }

  send(m, handle) {
    return new Promise((resolve, reject) => {
      this.proc.send(m, handle, (err) => (err ? reject(err) : resolve()));
    });
  }
}

// A client connection that reads HTTP/1.1 responses with Content-Length.
class Client {
  constructor(port, { tls: useTls = false } = {}) {
    this.sock = useTls
      ? require('tls').connect({ port, host: '127.0.0.1', rejectUnauthorized: false })
      : net.connect(port, '127.0.0.1');
    this.buf = Buffer.alloc(0);
    this.ended = false;
    this.waiters = [];
    this.sock.on('data', (d) => { this.buf = Buffer.concat([this.buf, d]); this.wake(); });
    this.sock.on('end', () => { this.ended = true; this.wake(); });
    this.sock.on('error', (err) => { this.error = err; this.ended = true; this.wake(); });
    this.closed = once(this.sock, 'close');
  }

  connected() {
    return once(this.sock, this.sock.encrypted ? 'secureConnect' : 'connect');
  }

  wake() {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  async get(url) {
    this.sock.write(`GET ${url} HTTP/1.1\r\nHost: test\r\n\r\n`);
    return this.response();
  }

  async response() {
    for (;;) {
      const end = this.buf.indexOf('\r\n\r\n');
      if (end >= 0) {
        const lines = this.buf.subarray(0, end).toString().split('\r\n');
        const headers = {};
        for (const l of lines.slice(1)) {
          const c = l.indexOf(':');
          headers[l.slice(0, c).trim().toLowerCase()] = l.slice(c + 1).trim();
        }
        const len = Number(headers['content-length'] || 0);
        if (this.buf.length >= end + 4 + len) {
          const body = this.buf.subarray(end + 4, end + 4 + len).toString();
          this.buf = this.buf.subarray(end + 4 + len);
          return { status: Number(lines[0].split(' ')[1]), headers, body };
        }
      }
      if (this.ended) throw new Error(`connection ended before a full response (${this.error ? this.error.message : 'EOF'}), had ${JSON.stringify(this.buf.toString())}`);
      await new Promise((r) => this.waiters.push(r));
    }
  }

  // eof resolves once the server has closed the connection, with what came
  // after the last response.
  async eof() {
    while (!this.ended) await new Promise((r) => this.waiters.push(r));
    return this.buf.toString();
  }

  destroy() {
    this.sock.destroy();
  }
}

module.exports = { listen, Worker, Client, startReading };
