import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ApiClient, startTestPlatform } from '../support/platform.ts';
import { createTestDatabase } from '../support/db.ts';

const BIN = fileURLToPath(new URL('../../bin/parley.js', import.meta.url));

describe('parley user add|list (the CLI as a child process)', () => {
  let db: { url: string; drop(): Promise<void> };
  let dataDir: string;

  /** Runs `node bin/parley.js …args` on the test database; `stdin` is written to the child's standard input. */
  const parley = (args: string[], stdin = ''): Promise<{ code: number | null; stdout: string; stderr: string }> =>
    new Promise((resolve, reject) => {
      const env: NodeJS.ProcessEnv = { ...process.env, DATABASE_URL: db.url, PARLEY_DOMAINS: 'alpha.test', PARLEY_DATA_DIR: dataDir, PARLEY_LOG_LEVEL: 'warn' };
      delete env.PARLEY_CONFIG;
      const child = spawn(process.execPath, [BIN, ...args], { env, stdio: ['pipe', 'pipe', 'pipe'] });
      let stdout = '';
      let stderr = '';
      child.stdout.on('data', (c) => (stdout += c));
      child.stderr.on('data', (c) => (stderr += c));
      child.on('error', reject);
      child.on('close', (code) => resolve({ code, stdout, stderr }));
      child.stdin.end(stdin);
    });

  before(async () => {
    db = await createTestDatabase();
    dataDir = mkdtempSync(join(tmpdir(), 'parley-cli-'));
  });
  after(async () => {
    await db.drop();
    rmSync(dataDir, { recursive: true, force: true });
  });

  it('adds users (password from stdin, CRLF stripped), refuses a duplicate with exit 2, lists them, and they log in', async () => {
    // Independent invocations run in parallel: each child loads the whole CLI (seconds of CPU).
    const [add, nopass] = await Promise.all([
      parley(['user', 'add', 'Dora@alpha.test', '--name', 'Dora Explorer', '--admin', '--password-stdin'], 'map and backpack\r\nsecond line ignored\n'),
      parley(['user', 'add', 'eve@alpha.test']),
    ]);
    assert.equal(add.code, 0, add.stderr);
    assert.match(add.stdout, /added dora@alpha\.test \(admin\)/);
    assert.equal(nopass.code, 0, nopass.stderr);
    assert.match(nopass.stdout, /eve@alpha\.test has no password and cannot log in/);

    const [dup, list, table] = await Promise.all([
      parley(['user', 'add', 'dora@alpha.test', '--password-stdin'], 'whatever whatever\n'),
      parley(['user', 'list', '--json']),
      parley(['user', 'list']),
    ]);
    assert.equal(dup.code, 2);
    assert.match(dup.stderr, /^parley: dora@alpha\.test already exists/);
    assert.equal(list.code, 0, list.stderr);
    const users = JSON.parse(list.stdout);
    assert.deepEqual(
      users.map((u: any) => [u.address, u.name, u.is_admin, u.has_password, u.status]),
      [
        ['dora@alpha.test', 'Dora Explorer', true, true, 'active'],
        ['eve@alpha.test', '', false, false, 'active'],
      ],
    );
    assert.equal(table.code, 0, table.stderr);
    const lines = table.stdout.trim().split('\n');
    assert.match(lines[0], /^ADDRESS\s+NAME\s+ADMIN\s+STATUS\s+PASSWORD\s+CREATED$/);
    assert.match(lines[1], /^dora@alpha\.test\s+Dora Explorer\s+yes\s+active\s+set\s+\d{4}-/);
    assert.match(lines[2], /^eve@alpha\.test\s+-\s+no\s+active\s+none\s+\d{4}-/);

    const tp = await startTestPlatform({ databaseUrl: db.url }, ['web']);
    try {
      const anon = new ApiClient(tp.base, null, '');
      const r = await anon.post('/api/login', { address: 'dora@alpha.test', password: 'map and backpack' });
      assert.equal(r.status, 200, JSON.stringify(r.body));
      const me = await new ApiClient(tp.base, r.body.token, 'dora@alpha.test').get('/api/me');
      assert.equal(me.body.name, 'Dora Explorer');
      assert.equal(me.body.is_admin, true);
      assert.equal((await anon.post('/api/login', { address: 'dora@alpha.test', password: 'map and backpack\r' })).status, 401);
      assert.equal((await anon.post('/api/login', { address: 'eve@alpha.test', password: '' })).status, 401);
    } finally {
      await tp.stop();
    }
  });

  it('parley user password resets a password: the old one and every session stop working, the new one logs in', async () => {
    assert.equal((await parley(['user', 'add', 'fay@alpha.test', '--password-stdin'], 'first password here\n')).code, 0);
    const tp = await startTestPlatform({ databaseUrl: db.url }, ['web']);
    try {
      const anon = new ApiClient(tp.base, null, '');
      const login = await anon.post('/api/login', { address: 'fay@alpha.test', password: 'first password here' });
      assert.equal(login.status, 200);
      const session = new ApiClient(tp.base, login.body.token, 'fay@alpha.test');
      assert.equal((await session.get('/api/me')).status, 200);

      const reset = await parley(['user', 'password', 'fay@alpha.test'], 'second password here\n');
      assert.equal(reset.code, 0, reset.stderr);
      assert.match(reset.stdout, /fay@alpha\.test: password set; every session of the user has ended/);
      // The platform reads a session again at most SESSION_CACHE_MS (1 s) after it last did: poll, bounded.
      let me = await session.get('/api/me');
      for (const until = Date.now() + 10_000; me.status === 200 && Date.now() < until; ) me = await session.get('/api/me');
      assert.equal(me.status, 401, 'the session of before the reset has ended');
      assert.equal((await anon.post('/api/login', { address: 'fay@alpha.test', password: 'first password here' })).status, 401);
      assert.equal((await anon.post('/api/login', { address: 'fay@alpha.test', password: 'second password here' })).status, 200);

      const removed = await parley(['user', 'password', 'fay@alpha.test', '--remove']);
      assert.equal(removed.code, 0, removed.stderr);
      assert.equal((await anon.post('/api/login', { address: 'fay@alpha.test', password: 'second password here' })).status, 401);
      const nobody = await parley(['user', 'password', 'nobody@alpha.test'], 'a password for nobody\n');
      assert.equal(nobody.code, 2);
      assert.match(nobody.stderr, /^parley: .*nobody@alpha\.test/m);
    } finally {
      await tp.stop();
    }
  });
});
