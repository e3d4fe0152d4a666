import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { startTestPlatform, type TestPlatform } from '../support/platform.ts';

const BIN = fileURLToPath(new URL('../../bin/parley.js', import.meta.url));

describe('parley federation rotate-key | keys (the CLI as a child process, against a running platform)', () => {
  let tp: TestPlatform;
  before(async () => {
    tp = await startTestPlatform({}, ['web']);
  });
  after(async () => tp?.stop());

  const parley = (args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> =>
    new Promise((resolve, reject) => {
      const env: NodeJS.ProcessEnv = { ...process.env, DATABASE_URL: tp.config.databaseUrl, PARLEY_DOMAINS: 'alpha.test', PARLEY_DATA_DIR: tp.config.dataDir, PARLEY_LOG_LEVEL: 'warn' };
      delete env.PARLEY_CONFIG;
      const child = spawn(process.execPath, [BIN, ...args], { env, stdio: ['ignore', 'pipe', 'pipe'] });
      let stdout = '';
      let stderr = '';
      child.stdout.on('data', (c) => (stdout += c));
      child.stderr.on('data', (c) => (stderr += c));
      child.on('error', reject);
      child.on('close', (code) => resolve({ code, stdout, stderr }));
    });

  it('rotates the key the running platform then publishes and signs with; refuses a bad option', async () => {
    const before = await (await fetch(`${tp.base}/.well-known/parley/keys`)).json();
    assert.equal(before.keys.length, 1, 'a key was generated at first start');
    const first = before.keys[0];
    assert.equal(first.active, true);

    const [rotated, bad] = await Promise.all([parley(['federation', 'rotate-key', '--old-valid-for', '0']), parley(['federation', 'rotate-key', '--old-valid-for', 'soon'])]);
    assert.equal(bad.code, 2, bad.stderr);
    assert.match(bad.stderr, /--old-valid-for/);
    assert.equal(rotated.code, 0, rotated.stderr);
    const m = /active key (alpha\.test#[0-9a-f]{16})/.exec(rotated.stdout);
    assert.ok(m, rotated.stdout);
    assert.match(rotated.stdout, new RegExp(`retired key ${first.key_id} verifies until`));

    const after = await (await fetch(`${tp.base}/.well-known/parley/keys`)).json();
    const byId = new Map<string, any>(after.keys.map((k: any) => [k.key_id, k]));
    assert.equal(after.keys.length, 2);
    assert.equal(byId.get(m[1]).active, true);
    assert.equal(byId.get(first.key_id).active, false);
    assert.ok(Date.parse(byId.get(first.key_id).not_after) <= Date.now(), 'a compromised key stops verifying now');

    // The running platform signs with the new key at once (it reads the active key in each write).
    const alice = await tp.user('alice@alpha.test');
    const c = await alice.post('/api/conversations', { subject: 'after rotation', participants: [], messages: [{ body: 'x' }] });
    assert.equal(c.status, 201, JSON.stringify(c.body));
    for (const a of c.body.actions) assert.ok(a.sig.startsWith(`${m[1]}:`), a.sig);

    const list = await parley(['federation', 'keys']);
    assert.equal(list.code, 0, list.stderr);
    const lines = list.stdout.trim().split('\n');
    assert.equal(lines.length, 2);
    assert.match(lines[0], new RegExp(`^${m[1]}  active`));
    assert.match(lines[1], new RegExp(`^${first.key_id}  retired`));
  });
});
