#!/usr/bin/env node
// Runs every test file (test/**/*.test.ts) with Node's test runner through tsx.
// Unless PARLEY_TEST_PG_URL is set (an admin URL of a PostgreSQL the tests may create
// databases on), starts one embedded PostgreSQL for the whole run in a fresh temporary
// directory (so concurrent runs never share a server), removed at the end.
// Usage: node scripts/run-tests.mjs [filter-substring ...]
import { chmodSync, mkdtempSync, readdirSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { spawn } from 'node:child_process';
import { createServer } from 'node:net';
import { register } from 'tsx/esm/api';

register();

function walk(dir) {
  const out = [];
  for (const name of readdirSync(dir)) {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) out.push(...walk(p));
    else if (name.endsWith('.test.ts')) out.push(p);
  }
  return out;
}

function freePort() {
  return new Promise((res, rej) => {
    const s = createServer();
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => res(port));
    });
    s.on('error', rej);
  });
}

const filters = process.argv.slice(2);
const files = walk('test').filter((f) => filters.length === 0 || filters.some((x) => f.includes(x))).sort();
if (files.length === 0) {
  console.error('no test files matched');
  process.exit(1);
}

let embedded = null;
let pgDir = null;
const env = { ...process.env, PARLEY_LOG_LEVEL: process.env.PARLEY_LOG_LEVEL ?? 'silent' };
if (!env.PARLEY_TEST_PG_URL) {
  const { startEmbeddedPostgres } = await import('../src/store/embedded.ts');
  pgDir = mkdtempSync(join(tmpdir(), 'parley-test-pg-'));
  chmodSync(pgDir, 0o755); // the server runs as the postgres user when we are root
  embedded = await startEmbeddedPostgres(join(pgDir, 'data'), await freePort());
  env.PARLEY_TEST_PG_URL = embedded.adminUrl;
}

const child = spawn(process.execPath, ['--import', 'tsx', '--test', '--test-concurrency=1', ...files], { stdio: 'inherit', env });
const code = await new Promise((res) => child.on('exit', (c, sig) => res(c ?? (sig ? 1 : 0))));
if (embedded) await embedded.stop();
if (pgDir) rmSync(pgDir, { recursive: true, force: true });
process.exit(code);
