// An HTTP/1.1 worker for `upgrader --ipc node`, written from the docs alone:
// docs/reference/worker-contract.md (fds, environment, drain) and
// docs/reference/node-ipc.md (the channel and its messages). Plain Node.js,
// no dependencies. It answers every request 200 with the request body's
// length, X-Pid and X-Generation; on the drain signal it hands its idle
// keep-alive connections to the next generation, and it takes the ones the
// previous generation hands it.
//
//   upgrader --ipc node -l 127.0.0.1:8080 -- node node-doc-worker.js
'use strict';
const http = require('http');
const net = require('net');

// worker-contract.md, "Environment": the listeners start at fd 3, and are
// ours only when LISTEN_PID is our pid.
if (process.env.LISTEN_PID !== String(process.pid) || !(Number(process.env.LISTEN_FDS) >= 1)) {
  console.error(`node-doc-worker: no inherited listener (LISTEN_PID=${process.env.LISTEN_PID}, ` +
    `pid ${process.pid}, LISTEN_FDS=${process.env.LISTEN_FDS})`);
  process.exit(1);
}
// node-ipc.md, "The channel": Node opened NODE_CHANNEL_FD at start-up.
if (!process.send) {
  console.error('node-doc-worker: no IPC channel: run me under upgrader --ipc node, as `node` itself or exec\'d');
  process.exit(1);
}

const generation = process.env.UPGRADER_GENERATION || '';
const conns = new Set(); // every connection we serve, handed-in ones too
const pending = new Map(); // handoff id -> {socket, timer}, until ack or nak
let draining = false;
let nextId = 1;

const server = http.createServer((req, res) => {
  const s = req.socket;
  s.inFlight++;
  // A request that begins during the drain is on a connection that could
  // not be handed off: it ends the polite way (worker-contract.md, "What a
  // worker must do", 3). One in flight when the drain began is answered
  // keep-alive and handed off after its response.
  const last = draining;
  let n = 0;
  req.on('data', (b) => { n += b.length; });
  req.on('end', () => {
    res.setHeader('X-Pid', String(process.pid));
    res.setHeader('X-Generation', generation);
    if (last) res.setHeader('Connection', 'close');
    res.end(`${n}\n`);
  });
  res.on('finish', () => {
    s.inFlight--;
    // node-ipc.md, "The sender": hand off only when no byte of a next
    // request has been read since the last response ended. 'finish' runs
    // before the event loop reads the socket again, so this is that mark.
    s.quietAt = s.bytesRead;
    if (last) s.closing = true;
    else if (draining) handOff(s);
  });
});

server.on('connection', (s) => {
  s.inFlight = 0;
  s.quietAt = s.bytesRead;
  conns.add(s);
  s.on('close', () => conns.delete(s));
});

// node-ipc.md, "The sender": one idle connection, paused, sent with
// keepOpen so that a refused one is still ours.
function handOff(s) {
  if (s.inFlight > 0 || s.handingOff || s.refused || s.closing || s.destroyed || s.bytesRead !== s.quietAt) return;
  s.handingOff = true;
  // Stopped at the handle, not only paused: pause() alone does not stop
  // the reads of a socket code listens to for 'data'.
  s.pause();
  s._handle.reading = false;
  s._handle.readStop();
  const id = nextId++;
  // No answer within 5 s: ours again (the socket is paused, so still
  // quiet). The timer also keeps the process alive until the answer: the
  // channel is unref'd, and a handle still queued in Node would be lost.
  const timer = setTimeout(() => answered({upgrader: 'nak', id, reason: 'no answer within 5 s'}), 5000);
  pending.set(id, {s, timer});
  process.send({upgrader: 'handoff', id, kind: 'http', state: '', buffered: ''}, s, {keepOpen: true});
}

function answered(m) {
  const p = pending.get(m.id);
  if (!p) return;
  pending.delete(m.id);
  clearTimeout(p.timer);
  const s = p.s;
  s.handingOff = false;
  if (s.bytesRead !== s.quietAt) {
    console.error(`node-doc-worker: connection read ${s.bytesRead - s.quietAt} bytes while being handed off`);
  }
  if (m.upgrader === 'ack') {
    // The taker holds its own fd: destroy() closes only ours; end() would
    // send a FIN under the taker.
    s.destroy();
  } else {
    // Refused (nak): still ours; its next request gets Connection: close.
    console.error(`node-doc-worker: handoff ${m.id} refused: ${m.reason}`);
    s.refused = true;
    if (s._handle && !s._handle.reading) {
      s._handle.reading = true;
      s._handle.readStart();
    }
    s.resume();
  }
}

// node-ipc.md, "The taker": a handed-in socket is a fresh connection,
// after its buffered bytes. The net.Server does not count it, so conns
// (above) is what tells when we are done.
function take(m, socket) {
  if (!socket) return;
  if (m.buffered) socket.unshift(Buffer.from(m.buffered, 'base64'));
  server.emit('connection', socket);
  if (m.buffered) socket.quietAt = -1; // those bytes are a request in the making
  // Sent to us just as our own drain began: pass it on.
  if (draining) handOff(socket);
}

process.on('message', (m, socket) => {
  if (!m || typeof m.upgrader !== 'string') return;
  if (m.upgrader === 'handoff') take(m, socket);
  else if (m.upgrader === 'ack' || m.upgrader === 'nak') answered(m);
});

server.listen({fd: 3}, () => {
  // node-ipc.md, "Messages": accept before ready, so that we are a target
  // from the moment upgrader counts us ready.
  process.send({upgrader: 'accept', kinds: ['http']});
  process.send({upgrader: 'ready'});
  // The channel must not keep us alive once the drain is done.
  process.channel.unref();
});

process.on('SIGTERM', () => {
  if (draining) {
    // worker-contract.md, 4: a second drain signal: close what is idle now.
    for (const s of conns) if (s.inFlight === 0 && !s.handingOff) s.destroy();
    return;
  }
  draining = true;
  // Stop accepting, without http.Server.close(), which closes idle
  // keep-alive connections (Node >= 19) that we want to hand off
  // (node-ipc.md, "The sender"). We exit when nothing is left: no
  // listener, no connection, no handoff awaiting its answer (its timer).
  net.Server.prototype.close.call(server);
  for (const s of conns) handOff(s);
});
