import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import type { Deps } from '../../src/context.ts';
import { type DeliveryWorker, startDeliveryWorker } from '../../src/delivery/worker.ts';
import { ApiClient, type TestPlatform, startTestPlatform } from '../support/platform.ts';
import { createApiToken, createOrg, enqueue, eventsOf, row, untilRow } from './support/deps.ts';
import { type FakeSms, startFakeSms } from './support/fake-sms.ts';

const run = promisify(execFile);

/**
 * Issue 4 §3: dead letters are listed, retried and cancelled through the API (API tokens with
 * the deliveries scopes, platform admins) and the CLI; a token without the scope gets 403
 * and changes nothing.
 */
describe('dead letters: API and CLI', () => {
  let tp: TestPlatform;
  let deps: Deps;
  let sms: FakeSms;
  let worker: DeliveryWorker;
  let acme: number;
  let other: number;
  let admin: ApiClient;
  let member: ApiClient;
  let reader: ApiClient;
  let writer: ApiClient;
  let otherWriter: ApiClient;
  const dead: number[] = [];

  before(async () => {
    sms = await startFakeSms();
    tp = await startTestPlatform({}, ['web']);
    deps = tp.platform.deps;
    const cfg = { sms: { base_url: sms.baseUrl, account: sms.account, token: sms.token, from: '+15550001000', status_callback: false } };
    acme = await createOrg(deps, 'acme', cfg);
    other = await createOrg(deps, 'other', cfg);
    admin = await tp.user('root@alpha.test');
    await deps.db.kysely.updateTable('users').set({ is_admin: true }).where('address', '=', 'root@alpha.test').execute();
    member = await tp.user('joe@alpha.test');
    reader = new ApiClient(tp.base, await createApiToken(deps, acme, ['deliveries:read']), 'reader');
    writer = new ApiClient(tp.base, await createApiToken(deps, acme, ['deliveries:read', 'deliveries:write']), 'writer');
    otherWriter = new ApiClient(tp.base, await createApiToken(deps, other, ['deliveries:read', 'deliveries:write']), 'other');

    sms.mode = 'permanent';
    worker = await startDeliveryWorker(deps, { pollMs: 50 });
    for (let i = 0; i < 3; i++) dead.push((await enqueue(deps, { chain: ['sms'], destinations: { sms: `+1555000400${i}` }, payload: { text: `dead ${i}` }, idempotencyKey: `dead-${i}`, orgId: acme }))!);
    dead.push((await enqueue(deps, { chain: ['sms'], destinations: { sms: '+15550004009' }, payload: { text: 'other' }, idempotencyKey: 'dead-other', orgId: other }))!);
    for (const id of dead) await untilRow(deps, id, 'failed', (r) => r.state === 'failed');
  });
  after(async () => {
    await worker?.stop();
    await tp?.stop();
    await sms?.close();
  });

  it('lists an organisation’s dead letters to its token, every one to a platform admin, paged', async () => {
    const r = await reader.get('/api/deliveries/failed');
    assert.equal(r.status, 200, JSON.stringify(r.body));
    assert.deepEqual(r.body.items.map((d: any) => Number(d.id)).sort(), dead.slice(0, 3).sort());
    assert.match(r.body.items[0].last_error, /not a valid phone number/);
    assert.deepEqual(r.body.items[0].chain, ['sms']);

    const p1 = await admin.get('/api/deliveries/failed?limit=3');
    assert.equal(p1.status, 200);
    assert.equal(p1.body.items.length, 3);
    assert.ok(p1.body.next_cursor);
    const p2 = await admin.get(`/api/deliveries/failed?limit=3&cursor=${encodeURIComponent(p1.body.next_cursor)}`);
    assert.equal(p2.body.items.length, 1);
    assert.equal(p2.body.next_cursor, null);
    assert.deepEqual([...p1.body.items, ...p2.body.items].map((d: any) => Number(d.id)).sort(), [...dead].sort());
    assert.equal((await admin.get('/api/deliveries/failed?org=other')).body.items.length, 1);

    const one = await reader.get(`/api/deliveries/${dead[0]}`);
    assert.equal(one.status, 200);
    assert.deepEqual(one.body.attempts.map((a: any) => a.outcome), ['failed']);
    assert.deepEqual(one.body.events.map((e: any) => e.kind), ['fallback']);
    assert.equal((await reader.get(`/api/deliveries/${dead[3]}`)).status, 404, 'another organisation’s delivery');
  });

  it('refuses callers without the right: 401, 403 with the missing scope, and changes nothing', async () => {
    assert.equal((await new ApiClient(tp.base, null, 'anon').get('/api/deliveries/failed')).status, 401);
    const m = await member.get('/api/deliveries/failed');
    assert.equal(m.status, 403);
    assert.equal(m.body.error.code, 'not_admin');
    const r = await reader.post(`/api/deliveries/${dead[0]}/retry`);
    assert.equal(r.status, 403);
    assert.equal(r.body.error.code, 'insufficient_scope');
    const c = await reader.post(`/api/deliveries/${dead[0]}/cancel`);
    assert.equal(c.status, 403);
    const wrongOrg = await otherWriter.post(`/api/deliveries/${dead[0]}/cancel`);
    assert.equal(wrongOrg.status, 404);
    assert.equal((await row(deps, dead[0])).state, 'failed');
    assert.equal((await new ApiClient(tp.base, 'pat_not-a-token', 'x').get('/api/deliveries/failed')).status, 401);
    assert.equal((await admin.get('/api/deliveries/failed?cursor=bogus')).status, 400);
  });

  it('retry puts a dead letter back at its failed step, and it is sent; cancel removes one', async () => {
    sms.mode = 'accept';
    const r = await writer.post(`/api/deliveries/${dead[0]}/retry`, { from: 'failed_step' });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    assert.equal(r.body.state, 'pending');
    const d = await untilRow(deps, dead[0], 'sent after retry', (x) => x.state === 'sent');
    assert.equal(d.idempotency_key, 'dead-0:sms');
    assert.equal(sms.messages.filter((x) => x.key === 'dead-0:sms').length, 1);
    assert.deepEqual((await eventsOf(deps, dead[0])).map((e) => e.kind), ['fallback', 'retried']);

    const again = await writer.post(`/api/deliveries/${dead[0]}/retry`);
    assert.equal(again.status, 409);
    assert.equal(again.body.error.code, 'not_failed');
    const sentCancel = await writer.post(`/api/deliveries/${dead[0]}/cancel`);
    assert.equal(sentCancel.status, 409);
    assert.equal(sentCancel.body.error.code, 'not_cancellable');

    const c = await admin.post(`/api/deliveries/${dead[1]}/cancel`);
    assert.equal(c.status, 200);
    assert.equal(c.body.state, 'cancelled');
    const list = await reader.get('/api/deliveries/failed');
    assert.deepEqual(list.body.items.map((x: any) => Number(x.id)), [dead[2]]);
  });

  it('the CLI lists, retries and cancels the same way', async () => {
    const env = { ...process.env, DATABASE_URL: deps.config.databaseUrl, PARLEY_DOMAINS: 'alpha.test', PARLEY_DATA_DIR: deps.config.dataDir, PARLEY_LOG_LEVEL: 'silent' };
    const cli = (...args: string[]) => run(process.execPath, ['bin/parley.js', 'deliveries', ...args], { env });
    const listed = await cli('failed', '--json', '--org', 'acme');
    assert.deepEqual(listed.stdout.trim().split('\n').map((l) => Number(JSON.parse(l).id)), [dead[2]]);
    const cancelled = await cli('cancel', String(dead[2]));
    assert.match(cancelled.stdout, new RegExp(`delivery ${dead[2]} cancelled`));
    assert.equal((await row(deps, dead[2])).state, 'cancelled');
    await assert.rejects(cli('retry', String(dead[2])), (e: any) => e.code === 2 && /only failed deliveries/.test(e.stderr));
  });
});
