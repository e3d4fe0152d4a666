import { after, afterEach, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import type { Deps } from '../../src/context.ts';
import { onInboundReply, type InboundReply } from '../../src/delivery/inbound.ts';
import type { DeliveryPlugin } from '../../src/delivery/plugin.ts';
import { knownPlugins, registerPlugin } from '../../src/delivery/registry.ts';
import { type DeliveryWorker, startDeliveryWorker } from '../../src/delivery/worker.ts';
import { closeSmtpTransports } from '../../src/mail/outbound/smtp-plugin.ts';
import { type TestPlatform, startTestPlatform } from '../support/platform.ts';
import { getFreePort } from '../support/postfix.ts';
import { type SmtpSink, startSmtpSink } from '../support/smtp-sink.ts';
import { attemptsOf, createOrg, enqueue, eventsOf, row, untilRow } from './support/deps.ts';
import { type FakeSms, startFakeSms } from './support/fake-sms.ts';
import { type WebhookReceiver, startWebhookReceiver } from './support/webhook-receiver.ts';

/**
 * Issue 4 §2–3: servicechains and per-recipient state, end to end through real workers, a
 * real web role (hook routes), a fake SMS gateway, a webhook receiver and an SMTP sink.
 */
describe('servicechains, fallback and receipts', () => {
  let tp: TestPlatform;
  let deps: Deps;
  let sms: FakeSms;
  let rx: WebhookReceiver;
  let sink: SmtpSink;
  let orgId: number;
  let worker: DeliveryWorker | null = null;
  let n = 0;
  const marker = () => `m${Date.now().toString(36)}${++n}`;
  const phone = () => `+1555${String(1_000_000 + n * 7919).slice(-7)}`;
  const start = async (opts: Parameters<typeof startDeliveryWorker>[1] = {}) => {
    worker = await startDeliveryWorker(deps, { pollMs: 50, ...opts });
    return worker;
  };

  before(async () => {
    sms = await startFakeSms();
    rx = await startWebhookReceiver();
    sink = await startSmtpSink();
    const port = await getFreePort();
    tp = await startTestPlatform({ httpPort: port, baseUrl: `http://127.0.0.1:${port}`, relayUrl: `smtp://127.0.0.1:${sink.port}` }, ['web']);
    deps = tp.platform.deps;
    orgId = await createOrg(deps, 'acme', {
      sms: { base_url: sms.baseUrl, account: sms.account, token: sms.token, from: '+15550001000' },
      webhook: { url: rx.url, secret: rx.secret },
    });
  });
  afterEach(async () => {
    await worker?.stop();
    worker = null;
    sms.mode = 'accept';
    sms.decide = null;
  });
  after(async () => {
    closeSmtpTransports();
    await tp?.stop();
    await sms?.close();
    await rx?.close();
    await sink?.close();
  });

  it('[sms, smtp]: a number the gateway refuses is reached by email, once, with the reason recorded', async () => {
    const m = marker();
    const to = phone();
    sms.decide = (t) => (t === to ? 'permanent' : null);
    const id = (await enqueue(deps, { chain: ['sms', 'smtp'], destinations: { sms: to, smtp: 'ann@remote.test' }, payload: { text: `Hello ${m}`, subject: 'Hi' }, idempotencyKey: `k-${m}`, orgId }))!;
    await start();
    const d = await untilRow(deps, id, 'sent by email', (r) => r.plugin === 'smtp' && r.state === 'sent');
    assert.equal(d.chain_index, 1);
    assert.equal(d.idempotency_key, `k-${m}:smtp`);
    const mails = sink.messages.filter((x) => x.raw.toString('latin1').includes(m));
    assert.equal(mails.length, 1);
    assert.deepEqual(mails[0].rcptTo, ['ann@remote.test']);
    assert.equal(sms.messages.filter((x) => x.to === to).length, 0);
    const attempts = await attemptsOf(deps, id);
    assert.deepEqual(attempts.map((a) => [a.plugin, a.outcome]), [['sms', 'failed'], ['smtp', 'accepted']]);
    assert.match(attempts[0].error!, /not a valid phone number/);
    const fallback = (await eventsOf(deps, id)).find((e) => e.kind === 'fallback');
    assert.equal(fallback?.detail.from.plugin, 'sms');
    assert.equal(fallback?.detail.to.plugin, 'smtp');
    assert.ok(d.sent_at);
  });

  it('moves on when the retries run out, after exactly the policy’s attempts with one key', async () => {
    const m = marker();
    const to = phone();
    sms.decide = (t) => (t === to ? 'transient' : null);
    const id = (await enqueue(deps, { chain: ['sms', 'smtp'], destinations: { sms: to, smtp: 'bea@remote.test' }, payload: { text: `Retry ${m}` }, idempotencyKey: `k-${m}`, orgId }))!;
    await start({ policies: { sms: { maxAttempts: 3, baseMs: 10, capMs: 20 } } });
    const d = await untilRow(deps, id, 'sent by email', (r) => r.plugin === 'smtp' && r.state === 'sent');
    const attempts = await attemptsOf(deps, id);
    assert.deepEqual(attempts.map((a) => [a.plugin, a.outcome]), [['sms', 'retry'], ['sms', 'retry'], ['sms', 'retry'], ['smtp', 'accepted']]);
    assert.equal(sms.requestsByKey.get(`k-${m}:sms`), 3);
    assert.match(d.last_error ?? (await eventsOf(deps, id)).find((e) => e.kind === 'fallback')!.detail.reason, /gave up after 3 attempts/);
    assert.equal(sink.messages.filter((x) => x.raw.toString('latin1').includes(m)).length, 1);
  });

  it('falls back when a sent SMS is not delivered in time; a delivered one stays', async () => {
    const delivered = marker();
    const toB = phone();
    const idB = (await enqueue(deps, { chain: ['sms', 'smtp'], destinations: { sms: toB, smtp: 'cat@remote.test' }, payload: { text: `B ${delivered}` }, idempotencyKey: `k-${delivered}`, orgId, fallback: { notDeliveredS: 1 } }))!;
    await start();
    const sentB = await untilRow(deps, idB, 'B sent by SMS', (r) => r.state === 'sent');
    assert.ok(sentB.fallback_at, 'a fallback deadline is set while not delivered');
    const receipt = await sms.postStatus(sentB.provider_ref!, 'delivered');
    assert.equal(receipt.status, 200, receipt.body);
    const b = await row(deps, idB);
    assert.equal(b.state, 'delivered');
    assert.equal(b.fallback_at, null);

    const late = marker();
    const toA = phone();
    const idA = (await enqueue(deps, { chain: ['sms', 'smtp'], destinations: { sms: toA, smtp: 'dan@remote.test' }, payload: { text: `A ${late}` }, idempotencyKey: `k-${late}`, orgId, fallback: { notDeliveredS: 1 } }))!;
    const a = await untilRow(deps, idA, 'A fell back to email', (r) => r.plugin === 'smtp' && r.state === 'sent');
    const ev = (await eventsOf(deps, idA)).find((e) => e.kind === 'fallback');
    assert.match(ev!.detail.reason, /not delivered within 1 s/);
    assert.equal(a.chain_index, 1);
    assert.equal(sms.messages.filter((x) => x.to === toA).length, 1, 'the SMS went once');
    assert.equal(sink.messages.filter((x) => x.raw.toString('latin1').includes(late)).length, 1, 'and the email once');
    const b2 = await row(deps, idB);
    assert.equal(b2.state, 'delivered');
    assert.equal(b2.plugin, 'sms');
  });

  it('SMS receipts and replies: signed ones advance the state and reach the reply handler; forged ones get 401 and change nothing', async () => {
    const m = marker();
    const to = phone();
    const replies: InboundReply[] = [];
    const off = onInboundReply(async (_tx, _deps, r) => {
      replies.push(r);
    });
    try {
      const id = (await enqueue(deps, { chain: ['sms'], destinations: { sms: to }, payload: { text: `Ask ${m}` }, idempotencyKey: `k-${m}`, orgId }))!;
      await start();
      const sent = await untilRow(deps, id, 'sent', (r) => r.state === 'sent');
      const sid = sent.provider_ref!;
      assert.equal(sms.messages.find((x) => x.sid === sid)?.statusCallback, `${deps.config.baseUrl}/api/delivery/hooks/sms?org=${orgId}`);

      const forged = await sms.postStatus(sid, 'delivered', { sign: false });
      assert.equal(forged.status, 401);
      assert.equal(JSON.parse(forged.body).error.code, 'bad_signature');
      assert.equal((await row(deps, id)).state, 'sent');
      assert.equal((await eventsOf(deps, id)).length, 0);

      assert.equal((await sms.postStatus(sid, 'delivered')).status, 200);
      const d = await row(deps, id);
      assert.equal(d.state, 'delivered');
      assert.ok(d.delivered_at);

      const reply = await sms.postReply(sid, to, `Yes please ${m}`);
      assert.equal(reply.status, 200, reply.body);
      const r = await row(deps, id);
      assert.equal(r.state, 'replied');
      assert.ok(r.replied_at);
      assert.equal(replies.length, 1);
      assert.equal(replies[0].deliveryId, id);
      assert.equal(replies[0].orgId, orgId);
      assert.equal(replies[0].from, to);
      assert.equal(replies[0].text, `Yes please ${m}`);
      assert.deepEqual((await eventsOf(deps, id)).map((e) => e.kind), ['delivered', 'replied']);
    } finally {
      off();
    }
  });

  it('an SMS the gateway later reports undelivered moves on to email', async () => {
    const m = marker();
    const to = phone();
    const id = (await enqueue(deps, { chain: ['sms', 'smtp'], destinations: { sms: to, smtp: 'eve@remote.test' }, payload: { text: `Undelivered ${m}` }, idempotencyKey: `k-${m}`, orgId }))!;
    await start();
    const sent = await untilRow(deps, id, 'sent', (r) => r.state === 'sent' && r.plugin === 'sms');
    assert.equal((await sms.postStatus(sent.provider_ref!, 'undelivered', { errorCode: '30005' })).status, 200);
    await untilRow(deps, id, 'sent by email', (r) => r.plugin === 'smtp' && r.state === 'sent');
    assert.equal(sink.messages.filter((x) => x.raw.toString('latin1').includes(m)).length, 1);
    const evs = await eventsOf(deps, id);
    assert.deepEqual(evs.map((e) => e.kind), ['failed', 'fallback']);
    assert.match(evs[1].detail.reason, /30005/);
  });

  it('webhook: signed JSON with the idempotency key; receipts need a valid, fresh signature of the organisation', async () => {
    const m = marker();
    const id = (await enqueue(deps, { chain: ['webhook'], destinations: { webhook: 'contact-42' }, payload: { text: `Hook ${m}`, contact: { id: '42', name: 'Ann' } }, idempotencyKey: `k-${m}`, orgId }))!;
    await start();
    const sent = await untilRow(deps, id, 'sent', (r) => r.state === 'sent');
    const got = rx.kept.find((k) => k.body.text === `Hook ${m}`)!;
    assert.equal(got.key, `k-${m}:webhook`);
    assert.deepEqual(
      { delivery_id: got.body.delivery_id, idempotency_key: got.body.idempotency_key, destination: got.body.destination, contact: got.body.contact },
      { delivery_id: String(id), idempotency_key: `k-${m}:webhook`, destination: 'contact-42', contact: { id: '42', name: 'Ann' } },
    );
    assert.equal(sent.provider_ref, got.id);

    const base = tp.base;
    const none = await rx.postEvent(base, 'acme', { event: 'read', delivery_id: String(id) }, { sign: 'none' });
    const bad = await rx.postEvent(base, 'acme', { event: 'read', delivery_id: String(id) }, { sign: 'bad' });
    const stale = await rx.postEvent(base, 'acme', { event: 'read', delivery_id: String(id) }, { t: Math.floor(Date.now() / 1000) - 3600 });
    const otherOrg = await rx.postEvent(base, 'nobody', { event: 'read', delivery_id: String(id) });
    assert.deepEqual([none.status, bad.status, stale.status, otherOrg.status], [401, 401, 401, 401]);
    const malformed = await rx.postEvent(base, 'acme', null, { raw: '{"event": "opened"' });
    assert.equal(malformed.status, 400);
    const unknownEvent = await rx.postEvent(base, 'acme', { event: 'opened', delivery_id: String(id) });
    assert.equal(unknownEvent.status, 400);
    assert.equal(unknownEvent.body.error.code, 'invalid_event');
    const missing = await rx.postEvent(base, 'acme', { event: 'read', delivery_id: '999999' });
    assert.equal(missing.status, 404);
    assert.equal((await row(deps, id)).state, 'sent');
    assert.equal((await eventsOf(deps, id)).length, 0);

    const ok = await rx.postEvent(base, 'acme', { event: 'read', delivery_id: String(id) });
    assert.equal(ok.status, 200);
    const d = await row(deps, id);
    assert.equal(d.state, 'read');
    assert.ok(d.read_at && d.delivered_at);
    const unknownPlugin = await fetch(`${base}/api/delivery/hooks/pigeon`, { method: 'POST', body: '{}', headers: { 'content-type': 'application/json' } });
    assert.equal(unknownPlugin.status, 404);
  });

  it('a plugin that fails validation is disabled: its rows move on with the reason, it is never called', async () => {
    let calls = 0;
    const broken: DeliveryPlugin = {
      ...knownPlugins().get('parley')!,
      name: 'carrier-pigeon',
      needsConfig: false,
      async validate(_d, config) {
        if (config === undefined) throw new Error('no pigeons in the loft');
      },
      async send() {
        calls++;
        return { outcome: 'accepted' };
      },
    };
    const unregister = registerPlugin(broken);
    try {
      const m = marker();
      const id = (await enqueue(deps, { chain: ['carrier-pigeon', 'smtp'], destinations: { 'carrier-pigeon': 'ann@alpha.test', smtp: 'fay@remote.test' }, payload: { text: `Pigeon ${m}` }, idempotencyKey: `k-${m}`, orgId }))!;
      const w = await start();
      assert.equal(w.disabled.get('carrier-pigeon'), 'no pigeons in the loft');
      await untilRow(deps, id, 'sent by email', (r) => r.plugin === 'smtp' && r.state === 'sent');
      assert.equal(calls, 0);
      const [first] = await attemptsOf(deps, id);
      assert.match(first.error!, /disabled: no pigeons in the loft/);
    } finally {
      unregister();
    }
  });

  it('enqueue refuses unknown plugins, invalid numbers and bad chains with a 4xx and writes nothing; a repeated key is a no-op', async () => {
    const count = async () => Number((await deps.db.kysely.selectFrom('deliveries').select((eb) => eb.fn.countAll().as('n')).executeTakeFirstOrThrow()).n);
    const before = await count();
    const cases: [Parameters<typeof enqueue>[1], string][] = [
      [{ chain: ['sms', 'fax'], destinations: { sms: '+15550009999' }, payload: {}, idempotencyKey: 'x1', orgId }, 'unknown_plugin'],
      [{ chain: ['sms'], destinations: { sms: '07700 900123' }, payload: {}, idempotencyKey: 'x2', orgId }, 'invalid_destination'],
      [{ chain: ['smtp'], destinations: { smtp: 'not an address' }, payload: {}, idempotencyKey: 'x3', orgId }, 'invalid_destination'],
      [{ chain: ['sms', 'sms'], destinations: { sms: '+15550009999' }, payload: {}, idempotencyKey: 'x4', orgId }, 'invalid_chain'],
      [{ chain: [], destinations: {}, payload: {}, idempotencyKey: 'x5', orgId }, 'invalid_chain'],
      [{ chain: ['sms'], destinations: { sms: '+15550009999' }, payload: {}, idempotencyKey: '', orgId }, 'invalid_idempotency_key'],
      [{ chain: ['sms'], destinations: { sms: '+15550009999' }, payload: {}, idempotencyKey: 'x6', orgId, fallback: { notDeliveredS: -1 } }, 'invalid_fallback'],
    ];
    for (const [input, code] of cases) {
      await assert.rejects(enqueue(deps, input), (e: any) => e.status === 400 && e.code === code, code);
    }
    assert.equal(await count(), before);

    const input = { chain: ['sms', 'smtp'], destinations: { smtp: 'gus@remote.test' }, payload: { text: 'x' }, idempotencyKey: `k-${marker()}`, orgId };
    const id = await enqueue(deps, input);
    assert.ok(id);
    assert.equal(await enqueue(deps, input), null);
    const d = await row(deps, id!);
    assert.equal(d.plugin, 'smtp', 'the sms step is skipped: no phone number');
    assert.equal(d.chain_index, 1);

    const nowhere = (await enqueue(deps, { chain: ['sms'], destinations: {}, payload: {}, idempotencyKey: `k-${marker()}`, orgId }))!;
    const dead = await row(deps, nowhere);
    assert.equal(dead.state, 'failed');
    assert.match(dead.last_error!, /no destination/);
  });
});
