import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Deps } from '../../src/context.ts';
import { cancelDelivery } from '../../src/delivery/dead-letters.ts';
import { claimDue, recordOutcome, startDeliveryWorker } from '../../src/delivery/worker.ts';
import { attemptsOf, createOrg, enqueue, moreDeps, row, testDeps, until, untilRow } from './support/deps.ts';
import { type FakeSms, startFakeSms } from './support/fake-sms.ts';
import { type WebhookReceiver, startWebhookReceiver } from './support/webhook-receiver.ts';

/**
 * Issue 4 §4: many workers on one PostgreSQL never send the same attempt twice, and a worker
 * killed mid-attempt (SIGKILL, a real `parley start --roles worker` process) loses nothing:
 * the lease ends, another worker attempts again with the same idempotency key, and the
 * provider — which honours keys — sends the message once.
 */
describe('workers', () => {
  let env: Awaited<ReturnType<typeof testDeps>>;
  let deps: Deps;
  let rx: WebhookReceiver;
  let sms: FakeSms;
  let orgId: number;
  before(async () => {
    env = await testDeps();
    deps = env.deps;
    rx = await startWebhookReceiver();
    sms = await startFakeSms();
    orgId = await createOrg(deps, 'acme', {
      webhook: { url: rx.url, secret: rx.secret },
      sms: { base_url: sms.baseUrl, account: sms.account, token: sms.token, from: '+15550001000', status_callback: false },
    });
  });
  after(async () => {
    await rx?.close();
    await sms?.close();
    await env?.stop();
  });

  it('two workers on one database never send the same delivery twice', async () => {
    const N = 120;
    const ids: number[] = [];
    for (let i = 0; i < N; i++) {
      ids.push((await enqueue(deps, { chain: ['webhook'], destinations: { webhook: `c${i}` }, payload: { text: `n${i}` }, idempotencyKey: `two-${i}`, orgId }))!);
    }
    const otherDeps = moreDeps(deps);
    const [w1, w2] = await Promise.all([
      startDeliveryWorker(deps, { name: 'w-one', batch: 5, concurrency: 4, pollMs: 20 }),
      startDeliveryWorker(otherDeps, { name: 'w-two', batch: 5, concurrency: 4, pollMs: 20 }),
    ]);
    try {
      await rx.waitFor(`${N} deliveries`, () => rx.kept.length >= N, 30_000);
      await until('every row sent', async () => {
        const r = await deps.db.kysely.selectFrom('deliveries').select('id').where('id', 'in', ids).where('state', '!=', 'sent').execute();
        return r.length === 0;
      });
    } finally {
      await Promise.all([w1.stop(), w2.stop()]);
      await otherDeps.db.close();
    }
    const repeated = [...rx.requestsByKey.entries()].filter(([, c]) => c !== 1);
    assert.deepEqual(repeated, [], 'every idempotency key was POSTed exactly once');
    assert.equal(rx.requestsByKey.size, N);
    const attempts = await deps.db.kysely.selectFrom('delivery_attempts').select(['delivery_id', 'outcome', 'worker']).where('delivery_id', 'in', ids).execute();
    assert.equal(attempts.length, N);
    assert.ok(attempts.every((a) => a.outcome === 'accepted'));
  });

  it('an outcome is applied only while the claim holds: not after the lease was taken over, nor after a cancel', async () => {
    const id = (await enqueue(deps, { chain: ['webhook'], destinations: { webhook: 'lease' }, payload: { text: 'lease' }, idempotencyKey: 'lease-1', orgId }))!;
    const [a] = await claimDue(deps, 'w-a', 1, 200);
    assert.equal(a.id, id);
    assert.deepEqual(await claimDue(deps, 'w-b', 1, 60_000), [], 'a held lease is not claimed');
    const b = await until('the lease of w-a to end and w-b to claim the row', async () => (await claimDue(deps, 'w-b', 1, 60_000))[0]);
    assert.equal(b.id, id);
    assert.equal(await recordOutcome(deps, a, { outcome: 'accepted', providerRef: 'late-a' }, 'w-a', 1), false);
    let d = await row(deps, id);
    assert.deepEqual([d.state, d.locked_by, d.provider_ref], ['sending', 'w-b', null]);
    await cancelDelivery(deps, String(id), { orgId, by: 'test' });
    assert.equal(await recordOutcome(deps, b, { outcome: 'accepted', providerRef: 'late-b' }, 'w-b', 1), false);
    d = await row(deps, id);
    assert.equal(d.state, 'cancelled');
    assert.deepEqual((await attemptsOf(deps, id)).map((x) => [x.worker, x.provider_ref]), [['w-a', 'late-a'], ['w-b', 'late-b']], 'both attempts are recorded');
  });

  it('a worker killed with SIGKILL mid-attempt loses nothing, and the provider sends the message once', async () => {
    const to = '+15550003333';
    const key = 'killed-1';
    sms.decide = (t) => (t === to ? 'take-and-hang' : null);
    const id = (await enqueue(deps, { chain: ['sms'], destinations: { sms: to }, payload: { text: 'Survive a crash' }, idempotencyKey: key, orgId }))!;

    const dataDir = mkdtempSync(join(tmpdir(), 'parley-worker-'));
    let child: ChildProcess | null = spawn(process.execPath, ['bin/parley.js', 'start', '--roles', 'worker'], {
      env: {
        ...process.env,
        DATABASE_URL: deps.config.databaseUrl,
        PARLEY_DOMAINS: 'alpha.test',
        PARLEY_DATA_DIR: dataDir,
        PARLEY_DELIVERY_LEASE_MS: '2500',
        PARLEY_LOG_LEVEL: 'silent',
        PARLEY_DNS_OFFLINE: '1',
      },
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let stderr = '';
    child.stderr!.on('data', (c) => (stderr += c));
    const exited = new Promise<NodeJS.Signals | number | null>((resolve) => child!.once('exit', (code, sig) => resolve(sig ?? code)));
    try {
      // The child worker has sent the SMS and waits for the gateway's answer: kill it there.
      await Promise.race([
        sms.waitFor('the child worker’s attempt', () => (sms.requestsByKey.get(`${key}:sms`) ?? 0) >= 1, 60_000),
        exited.then((how) => {
          throw new Error(`the worker process exited (${how}) before attempting: ${stderr}`);
        }),
      ]);
      const claimed = await untilRow(deps, id, 'claimed by the child', (r) => r.state === 'sending');
      assert.match(claimed.locked_by ?? '', /^w-\d+-/);
      child.kill('SIGKILL');
      assert.equal(await exited, 'SIGKILL');
      child = null;
    } finally {
      child?.kill('SIGKILL');
      rmSync(dataDir, { recursive: true, force: true });
    }
    assert.equal(sms.messages.filter((m) => m.to === to).length, 1, 'the gateway took the message before the worker died');

    const w = await startDeliveryWorker(deps, { name: 'w-after', pollMs: 50 });
    try {
      const d = await untilRow(deps, id, 'sent after the lease ended', (r) => r.state === 'sent');
      const taken = sms.messages.filter((m) => m.to === to);
      assert.equal(taken.length, 1, 'no second SMS: the repeat carried the same idempotency key');
      assert.equal(sms.requestsByKey.get(`${key}:sms`), 2, 'the gateway was asked twice');
      assert.equal(d.provider_ref, taken[0].sid);
      assert.equal(d.attempts, 2, 'the lost attempt counts');
      const attempts = await attemptsOf(deps, id);
      assert.deepEqual(attempts.map((a) => [a.worker, a.outcome]), [['w-after', 'accepted']]);
    } finally {
      await w.stop();
      sms.decide = null;
    }
  });
});
