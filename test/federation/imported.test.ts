import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { sql } from 'kysely';
import { startTestPlatform, type TestPlatform } from '../support/platform.ts';

const run = promisify(execFile);

/**
 * An archive imported on one platform (`parley import`, issue 2 §6) whose mail involved a
 * user of another Parley platform. The email bridge adds an email's recipients as **email
 * participants** whatever their domain (docs/federation.md, "Roles"): they took part by
 * email, their own platform received the mail and has the conversation as its own, and an
 * import probes no correspondent's domain. So the imported conversation is not replicated;
 * what happens in it later reaches them by email, from the leader only.
 */
describe('an imported conversation with a correspondent on another platform', () => {
  let A: TestPlatform;
  let B: TestPlatform;
  let dir: string;
  before(async () => {
    [A, B] = await Promise.all([startTestPlatform({ relayUrl: 'smtp://127.0.0.1:9' }, ['web']), startTestPlatform({ domains: ['beta.test'] }, ['web'])]);
    const routes = { 'alpha.test': A.base, 'beta.test': B.base };
    A.config.federationRoutes = routes;
    B.config.federationRoutes = routes;
    dir = mkdtempSync(join(tmpdir(), 'parley-import-fed-'));
  });
  after(async () => {
    await Promise.all([A?.stop(), B?.stop()]);
    rmSync(dir, { recursive: true, force: true });
  });

  const eml = (name: string, headers: Record<string, string>, body: string) =>
    writeFileSync(join(dir, name), Object.entries(headers).map(([k, v]) => `${k}: ${v}\r\n`).join('') + '\r\n' + body + '\r\n');

  it('keeps them email participants: nothing is replicated, a later reply is emailed to them', async () => {
    const alice = await A.user('alice@alpha.test');
    await B.user('bob@beta.test');
    eml('1.eml', {
      From: 'Carol <carol@mail.example>',
      To: 'alice@alpha.test',
      Cc: 'bob@beta.test',
      Subject: 'Quarterly figures',
      Date: 'Mon, 02 Nov 2026 09:00:00 +0000',
      'Message-ID': '<q1@mail.example>',
    }, 'Here are the quarterly figures.');
    eml('2.eml', {
      From: 'Carol <carol@mail.example>',
      To: 'alice@alpha.test',
      Cc: 'bob@beta.test',
      Subject: 'Re: Quarterly figures',
      Date: 'Mon, 02 Nov 2026 10:00:00 +0000',
      'Message-ID': '<q2@mail.example>',
      'In-Reply-To': '<q1@mail.example>',
      References: '<q1@mail.example>',
    }, 'One correction: Q3 was 12, not 21.');
    const { stdout } = await run(process.execPath, ['bin/parley.js', 'import', dir, '--owner', 'alice@alpha.test', '--json'], {
      env: {
        ...process.env,
        DATABASE_URL: A.config.databaseUrl,
        PARLEY_DOMAINS: 'alpha.test',
        PARLEY_DATA_DIR: A.config.dataDir,
        PARLEY_DNS_OFFLINE: '1',
        PARLEY_FEDERATION_ROUTES: `alpha.test=${A.base},beta.test=${B.base}`,
        PARLEY_LOG_LEVEL: 'warn',
      },
      timeout: 120_000,
    });
    const summary = JSON.parse(stdout.trim().split('\n').at(-1)!);
    assert.equal(summary.imported + summary.threaded, 2, stdout);
    const keys = (await sql<{ key: string }>`select key from conversations`.execute(A.platform.deps.db.kysely)).rows.map((r) => r.key);
    assert.equal(keys.length, 1, 'the reply threads under the first message');
    const key = keys[0];
    const db = A.platform.deps.db.kysely;
    assert.deepEqual((await sql`select address from federation_participants`.execute(db)).rows, [], 'no remote participant');
    assert.deepEqual((await sql`select platform from federation_links`.execute(db)).rows, [], 'nothing to push');
    assert.deepEqual((await sql`select destination from deliveries`.execute(db)).rows, [], 'an import emails nobody');

    const reply = await alice.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'message:add', body: 'Thanks, noted.' }] });
    assert.equal(reply.status, 200, JSON.stringify(reply.body));
    const mailed = (await sql<{ destination: string }>`select destination from deliveries where plugin = 'smtp' order by destination`.execute(db)).rows.map((r) => r.destination);
    assert.deepEqual(mailed, ['bob@beta.test', 'carol@mail.example'], 'the leader emails both correspondents');
    assert.deepEqual((await sql`select platform from federation_links`.execute(db)).rows, [], 'still nothing to push');
  });
});
