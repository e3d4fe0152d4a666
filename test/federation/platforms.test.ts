import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { generateKeyPairSync } from 'node:crypto';
import { startTestPlatform, type TestPlatform } from '../support/platform.ts';
import { signRequest } from '../../src/federation/http-signatures.ts';
import { activeSigningKey, rotateKey } from '../../src/federation/keys.ts';
import { federationRequest, signedFetch } from '../../src/federation/client.ts';
import { signActionHash, verifyActionSignature, verifyLog } from '../../src/federation/action-signatures.ts';
import { federationOf, verifyReceivedLog } from '../../src/federation/runtime.ts';
import { type Action, hashAction } from '../../src/core/actions.ts';
import { createDiscovery } from '../../src/federation/discovery.ts';

/**
 * Two real platforms in this process (alpha.test and beta.test), each on its own database,
 * with static routes pointing at each other's HTTP port.
 */
describe('federation between two platforms: identity, signed requests, signed actions', () => {
  let A: TestPlatform;
  let B: TestPlatform;
  let ping: string;

  before(async () => {
    [A, B] = await Promise.all([startTestPlatform({}, ['web']), startTestPlatform({ domains: ['beta.test'] }, ['web'])]);
    // Ports are known only once both listen: the route table is read at each lookup.
    const routes = { 'alpha.test': A.base, 'beta.test': B.base };
    A.config.federationRoutes = routes;
    B.config.federationRoutes = routes;
    ping = `${B.base}/federation/v1/ping`;
  });
  after(async () => {
    await Promise.all([A?.stop(), B?.stop()]);
  });

  const errorCode = async (r: Response, status = 401) => {
    const text = await r.text();
    assert.equal(r.status, status, text);
    return JSON.parse(text).error.code as string;
  };

  // First, before B has fetched (and cached) alpha.test's keys.
  it('rotates keys: the old key verifies until its not_after, the new one signs, both are published', async () => {
    const old = await activeSigningKey(A.platform.deps);
    const before = Date.now();
    const { active, retired } = await rotateKey(A.platform.deps, { oldValidForMs: 120_000 });
    assert.equal(retired?.keyId, old.keyId);
    assert.notEqual(active.keyId, old.keyId);
    assert.ok(retired!.notAfter.getTime() >= before + 120_000 && retired!.notAfter.getTime() <= Date.now() + 120_000, 'the old key now expires in 120 s');

    const doc = await (await fetch(`${A.base}/.well-known/parley/keys`)).json();
    assert.equal(doc.platform, 'alpha.test');
    const byId = new Map(doc.keys.map((k: any) => [k.key_id, k]));
    assert.equal(doc.keys.length, 2);
    assert.equal((byId.get(active.keyId) as any).active, true);
    assert.equal((byId.get(old.keyId) as any).active, false);
    assert.equal((byId.get(old.keyId) as any).not_after, retired!.notAfter.toISOString());
    for (const k of doc.keys) {
      assert.equal(k.alg, 'ed25519');
      assert.equal(Buffer.from(k.public_key, 'base64url').length, 32);
    }

    const send = (key: { keyId: string; privateKey: any }, now: number) =>
      fetch(ping, { headers: signRequest({ method: 'GET', url: ping, keyId: key.keyId, privateKey: key.privateKey, now }) });
    const withOld = await send(old, Date.now());
    assert.equal(withOld.status, 200, await withOld.clone().text());
    assert.equal((await withOld.json()).keyid, old.keyId);
    // Within the clock-skew window but after the old key's not_after (now + 120 s).
    assert.equal(await errorCode(await send(old, Date.now() + 240_000)), 'unknown_key');

    const current = await activeSigningKey(A.platform.deps);
    assert.equal(current.keyId, active.keyId);
    const withNew = await send(current, Date.now());
    assert.equal(withNew.status, 200);
    assert.deepEqual(await withNew.json(), { platform: 'beta.test', peer: 'alpha.test', keyid: active.keyId });
  });

  it('signs and verifies requests both ways, found through the static routes, with and without a body', async () => {
    const ab = await federationRequest(A.platform.deps, 'beta.test', '/federation/v1/ping');
    assert.equal(ab?.status, 200);
    assert.deepEqual({ ...(await ab!.json()), keyid: undefined }, { platform: 'beta.test', peer: 'alpha.test', keyid: undefined });
    const ba = await federationRequest(B.platform.deps, 'alpha.test', '/federation/v1/ping', { json: { hello: 'wörld', n: [1, 2] } });
    assert.equal(ba?.status, 200);
    const body = await ba!.json();
    assert.equal(body.platform, 'alpha.test');
    assert.equal(body.peer, 'beta.test');
    assert.match(body.keyid, /^beta\.test#[0-9a-f]{16}$/);
    assert.deepEqual(body.body, { hello: 'wörld', n: [1, 2] });
    // The discovery document, as a well-known fallback would read it.
    const wk = await (await fetch(`${A.base}/.well-known/parley/platform`)).json();
    assert.deepEqual(wk, { platform: 'alpha.test', url: A.config.baseUrl, keys_url: `${A.config.baseUrl}/.well-known/parley/keys` });
    const viaWeb = createDiscovery({ routes: () => ({}), resolver: null, wellKnownUrl: () => `${A.base}/.well-known/parley/platform` });
    assert.deepEqual(await viaWeb.discover('alpha.test'), { domain: 'alpha.test', url: A.config.baseUrl, via: 'well-known', platform: 'alpha.test' });
    const openapi = await (await fetch(`${A.base}/api/openapi.json`)).json();
    for (const [path, method] of [['/federation/v1/ping', 'get'], ['/federation/v1/ping', 'post'], ['/.well-known/parley/keys', 'get'], ['/.well-known/parley/platform', 'get']])
      assert.deepEqual(openapi.paths[path]?.[method]?.tags, ['federation'], `${method} ${path} in the OpenAPI document`);
    // A domain with no platform (offline: static routes only) is a plain email domain.
    assert.equal(await federationRequest(A.platform.deps, 'nowhere.test', '/federation/v1/ping'), null);
  });

  it('refuses each bad request with 401 and the reason, before parsing the body', async () => {
    const key = await activeSigningKey(A.platform.deps);
    const body = JSON.stringify({ n: 1 });
    const signed = (o: { body?: string; now?: number; url?: string; keyId?: string; privateKey?: any } = {}) =>
      signRequest({ method: 'POST', url: o.url ?? ping, body: o.body ?? body, keyId: o.keyId ?? key.keyId, privateKey: o.privateKey ?? key.privateKey, now: o.now ?? Date.now() });
    const post = (headers: Record<string, string>, b = body) => fetch(ping, { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body: b });

    assert.equal(await errorCode(await post({})), 'missing_signature');
    const noDigest: Record<string, string> = { ...signed() };
    delete noDigest['content-digest'];
    assert.equal(await errorCode(await post(noDigest)), 'missing_signature');
    assert.equal(await errorCode(await post({ ...signed(), 'signature-input': 'parley=("@method" "@target-uri"' })), 'bad_signature_input');
    assert.equal(await errorCode(await post({ ...signed(), 'signature-input': signed()['signature-input'].replace(' "content-digest"', '') })), 'bad_signature_input');
    assert.equal(await errorCode(await post(signed({ now: Date.now() - 10 * 60_000 }))), 'clock_skew');
    assert.equal(await errorCode(await post(signed({ now: Date.now() + 10 * 60_000 }))), 'clock_skew');
    // Signed for one body, sent with another; and a body that is not even JSON.
    assert.equal(await errorCode(await post(signed(), JSON.stringify({ n: 2 }))), 'digest_mismatch');
    assert.equal(await errorCode(await post(signed(), '{not json')), 'digest_mismatch');

    const stranger = generateKeyPairSync('ed25519').privateKey;
    assert.equal(await errorCode(await post(signed({ keyId: 'alpha.test#0123456789abcdef', privateKey: stranger }))), 'unknown_key');
    assert.equal(await errorCode(await post(signed({ keyId: 'nowhere.test#0123456789abcdef', privateKey: stranger }))), 'unknown_key');
    // A forger claiming alpha.test's real key id, and a genuine signature for another URL.
    assert.equal(await errorCode(await post(signed({ privateKey: stranger }))), 'bad_signature');
    assert.equal(await errorCode(await post(signed({ url: `${ping}?x=1` }))), 'bad_signature');

    const once = signed();
    const first = await post(once);
    assert.equal(first.status, 200, await first.clone().text());
    assert.deepEqual((await first.json()).body, { n: 1 });
    assert.equal(await errorCode(await post(once)), 'replayed');

    // A verified request whose body is not JSON is a 400, not a 401.
    assert.equal(await errorCode(await post(signed({ body: '{not json' }), '{not json'), 400), 'invalid_json');
    // The replay memory is in PostgreSQL, where every process of the platform sees it.
    const rows = await B.platform.deps.db.kysely.selectFrom('federation_replay').select('id').execute();
    assert.ok(rows.length >= 4, `${rows.length} remembered signatures`);
  });

  it('signs every action made through the client API; the other platform verifies the log', async () => {
    const alice = await A.user('alice@alpha.test');
    const created = await alice.post('/api/conversations', { subject: 'Across platforms', participants: ['bob@beta.test'], messages: [{ body: 'first' }] });
    assert.equal(created.status, 201, JSON.stringify(created.body));
    const key = created.body.key;
    const msg = created.body.actions.find((a: any) => a.act === 'message:add').id;
    const more = await alice.post(`/api/conversations/${key}/actions`, {
      actions: [{ act: 'message:lock', follows: msg }, { act: 'message:modify', follows: msg + 2, body: 'first, edited' }, { act: 'message:add', body: 'second' }],
    });
    assert.equal(more.status, 200, JSON.stringify(more.body));
    const draft = await alice.post('/api/conversations', { subject: 'Draft first', participants: ['bob@beta.test'], messages: [{ body: 'd' }], publish: false });
    const published = await alice.post(`/api/conversations/${draft.body.key}/publish`);
    assert.equal(published.status, 200, JSON.stringify(published.body));

    const current = await activeSigningKey(A.platform.deps);
    for (const k of [key, published.body.key]) {
      const log: Action[] = (await alice.get(`/api/conversations/${k}?actions=true`)).body.actions;
      assert.ok(log.length >= 4, `${log.length} actions`);
      for (const a of log) assert.ok(a.sig?.startsWith(`${current.keyId}:`), JSON.stringify(a));
      // Verified on beta.test: keys fetched from alpha.test through discovery.
      const check = await verifyReceivedLog(B.platform.deps, log);
      assert.equal(check.ok, true, JSON.stringify(check));
      if (check.ok) assert.equal(check.state.header!.last_hash, log.at(-1)!.hash);
    }
  });

  it('verifyLog rejects a tampered body, a broken prev link, a forged or misplaced signature, and names the first bad action', async () => {
    const alice = await A.user('carol@alpha.test');
    const created = await alice.post('/api/conversations', { subject: 'Tamper', participants: ['dave@beta.test'], messages: [{ body: 'one' }, { body: 'two' }, { body: 'three' }] });
    const log: Action[] = created.body.actions;
    assert.equal(log.length, 6); // create, participant, 3 messages, publish
    const resolve = federationOf(B.platform.deps).resolveKey;
    const copy = () => log.map((a) => structuredClone(a));
    assert.equal((await verifyLog(copy(), resolve)).ok, true);

    const tampered = copy();
    tampered[2].body = 'ONE';
    tampered[4].body = 'THREE';
    assert.deepEqual(pick(await verifyLog(tampered, resolve)), { ok: false, id: 3, reason: 'hash_mismatch' });

    const rehashed = copy(); // the forger recomputes the hash: the origin signature no longer matches
    rehashed[2].body = 'ONE';
    rehashed[2].hash = hashAction(rehashed[2]);
    assert.deepEqual(pick(await verifyLog(rehashed, resolve)), { ok: false, id: 3, reason: 'bad_signature' });

    const relinked = copy();
    relinked[3].prev = log[1].hash;
    relinked[3].hash = hashAction(relinked[3]);
    assert.deepEqual(pick(await verifyLog(relinked, resolve)), { ok: false, id: 4, reason: 'prev_mismatch' });

    const dropped = copy();
    dropped.splice(3, 1);
    assert.deepEqual(pick(await verifyLog(dropped, resolve)), { ok: false, id: 5, reason: 'sequence_mismatch' });

    const forged = copy();
    const stranger = generateKeyPairSync('ed25519').privateKey;
    forged[1].sig = signActionHash(forged[1].hash, { keyId: log[1].sig!.split(':')[0], privateKey: stranger });
    assert.deepEqual(pick(await verifyLog(forged, resolve)), { ok: false, id: 2, reason: 'bad_signature' });
    const unsigned = copy();
    delete unsigned[0].sig;
    assert.deepEqual(pick(await verifyLog(unsigned, resolve)), { ok: false, id: 1, reason: 'missing_signature' });

    // A genuine signature does not make a log of another conversation key.
    const aKey0 = await activeSigningKey(A.platform.deps);
    const rekeyed = copy().map((a) => ({ ...a, conv: 'ffffffffffffffffffffffffffffffff' }));
    let prevHash: string | null = null;
    for (const a of rekeyed) {
      a.prev = prevHash;
      a.hash = hashAction(a);
      a.sig = signActionHash(a.hash, aKey0);
      prevHash = a.hash;
    }
    assert.deepEqual(pick(await verifyLog(rekeyed, resolve)), { ok: false, id: 1, reason: 'wrong_conversation' });

    // beta.test, with a genuine key of its own, signs an action of alpha.test's user:
    // the signature verifies, but beta.test may not speak for carol@alpha.test.
    const bKey = await activeSigningKey(B.platform.deps);
    const last = log.at(-1)!;
    const impersonation = { conv: last.conv, id: last.id + 1, act: 'message:add', actor: 'carol@alpha.test', body: 'I never wrote this', ts: last.ts, prev: last.hash } as Action;
    impersonation.hash = hashAction(impersonation);
    impersonation.sig = signActionHash(impersonation.hash, bKey);
    assert.equal((await verifyActionSignature(impersonation, federationOf(A.platform.deps).resolveKey)).ok, true);
    assert.deepEqual(pick(await verifyReceivedLog(A.platform.deps, [...copy(), impersonation])), { ok: false, id: 7, reason: 'wrong_origin' });

    // Correctly signed by alpha.test but against the rules: the reducer's verdict.
    const aKey = await activeSigningKey(A.platform.deps);
    const stale = { conv: last.conv, id: last.id + 1, act: 'message:modify', follows: 2, actor: 'carol@alpha.test', body: 'x', ts: last.ts, prev: last.hash } as Action;
    stale.hash = hashAction(stale);
    stale.sig = signActionHash(stale.hash, aKey);
    const r = await verifyReceivedLog(B.platform.deps, [...copy(), stale]);
    assert.deepEqual({ ...pick(r), code: (r as any).code }, { ok: false, id: 7, reason: 'rule_violation', code: 'follows_not_message' });

    // A continuation of a verified state: only the new actions are sent.
    const base = await verifyLog(copy().slice(0, 4), resolve);
    assert.ok(base.ok, 'the first four actions verify');
    assert.equal((await verifyLog(copy().slice(4), resolve, { from: base.state })).ok, true);
    assert.deepEqual(pick(await verifyLog(copy().slice(5), resolve, { from: base.state })), { ok: false, id: 6, reason: 'sequence_mismatch' });
    assert.equal(base.state.header!.last_id, 4, 'verifying a continuation does not change the base state');
  });

  it('sends signed requests with signedFetch to an explicit URL', async () => {
    const r = await signedFetch(B.platform.deps, `${A.base}/federation/v1/ping`, { json: { ok: true } });
    assert.equal(r.status, 200);
    assert.deepEqual((await r.json()).body, { ok: true });
  });
});

function pick(r: { ok: boolean; id?: number | null; reason?: string }) {
  return r.ok ? { ok: true } : { ok: false, id: r.id, reason: r.reason };
}
