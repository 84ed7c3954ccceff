#!/usr/bin/env node
// The Node.js competitor of the side-by-side benchmark (tools/sidebyside):
// a cluster primary with one worker per CPU (WORKERS overrides), restarted
// the usual way on SIGUSR2: one worker at a time, fork a new worker and,
// once it is listening, disconnect the old one (worker.disconnect() closes
// its server and lets it exit when its connections are done). A SIGUSR2
// during a restart queues one more restart.
//
// The workers listen on 127.0.0.1, port PORT (default 0): in a cluster the
// primary holds the one listening socket (round-robin scheduling, Linux's
// default), so every worker gets the same port; the primary writes it to
// PORT_FILE once the first worker listens. SIGTERM ends everything.
'use strict';
const cluster = require('node:cluster');
const fs = require('node:fs');
const http = require('node:http');
const os = require('node:os');

if (cluster.isPrimary) {
  const n = Number(process.env.WORKERS) || os.availableParallelism();
  let generation = 1;
  let announced = false;
  let restarting = false;
  let again = false;
  const fork = () => cluster.fork({ GENERATION: String(generation) });

  cluster.on('listening', (worker, address) => {
    if (announced) return;
    announced = true;
    if (process.env.PORT_FILE) fs.writeFileSync(process.env.PORT_FILE, `${address.port}\n`);
  });

  const restart = async () => {
    if (restarting) {
      again = true;
      return;
    }
    restarting = true;
    generation++;
    for (const old of Object.values(cluster.workers)) {
      if (!old.isConnected()) continue;
      await new Promise((resolve) => {
        const next = fork();
        next.once('listening', () => {
          old.disconnect();
          resolve();
        });
        next.once('exit', resolve);
      });
    }
    restarting = false;
    if (again) {
      again = false;
      restart();
    }
  };

  for (let i = 0; i < n; i++) fork();
  process.on('SIGUSR2', restart);
  process.on('SIGTERM', () => {
    for (const w of Object.values(cluster.workers)) w.process.kill('SIGKILL');
    process.exit(0);
  });
} else {
  const gen = process.env.GENERATION;
  const pid = String(process.pid);
  http
    .createServer((req, res) => {
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
    })
    .listen(Number(process.env.PORT || 0), '127.0.0.1');
}
