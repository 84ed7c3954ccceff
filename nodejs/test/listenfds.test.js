'use strict';
const test = require('node:test');
const assert = require('node:assert');

// A fresh copy of the module for each case: it parses the variables once.
function fresh(env) {
  for (const k of ['LISTEN_FDS', 'LISTEN_FDNAMES', 'LISTEN_PID']) delete process.env[k];
  Object.assign(process.env, env);
  delete require.cache[require.resolve('..')];
  return require('..');
}

test('listeners by name, variables removed', () => {
  const m = fresh({ LISTEN_FDS: '3', LISTEN_FDNAMES: 'web:admin:web', LISTEN_PID: String(process.pid) });
  assert.deepStrictEqual(m.listenFds(), { web: 3, admin: 4 });
  for (const k of ['LISTEN_FDS', 'LISTEN_FDNAMES', 'LISTEN_PID']) assert.ok(!(k in process.env), `${k} still set`);
  assert.deepStrictEqual(m.listenFds(), { web: 3, admin: 4 }, 'a second call answers the same');
});

test('missing names are "unknown", as in sd_listen_fds_with_names', () => {
  const m = fresh({ LISTEN_FDS: '2', LISTEN_PID: String(process.pid) });
  assert.deepStrictEqual(m.listenFds(), { unknown: 3 });
});

test('LISTEN_PID of another process: no listeners, variables removed', () => {
  const m = fresh({ LISTEN_FDS: '1', LISTEN_FDNAMES: 'web', LISTEN_PID: String(process.pid + 1) });
  assert.deepStrictEqual(m.listenFds(), {});
  for (const k of ['LISTEN_FDS', 'LISTEN_FDNAMES', 'LISTEN_PID']) assert.ok(!(k in process.env), `${k} still set`);
});

test('no or bad LISTEN_PID, bad LISTEN_FDS: no listeners', () => {
  assert.deepStrictEqual(fresh({ LISTEN_FDS: '1', LISTEN_FDNAMES: 'web' }).listenFds(), {});
  assert.deepStrictEqual(fresh({ LISTEN_FDS: 'x', LISTEN_PID: String(process.pid) }).listenFds(), {});
  assert.deepStrictEqual(fresh({ LISTEN_FDS: '1', LISTEN_PID: `${process.pid}x` }).listenFds(), {});
});
