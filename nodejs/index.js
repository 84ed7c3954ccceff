'use strict';
// upgrader-drain: run a Node.js http/https server under upgrader and drain it
// right, over upgrader's Node IPC channel (docs/reference/node-ipc.md).

const fs = require('fs');
const net = require('net');
const tls = require('tls');
const { EventEmitter } = require('events');

// The contract's wait for an answer to a handoff, from when its message has
// been written; the Go library's inherit.SendTimeout is the same.
const HANDOFF_TIMEOUT = 5000;
// Handoffs given to process.send and not yet answered. Node writes one
// handle at a time and waits for each NODE_HANDLE_ACK, queueing the rest in
// the process: past a few, a connection only waits there, paused and unable
// to serve a request that comes meanwhile, and its answer's clock would run
// while it has not even been written. The others wait here, still served.
const MAX_HANDING = 32;

const config = {
  drainTimeout: 30000,
  idleGrace: 1000,
  exitOnUncaught: true,
  exit: true,
  onDrain: null,
  readyFd: null,
  log: (msg) => process.stderr.write(`upgrader-drain: ${msg}\n`),
};

const entries = []; // one per served server
const conns = new Map(); // tracked connection -> its state
const rawTls = new Set(); // TCP sockets of TLS servers, until they close
const pending = new Map(); // handoff id -> {socket, st, timer, refusal}
const waiting = []; // idle sockets of a draining worker waiting for a handoff slot
let nextId = 1;
let draining = false;
let drainCode = 0;
let drainPromise = null;
let readySent = false;
let stoppingSent = false;
let hooksInstalled = false;
let watchdogStarted = false;
let finished = false;
let listenCache = null;
const emitter = new EventEmitter();

function channel() {
  return typeof process.send === 'function' && process.connected === true;
}

function send(msg, handle, options, cb) {
  if (!channel()) {
    if (cb) process.nextTick(cb, new Error('no IPC channel'));
    return false;
  }
  // A callback keeps a closed channel from becoming an 'error' event on
  // process, which would crash a server that never listens for it.
  const done = cb || (() => {});
  try {
    if (handle) process.send(msg, handle, options, done);
    else process.send(msg, done);
    return true;
  } catch (err) {
    process.nextTick(done, err);
    return false;
  }
}

// listenFds parses LISTEN_FDS/LISTEN_FDNAMES once, as sd_listen_fds(3) does
// with unset_environment: the variables are removed whatever they held, so a
// child process never takes them for its own.
function listenFds() {
  if (listenCache) return { ...listenCache };
  const env = process.env;
  const pid = env.LISTEN_PID;
  const n = env.LISTEN_FDS;
  const names = env.LISTEN_FDNAMES;
  delete env.LISTEN_PID;
  delete env.LISTEN_FDS;
  delete env.LISTEN_FDNAMES;
  const out = {};
  if (pid !== undefined && /^[0-9]+$/.test(pid) && Number(pid) === process.pid &&
      n !== undefined && /^[0-9]+$/.test(n)) {
    const list = names ? names.split(':') : [];
    for (let i = 0; i < Number(n); i++) {
      const name = list[i] || 'unknown';
      if (!(name in out)) out[name] = 3 + i;
    }
  }
  listenCache = out;
  return { ...out };
}

function acceptKinds() {
  const kinds = [];
  for (const e of entries) if (!e.tls && !kinds.includes(e.kind)) kinds.push(e.kind);
  return kinds;
}

function sendAccept() {
  const kinds = acceptKinds();
  if (kinds.length > 0) send({ upgrader: 'accept', kinds });
}

// ready tells upgrader this worker serves: over the IPC channel, or by a
// newline on the ready fd of `--ready fd:N` when there is no channel.
function ready() {
  if (readySent) return;
  readySent = true;
  if (channel()) {
    sendAccept();
    send({ upgrader: 'ready' });
  }
  // upgrader waits for the one its --ready mode names, so with
  // --ready fd:N the newline goes too, channel or not: to upgrader's ready
  // pipe (a FIFO), or to fd N when there is no channel. With a channel, fd
  // N that is not a pipe is a listener or a channel (no --ready fd:N),
  // where a newline would be a malformed message.
  const fd = config.readyFd;
  if (fd == null || String(fd) === process.env.UPGRADER_HANDOFF_FD) return;
  try {
    if (channel() && !fs.fstatSync(fd).isFIFO()) return;
    fs.writeSync(fd, '\n');
    fs.closeSync(fd);
  } catch (err) {
    if (err.code !== 'EBADF') config.log(`cannot signal readiness on fd ${fd}: ${err.message}`);
  }
}

function status(text) {
  return send({ upgrader: 'status', text: String(text) });
}

function stopping() {
  if (stoppingSent) return;
  stoppingSent = true;
  send({ upgrader: 'stopping' });
}

function startWatchdog() {
  if (watchdogStarted) return;
  watchdogStarted = true;
  const usec = Number(process.env.WATCHDOG_USEC);
  const wpid = process.env.WATCHDOG_PID;
  if (!(usec > 0) || (wpid !== undefined && wpid !== '' && Number(wpid) !== process.pid)) return;
  const every = Math.max(1, Math.floor(usec / 2000));
  setInterval(() => send({ upgrader: 'watchdog' }), every).unref();
}

function installHooks() {
  if (hooksInstalled) return;
  hooksInstalled = true;
  if (process.channel && typeof process.channel.unref === 'function') {
    // An explicit unref wins over the ref Node takes for 'message'
    // listeners: the channel never keeps this process alive.
    process.channel.unref();
  }
  process.on('message', onMessage);
  process.on('disconnect', () => {
    // A handoff whose message went out may be the taker's already
    // (upgrader gone before it relayed the ack): closed here as if
    // acknowledged, never served on, lest two processes read one
    // connection. Node calls a send back only a loop turn after the
    // write, maybe after this, so one not written yet cannot be told
    // apart: it is closed too, between two requests.
    for (const id of [...pending.keys()]) answer(id, true, 'channel closed');
  });
  process.on('SIGTERM', () => drain());
  // Installed only when wanted: any listener at all stops Node's own crash.
  if (config.exitOnUncaught) process.on('uncaughtException', (err) => {
    config.log(`uncaught exception: ${err && err.stack ? err.stack : err}`);
    stopping();
    drain(1);
  });
  startWatchdog();
}

function stateOf(socket) {
  return conns.get(socket);
}

function track(entry, socket, fromHandoff) {
  if (conns.has(socket)) return;
  const st = {
    entry,
    socket,
    inflight: 0,
    responses: new Set(),
    // bytesRead when the connection was last between requests; -1: never
    // (a handed-off connection with buffered bytes is a request under way).
    idleBytes: fromHandoff === 'buffered' ? -1 : socket.bytesRead,
    phase: 'live', // live | waiting | handing | kept
    timer: null,
  };
  conns.set(socket, st);
  socket.once('close', () => {
    clearTimeout(st.timer);
    conns.delete(socket);
    maybeFinish();
  });
  if (draining) setImmediate(considerIdle, socket);
}

function closeAfter(res) {
  if (res.headersSent) return;
  res.shouldKeepAlive = false;
  try {
    res.setHeader('Connection', 'close');
  } catch (_) { /* headers went out meanwhile */ }
}

function onRequest(req, res) {
  const st = stateOf(req.socket);
  if (!st) return;
  st.inflight++;
  st.responses.add(res);
  if (draining) closeAfter(res);
  let done = false;
  const end = () => {
    if (done) return;
    done = true;
    st.inflight--;
    st.responses.delete(res);
    if (st.inflight === 0) st.idleBytes = req.socket.bytesRead;
    // http's own 'finish' handler, which ends a Connection: close socket,
    // has run; the next turn sees the socket as it stays.
    if (draining) setImmediate(considerIdle, req.socket);
  };
  res.once('finish', end);
  res.once('close', end);
}

function quiet(socket, st) {
  return st.inflight === 0 && socket.bytesRead === st.idleBytes && socket.readableLength === 0;
}

// considerIdle hands an idle connection of a draining worker to the next
// generation, or keeps it for the idle grace when it cannot go.
function considerIdle(socket) {
  const st = stateOf(socket);
  if (!draining || !st || st.phase !== 'live') return;
  if (socket.destroyed || socket.writableEnded || !socket.readable) return;
  if (!quiet(socket, st)) return;
  if (st.entry.tls || !channel() || !socket._handle) {
    keep(socket, st);
  } else if (pending.size >= MAX_HANDING) {
    // Not paused: a request that comes while it waits is served (with
    // Connection: close), and the connection then ends as any other.
    st.phase = 'waiting';
    waiting.push(socket);
  } else {
    handOff(socket, st);
  }
}

// nextWaiting gives freed handoff slots to the connections waiting for one,
// each considered again as it is now.
function nextWaiting() {
  while (pending.size < MAX_HANDING && waiting.length > 0) {
    const socket = waiting.shift();
    const st = stateOf(socket);
    if (!st || st.phase !== 'waiting') continue;
    st.phase = 'live';
    considerIdle(socket);
    // Not quiet any more: it is served, and ends after its response.
  }
}

// stopReads stops the reads from a socket's fd at its handle, as
// http.Server's own 'pause' hook does. pause() alone stops only the flow of
// what was read, and Node takes that hook away once user code listens for
// 'data' on the socket: the next request would be read here, then lost to
// the taker when this copy is destroyed. startReads undoes it.
function stopReads(socket) {
  socket.pause();
  const h = socket._handle;
  if (h && h.reading) {
    h.reading = false;
    h.readStop();
  }
}

function startReads(socket) {
  const h = socket._handle;
  if (h && !h.reading && !socket.destroyed) {
    h.reading = true;
    h.readStart();
  }
  socket.resume();
}

function handOff(socket, st) {
  st.phase = 'handing';
  stopReads(socket); // nothing more is read from it from here on
  const id = nextId++;
  const p = { socket, st, timer: null, refusal: null };
  pending.set(id, p);
  send({ upgrader: 'handoff', id, kind: st.entry.kind, state: '', buffered: '' },
    socket, { keepOpen: true }, (err) => {
      if (err) answer(id, false, err.message);
      // Written now (Node calls back once the message has gone, after the
      // ones queued before it): the answer's clock starts. When it runs
      // out, the refusal waits for the poll phase (setImmediate): after
      // the event loop was blocked past it (a synchronous handler), the
      // timers phase comes first, and an ack that reached the channel
      // meanwhile, read only in the poll phase, would find the
      // connection kept, and two processes serving it.
      else if (pending.has(id)) {
        p.timer = setTimeout(() => { p.refusal = setImmediate(answer, id, false, 'no answer'); }, HANDOFF_TIMEOUT);
      }
    });
}

function answer(id, ok, reason) {
  const p = pending.get(id);
  if (!p) return;
  pending.delete(id);
  clearTimeout(p.timer);
  clearImmediate(p.refusal);
  if (ok) {
    // The taker holds its own fd: destroy closes only ours. end() would
    // send a FIN and close the connection for the taker too.
    p.socket.destroy();
  } else {
    if (reason && config.debug) config.log(`handoff ${id} refused: ${reason}`);
    startReads(p.socket);
    keep(p.socket, p.st);
  }
  nextWaiting();
  maybeFinish();
}

// keep leaves a connection that cannot go open for the idle grace: a request
// that arrives meanwhile is served (with Connection: close); a quiet one is
// closed after it.
function keep(socket, st) {
  st.phase = 'kept';
  clearTimeout(st.timer);
  st.timer = setTimeout(() => {
    if (socket.destroyed) return;
    if (quiet(socket, st)) socket.end();
  }, config.idleGrace);
}

function onMessage(m, socket) {
  if (!m || typeof m !== 'object' || typeof m.upgrader !== 'string') return;
  switch (m.upgrader) {
    case 'ack':
      answer(m.id, true);
      break;
    case 'nak':
      answer(m.id, false, m.reason);
      break;
    case 'handoff':
      take(m, socket);
      break;
    default:
  }
}

// take serves a connection handed over by a worker of an older generation.
function take(m, socket) {
  if (!socket) return;
  const kind = typeof m.kind === 'string' ? m.kind : 'http';
  const entry = entries.find((e) => !e.tls && e.kind === kind);
  if (!entry) {
    socket.destroy();
    return;
  }
  let buf = null;
  if (typeof m.buffered === 'string' && m.buffered !== '') buf = Buffer.from(m.buffered, 'base64');
  if (buf && buf.length > 0) socket.unshift(buf);
  entry.pendingTake = buf && buf.length > 0 ? 'buffered' : 'handoff';
  try {
    entry.server.emit('connection', socket);
  } finally {
    entry.pendingTake = null;
  }
}

function onConnection(entry, socket) {
  if (entry.tls) {
    rawTls.add(socket);
    socket.once('close', () => {
      rawTls.delete(socket);
      maybeFinish();
    });
    return;
  }
  track(entry, socket, entry.pendingTake);
}

// drain stops this worker: no more accepts, Connection: close on every
// response from now, idle connections to the next generation, exit when
// nothing is left or at the deadline.
function drain(code) {
  if (typeof code === 'number' && code > drainCode) drainCode = code;
  process.exitCode = drainCode;
  if (draining) return drainPromise;
  draining = true;
  for (const e of entries) {
    // net.Server's close: http.Server's own (Node >= 19) also drops idle
    // keep-alive connections at once, which are to be handed off.
    if (e.server.listening) net.Server.prototype.close.call(e.server);
  }
  for (const st of conns.values()) {
    for (const res of st.responses) closeAfter(res);
    setImmediate(considerIdle, st.socket);
  }
  setTimeout(() => {
    const left = conns.size + rawTls.size;
    if (left > 0) config.log(`drain deadline: closing ${left} connection(s)`);
    finish(true);
  }, config.drainTimeout).unref();
  let hook = Promise.resolve();
  if (typeof config.onDrain === 'function') {
    try {
      hook = Promise.resolve(config.onDrain());
    } catch (err) {
      hook = Promise.reject(err);
    }
  }
  drainPromise = new Promise((resolve) => emitter.once('drained', resolve));
  hook.catch((err) => config.log(`onDrain: ${err && err.stack ? err.stack : err}`))
    .then(() => {
      config.hookDone = true;
      maybeFinish();
    });
  emitter.emit('drain');
  return drainPromise;
}

function maybeFinish() {
  if (!draining || finished || !config.hookDone) return;
  if (conns.size > 0 || rawTls.size > 0 || pending.size > 0) return;
  if (entries.some((e) => e.server.listening)) return;
  finish(false);
}

function finish(deadline) {
  if (finished) return;
  finished = true;
  for (const p of pending.values()) {
    clearTimeout(p.timer);
    clearImmediate(p.refusal);
  }
  if (deadline) {
    for (const s of [...conns.keys(), ...rawTls]) s.destroy();
  }
  emitter.emit('drained', drainCode);
  if (config.exit) process.exit(drainCode);
}

function applyOptions(opts) {
  for (const k of ['drainTimeout', 'idleGrace', 'exitOnUncaught', 'exit', 'onDrain', 'readyFd', 'log', 'debug']) {
    if (opts[k] !== undefined) config[k] = opts[k];
  }
}

// serve listens on the upgrader listener named opts.name (the first one
// without a name), or on opts.port/opts.host when not under upgrader, and
// drains server right on SIGTERM.
function serve(server, opts = {}) {
  if (!(server instanceof net.Server)) throw new TypeError('upgrader-drain: serve needs a net/http/https server');
  applyOptions(opts);
  const entry = {
    server,
    kind: opts.kind || 'http',
    tls: server instanceof tls.Server,
    pendingTake: null,
  };
  if (!/^[a-z0-9._-]{1,32}$/.test(entry.kind)) throw new TypeError(`upgrader-drain: bad kind ${JSON.stringify(entry.kind)}`);
  entries.push(entry);
  installHooks();
  server.prependListener(entry.tls ? 'secureConnection' : 'connection', (s) => {
    if (entry.tls) track(entry, s);
    else onConnection(entry, s);
  });
  if (entry.tls) server.prependListener('connection', (s) => onConnection(entry, s));
  server.prependListener('request', onRequest);

  const fds = listenFds();
  let fd = null;
  if (opts.name !== undefined) {
    fd = fds[opts.name] !== undefined ? fds[opts.name] : null;
  } else {
    const all = Object.values(fds);
    if (all.length > 0) fd = Math.min(...all);
  }
  const onListening = () => {
    if (opts.ready !== false) ready();
    else if (readySent) sendAccept();
  };
  if (server.listening) {
    process.nextTick(onListening);
  } else {
    server.once('listening', onListening);
    if (fd !== null) server.listen({ fd });
    else if (opts.port !== undefined || opts.path !== undefined) {
      server.listen(opts.path !== undefined ? { path: opts.path } : { port: opts.port, host: opts.host });
    } else {
      throw new Error(`upgrader-drain: no listener ${opts.name !== undefined ? `named ${JSON.stringify(opts.name)} ` : ''}in LISTEN_FDS and no port given`);
    }
  }
  if (draining) process.nextTick(drain);
  return {
    server,
    fd,
    get draining() { return draining; },
    drain: () => drain(),
    status,
  };
}

module.exports = {
  serve,
  listenFds,
  ready,
  status,
  stopping,
  drain: () => drain(),
  get draining() { return draining; },
  on: (ev, fn) => emitter.on(ev, fn),
};
