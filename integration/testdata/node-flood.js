// A raw worker for TestNodeChannelFloodStaysBounded, without the module:
// it serves HTTP on the inherited listener and says ready on Node's IPC
// channel; in generation 1 it then floods the channel with FLOOD_N handoffs
// of one socket (the same fd each time, kept open: never destroyed), and
// bad messages of every kind, and reports by its status once every handoff
// was answered.
'use strict';
const http = require('http');
const net = require('net');

const gen = process.env.UPGRADER_GENERATION || '0';
const n = Number(process.env.FLOOD_N || 20000);

const server = http.createServer((req, res) => {
  req.resume();
  req.on('end', () => {
    res.writeHead(200, { 'Content-Length': 3, 'X-Generation': gen });
    res.end('ok\n');
  });
});
process.on('SIGTERM', () => process.exit(0));

let answered = 0;
let acked = 0;
process.on('message', (m) => {
  if (!m || (m.upgrader !== 'ack' && m.upgrader !== 'nak')) return;
  if (m.upgrader === 'ack') acked++;
  // ids 1..n are the flood's; the malformed handoff below uses n+1.
  if (m.id >= 1 && m.id <= n && ++answered === n) {
    process.send({ upgrader: 'status', text: `flood answered ${answered} acked ${acked}` });
  }
});

function flood() {
  // A connection to itself: one socket, sent over and over.
  const self = net.createServer(() => {});
  self.listen(0, '127.0.0.1', () => {
    const sock = net.connect(self.address().port, '127.0.0.1', () => {
      for (let i = 0; i < 200; i++) process.send({ app: 'garbage', i, pad: 'x'.repeat(i) });
      // Each of these is one malformed message (node-ipc.md, "Limits and
      // bad input"): 6 in all; the test expects exactly that count.
      process.send({ upgrader: 'bogus' });
      process.send({ upgrader: 'status' });
      process.send({ upgrader: 'accept', kinds: ['BAD KIND'] });
      process.send({ upgrader: 'handoff', id: n + 1, kind: 'http' }); // no socket
      process.send({ upgrader: 'ready' }, sock, { keepOpen: true }); // a socket where none goes
      process.send({ app: 'not upgrader' }, sock, { keepOpen: true }); // likewise
      for (let i = 1; i <= n; i++) {
        process.send({ upgrader: 'handoff', id: i, kind: 'http' }, sock, { keepOpen: true });
      }
    });
  });
}

server.listen({ fd: 3 }, () => {
  process.send({ upgrader: 'ready' });
  if (gen === '1') flood();
});
