'use strict';
const nodeTest = require('node:test');

// Every test is bounded in time.
const test = (name, fn) => nodeTest(name, { timeout: 20000 }, fn);
const assert = require('node:assert');
const net = require('net');
const { once } = require('events');
const { listen, Worker, Client, startReading } = require('../testlib/helpers');

// startFirst starts a worker on a listener given as fd 3, ready.
async function startFirst(t, env = {}) {
  const l = await listen();
  const port = l.address().port;
  const w = new Worker(t, { listeners: [l], env: { LISTEN_FDNAMES: 'http', ...env } });
  await w.ready();
  return { w, port };
}

// startTaker starts a worker of the next generation without listeners: it
// only takes handed-off connections.
async function startTaker(t, env = {}) {
  const w = new Worker(t, { env });
  await w.ready();
  return w;
}

// forwardTo plays upgrader routing every handoff of from to to.
function forwardTo(from, to) {
  const forwarded = [];
  let n = 1000;
  from.on('msg', (m, handle) => {
    if (m.upgrader !== 'handoff') return;
    const id = n++;
    to.send({ upgrader: 'handoff', id, kind: m.kind, state: m.state, buffered: m.buffered }, handle)
      .then(() => from.send({ upgrader: 'ack', id: m.id }))
      .then(() => { forwarded.push(m); from.emit('forwarded', m); },
        (err) => {
          // As upgrader does: a handoff the next generation could not take
          // is refused, so the worker serves the connection on.
          forwarded.push({ error: err.message });
          from.send({ upgrader: 'nak', id: m.id, reason: err.message }).catch(() => {});
        });
  });
  return forwarded;
}

function nakAll(from) {
  from.on('msg', (m, handle) => {
    if (m.upgrader !== 'handoff') return;
    handle.destroy();
    from.send({ upgrader: 'nak', id: m.id, reason: 'test' }).then(() => from.emit('naked', m));
  });
}

test('listener by name from LISTEN_FDNAMES, LISTEN_* removed, ready and accept sent', async (t) => {
  const a = await listen();
  const b = await listen();
  const portB = b.address().port;
  const w = new Worker(t, { listeners: [a, b], env: { LISTEN_FDNAMES: 'other:web', TEST_NAME: 'web', TEST_FDS: '1', TEST_STATUS: 'serving' } });
  const fds = (await w.waitMsg((m) => m.test === 'fds')).m;
  assert.deepStrictEqual(fds.fds, { other: 3, web: 4 });
  assert.deepStrictEqual(fds.env, [], 'LISTEN_* left in process.env');
  const ready = await w.ready();
  const accept = await w.waitMsg((m) => m.upgrader === 'accept');
  assert.deepStrictEqual(accept.m, { upgrader: 'accept', kinds: ['http'] });
  assert.ok(accept.index < ready.index, 'accept comes before ready');
  assert.deepStrictEqual((await w.waitMsg((m) => m.upgrader === 'status')).m, { upgrader: 'status', text: 'serving' });
  const c = new Client(portB);
  const r = await c.get('/');
  assert.strictEqual(r.headers['x-pid'], String(w.pid), 'the named listener (fd 4) is served');
  c.destroy();
  process.kill(w.pid, 'SIGTERM');
  assert.deepStrictEqual(await w.exited, { code: 0, signal: null });
});

test('LISTEN_PID of another process: the listeners are ignored, the port option is used', async (t) => {
  const a = await listen();
  const w = new Worker(t, { listeners: [a], env: { LISTEN_PID: '1', TEST_FDS: '1' } });
  const fds = (await w.waitMsg((m) => m.test === 'fds')).m;
  assert.deepStrictEqual(fds.fds, {});
  assert.deepStrictEqual(fds.env, []);
  const { m } = await w.waitMsg((x) => x.test === 'listening');
  const c = new Client(m.port);
  assert.strictEqual((await c.get('/')).headers['x-pid'], String(w.pid));
  c.destroy();
  process.kill(w.pid, 'SIGTERM');
  assert.deepStrictEqual(await w.exited, { code: 0, signal: null });
});

test('idle connection handed off on SIGTERM; the next generation answers on the same connection', async (t) => {
  const { w: w1, port } = await startFirst(t);
  const w2 = await startTaker(t);
  const forwarded = forwardTo(w1, w2);
  const c = new Client(port);
  const r1 = await c.get('/one');
  assert.strictEqual(r1.headers['x-pid'], String(w1.pid));
  assert.notStrictEqual(r1.headers.connection, 'close');
  process.kill(w1.pid, 'SIGTERM');
  const exit1 = await w1.exited;
  assert.deepStrictEqual(exit1, { code: 0, signal: null }, w1.stderr);
  assert.strictEqual(forwarded.length, 1);
  assert.deepStrictEqual(forwarded[0], { upgrader: 'handoff', id: forwarded[0].id, kind: 'http', state: '', buffered: '' });
  const r2 = await c.get('/two');
  assert.strictEqual(r2.status, 200);
  assert.strictEqual(r2.headers['x-pid'], String(w2.pid));
  assert.strictEqual(r2.body, `hello from ${w2.pid} /two\n`);
  c.destroy();
  process.kill(w2.pid, 'SIGTERM');
  assert.deepStrictEqual(await w2.exited, { code: 0, signal: null });
});

for (const [what, env] of [['', {}], [', with user code listening for data on it', { TEST_DATA_LISTENER: '1' }]]) test(`nak: the connection stays and its next request is served with Connection: close${what}`, async (t) => {
  const { w, port } = await startFirst(t, { TEST_IDLE_GRACE: '20000', ...env });
  nakAll(w);
  const c = new Client(port);
  await c.get('/one');
  process.kill(w.pid, 'SIGTERM');
  await once(w, 'naked');
  const r = await c.get('/two');
  assert.strictEqual(r.headers['x-pid'], String(w.pid));
  assert.strictEqual(r.headers.connection, 'close');
  assert.strictEqual(await c.eof(), '');
  assert.deepStrictEqual(await w.exited, { code: 0, signal: null });
});

test('user code listening for data on a connection: a request sent while it is handed off is the taker\'s', async (t) => {
  const { w: w1, port } = await startFirst(t, { TEST_DATA_LISTENER: '1' });
  const w2 = await startTaker(t);
  const c = new Client(port);
  assert.strictEqual((await c.get('/one')).headers['x-pid'], String(w1.pid));
  const handing = w1.waitMsg((m) => m.upgrader === 'handoff');
  process.kill(w1.pid, 'SIGTERM');
  const { m, handle } = await handing;
  // The next request reaches the connection while w1 still holds it. The
  // ping's round trip puts the ack after w1's loop turn that would read it,
  // were it reading: it would then be lost when w1 destroys its copy.
  const two = c.get('/two');
  await w1.send({ test: 'ping', n: 1 });
  await w1.waitMsg((x) => x.test === 'pong' && x.n === 1);
  await w2.send({ upgrader: 'handoff', id: 1, kind: m.kind, state: m.state, buffered: m.buffered }, handle);
  await w1.send({ upgrader: 'ack', id: m.id });
  assert.deepStrictEqual(await w1.exited, { code: 0, signal: null });
  assert.strictEqual((await two).headers['x-pid'], String(w2.pid));
  c.destroy();
  process.kill(w2.pid, 'SIGTERM');
  assert.deepStrictEqual(await w2.exited, { code: 0, signal: null });
});

test('channel closed with a handoff unanswered: the connection is left to the taker, never served here', async (t) => {
  // An idle grace and a drain longer than the test: a connection kept
  // here would hold the worker past the test's timeout.
  const { w, port } = await startFirst(t, { TEST_IDLE_GRACE: '60000', TEST_DRAIN_TIMEOUT: '60000', TEST_KEEPALIVE_TIMEOUT: '60000' });
  const lost = new Promise((resolve) => {
    w.on('msg', (m, handle) => {
      if (m.upgrader !== 'handoff') return;
      // upgrader took the connection and went away before its answer.
      w.proc.disconnect();
      resolve(handle);
    });
  });
  const c = new Client(port);
  assert.strictEqual((await c.get('/one')).headers['x-pid'], String(w.pid));
  process.kill(w.pid, 'SIGTERM');
  const taker = await lost;
  assert.deepStrictEqual(await w.exited, { code: 0, signal: null }, w.stderr);
  startReading(taker);
  taker.once('data', () => taker.write('HTTP/1.1 200 OK\r\nX-Pid: taker\r\nContent-Length: 0\r\n\r\n'));
  const r = await c.get('/two');
  assert.strictEqual(r.headers['x-pid'], 'taker');
  c.destroy();
  taker.destroy();
});

test('nak and quiet: closed after the idle grace, then exit 0', async (t) => {
  const { w, port } = await startFirst(t, { TEST_IDLE_GRACE: '100' });
  nakAll(w);
  const c = new Client(port);
  await c.get('/one');
  process.kill(w.pid, 'SIGTERM');
  assert.strictEqual(await c.eof(), '');
  assert.strictEqual(c.error, undefined, 'closed with a FIN, not a reset');
  assert.deepStrictEqual(await w.exited, { code: 0, signal: null });
});

test('busy connection: the response in flight gets Connection: close, then exit 0', async (t) => {
  const { w, port } = await startFirst(t);
  const handoffs = [];
  w.on('msg', (m) => { if (m.upgrader === 'handoff') handoffs.push(m); });
  const c = new Client(port);
  await c.connected();
  const pending = c.get('/slow');
  await w.waitMsg((m) => m.test === 'request' && m.url === '/slow');
  process.kill(w.pid, 'SIGTERM');
  const r = await pending;
  assert.strictEqual(r.status, 200);
  assert.strictEqual(r.headers.connection, 'close');
  assert.strictEqual(await c.eof(), '');
  assert.deepStrictEqual(await w.exited, { code: 0, signal: null });
  assert.deepStrictEqual(handoffs, [], 'a busy connection was handed off');
});

test('uncaught exception: stopping at once, then the drain, then exit 1', async (t) => {
  const { w: w1, port } = await startFirst(t);
  const w2 = await startTaker(t);
  forwardTo(w1, w2);
  const idle = new Client(port);
  await idle.get('/idle');
  const c = new Client(port);
  const r = await c.get('/throw');
  assert.strictEqual(r.status, 200);
  const exit = await w1.exited;
  assert.deepStrictEqual(exit, { code: 1, signal: null });
  assert.match(w1.stderr, /boom from \/throw/);
  const stopping = w1.messages.findIndex((m) => m.upgrader === 'stopping');
  const firstHandoff = w1.messages.findIndex((m) => m.upgrader === 'handoff');
  assert.ok(stopping >= 0, 'no stopping sent');
  assert.ok(firstHandoff > stopping, `handoff (${firstHandoff}) before stopping (${stopping})`);
  assert.strictEqual(w1.messages.filter((m) => m.upgrader === 'handoff').length, 2);
  // Both connections live on in the next generation.
  for (const cl of [idle, c]) {
    assert.strictEqual((await cl.get('/after')).headers['x-pid'], String(w2.pid));
    cl.destroy();
  }
  process.kill(w2.pid, 'SIGTERM');
  assert.deepStrictEqual(await w2.exited, { code: 0, signal: null });
});

test('a handed-off connection with buffered bytes: they are served first', async (t) => {
  const w = await startTaker(t);
  const l = await listen();
  const c = new Client(l.address().port);
  const [server] = await once(l, 'connection');
  server.pause();
  l.close();
  const buffered = Buffer.from('GET /buffered HTTP/1.1\r\nHost: test\r\n\r\n').toString('base64');
  await w.send({ upgrader: 'handoff', id: 1, kind: 'http', state: '', buffered }, server);
  const r = await c.response();
  assert.strictEqual(r.headers['x-pid'], String(w.pid));
  assert.strictEqual(r.body, `hello from ${w.pid} /buffered\n`);
  assert.strictEqual((await c.get('/next')).body, `hello from ${w.pid} /next\n`);
  c.destroy();
  process.kill(w.pid, 'SIGTERM');
  assert.deepStrictEqual(await w.exited, { code: 0, signal: null });
});

test('a connection taken while draining goes on like an idle one of its own', async (t) => {
  const { w: w1, port } = await startFirst(t);
  const w2 = await startTaker(t);
  const w3 = await startTaker(t);
  forwardTo(w1, w2);
  forwardTo(w2, w3);
  const c = new Client(port);
  await c.get('/one');
  // A request w2 holds keeps it draining, not gone, while w1 hands off. A
  // request w2 has not yet read would not: the connection would look idle
  // and go to w3, and w2 could exit before w1's handoff reached it.
  const port2 = (await w2.waitMsg((m) => m.test === 'listening')).m.port;
  const busy = new Client(port2);
  const answered = busy.get('/held');
  await w2.waitMsg((m) => m.test === 'request' && m.url === '/held');
  process.kill(w2.pid, 'SIGTERM');
  await w2.waitMsg((m) => m.test === 'drain');
  process.kill(w1.pid, 'SIGTERM');
  assert.deepStrictEqual(await w1.exited, { code: 0, signal: null });
  await w2.waitMsg((m) => m.upgrader === 'handoff');
  assert.strictEqual((await c.get('/two')).headers['x-pid'], String(w3.pid));
  await w2.send({ test: 'release' });
  const r = await answered;
  assert.strictEqual(r.headers['x-pid'], String(w2.pid));
  assert.strictEqual(r.headers.connection, 'close');
  assert.deepStrictEqual(await w2.exited, { code: 0, signal: null });
  c.destroy();
  process.kill(w3.pid, 'SIGTERM');
  assert.deepStrictEqual(await w3.exited, { code: 0, signal: null });
});

test('without an IPC channel: ready on the ready fd, SIGTERM drains, exit 0', async (t) => {
  const l = await listen();
  const port = l.address().port;
  // stdio 4 is a pipe: the ready fd of --ready fd:4.
  const w = new Worker(t, { listeners: [l], ipc: false, extraPipe: true, env: { TEST_READY_FD: '4', TEST_IDLE_GRACE: '100' } });
  const readyPipe = w.proc.stdio[4];
  const [chunk] = await once(readyPipe, 'data');
  assert.strictEqual(chunk.toString(), '\n');
  const c = new Client(port);
  assert.strictEqual((await c.get('/')).headers['x-pid'], String(w.pid));
  process.kill(w.pid, 'SIGTERM');
  assert.strictEqual(await c.eof(), '');
  assert.deepStrictEqual(await w.exited, { code: 0, signal: null });
});

test('watchdog: pings every half of WATCHDOG_USEC', async (t) => {
  const { w } = await startFirst(t, { WATCHDOG_USEC: '100000', WATCHDOG_PID: '' });
  await w.waitMsg((m) => m.upgrader === 'watchdog');
  process.kill(w.pid, 'SIGTERM');
  assert.deepStrictEqual(await w.exited, { code: 0, signal: null });
});

test('an idle worker exits on its own once drained: the channel does not hold it', async (t) => {
  const { w } = await startFirst(t);
  process.kill(w.pid, 'SIGTERM');
  assert.deepStrictEqual(await w.exited, { code: 0, signal: null });
  assert.ok(w.proc.connected === false);
});

test('https: an idle TLS connection is never handed off; closed after the idle grace', async (t) => {
  const fs = require('fs');
  const os = require('os');
  const path = require('path');
  const { execFileSync } = require('child_process');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'upgrader-drain-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', path.join(dir, 'key.pem'), '-out', path.join(dir, 'cert.pem'), '-subj', '/CN=127.0.0.1', '-days', '1'], { stdio: 'ignore' });
  const { w, port } = await startFirst(t, { TEST_TLS_DIR: dir, TEST_IDLE_GRACE: '100' });
  const accept = w.messages.filter((m) => m.upgrader === 'accept');
  assert.deepStrictEqual(accept, [], 'an https server takes no handed-off http connections');
  const c = new Client(port, { tls: true });
  assert.strictEqual((await c.get('/')).headers['x-pid'], String(w.pid));
  process.kill(w.pid, 'SIGTERM');
  assert.strictEqual(await c.eof(), '');
  assert.deepStrictEqual(await w.exited, { code: 0, signal: null });
  assert.deepStrictEqual(w.messages.filter((m) => m.upgrader === 'handoff'), []);
});

test('many idle connections: at most 32 handoffs unanswered, the ones waiting for a slot are still served', async (t) => {
  const n = 100;
  const { w: w1, port } = await startFirst(t);
  const w2 = await startTaker(t);
  const clients = [];
  for (let i = 0; i < n; i++) {
    const c = new Client(port);
    await c.get(`/${i}`);
    clients.push(c);
  }
  // Plays an upgrader that holds its answers until 32 handoffs are
  // unanswered: the worker must then stop sending.
  const held = [];
  let unanswered = 0;
  let most = 0;
  let holding = true;
  let id = 1000;
  const full = new Promise((resolve) => {
    w1.on('msg', (m, handle) => {
      if (m.upgrader !== 'handoff') return;
      unanswered++;
      most = Math.max(most, unanswered);
      held.push({ m, handle });
      if (holding && unanswered === 32) resolve();
      if (!holding) release();
    });
  });
  const release = () => {
    for (const { m, handle } of held.splice(0)) {
      w2.send({ upgrader: 'handoff', id: id++, kind: m.kind, state: m.state, buffered: m.buffered }, handle)
        .then(() => { unanswered--; return w1.send({ upgrader: 'ack', id: m.id }); });
    }
  };
  process.kill(w1.pid, 'SIGTERM');
  await full;
  // A connection that is not among the 32 waits in the worker for a slot,
  // not paused: its request is answered, with Connection: close.
  const handed = new Set(held.map(({ handle }) => handle.remotePort));
  const waiting = clients.find((c) => !handed.has(c.sock.localPort));
  const r = await waiting.get('/while-waiting');
  assert.strictEqual(r.headers['x-pid'], String(w1.pid));
  assert.strictEqual(r.headers.connection, 'close');
  assert.strictEqual(await waiting.eof(), '');
  holding = false;
  release();
  assert.deepStrictEqual(await w1.exited, { code: 0, signal: null }, w1.stderr);
  assert.ok(most <= 32, `${most} handoffs unanswered at once`);
  for (const c of clients) {
    if (c === waiting) continue;
    const r2 = await c.get('/after');
    assert.strictEqual(r2.headers['x-pid'], String(w2.pid));
    c.destroy();
  }
  process.kill(w2.pid, 'SIGTERM');
  assert.deepStrictEqual(await w2.exited, { code: 0, signal: null });
});

nodeTest('an ack that came while the event loop was blocked past the timeout still hands the connection off', { timeout: 30000 }, async (t) => {
  // Idle connections the worker keeps stay for a minute, and so does its
  // drain: within the test's 30 s it exits only if it kept none.
  const { w: w1, port } = await startFirst(t, { TEST_IDLE_GRACE: '60000', TEST_KEEPALIVE_TIMEOUT: '60000', TEST_DRAIN_TIMEOUT: '60000' });
  const w2 = await startTaker(t);
  const a = new Client(port);
  await a.get('/one');
  // b has a request in flight, its body not sent: it is not handed off.
  const b = new Client(port);
  await b.connected();
  b.sock.write('POST /block?ms=5500 HTTP/1.1\r\nHost: test\r\nContent-Length: 1\r\n\r\n');
  await w1.waitMsg((m) => m.test === 'request' && m.url.startsWith('/block'));
  const handoff = w1.waitMsg((m) => m.upgrader === 'handoff');
  process.kill(w1.pid, 'SIGTERM');
  const { m, handle } = await handoff;
  await w2.send({ upgrader: 'handoff', id: 1, kind: m.kind, state: m.state, buffered: m.buffered }, handle);
  // b's body blocks w1's event loop in an HTTP callback for longer than
  // the 5 s its handoff's answer may take; the ack reaches its channel
  // meanwhile, and is read only after its timer has run out.
  const blocking = w1.waitMsg((x) => x.test === 'blocking');
  b.sock.write('x');
  await blocking;
  await w1.send({ upgrader: 'ack', id: m.id });
  const r = await b.response();
  assert.strictEqual(r.headers.connection, 'close');
  assert.deepStrictEqual(await w1.exited, { code: 0, signal: null }, w1.stderr);
  const r2 = await a.get('/two');
  assert.strictEqual(r2.headers['x-pid'], String(w2.pid), 'the connection is the next generation\'s alone');
  a.destroy();
  b.destroy();
  process.kill(w2.pid, 'SIGTERM');
  assert.deepStrictEqual(await w2.exited, { code: 0, signal: null });
});
