/**
 * A misbehaving peer written from docs/federation.md alone (issue 3, Done means 3).
 *
 * Everything this peer does on the wire — canonical JSON, action hashes, conversation keys,
 * action signatures, the keys document, RFC 9421 request signatures with Content-Digest — is
 * implemented here from the document, with node:crypto only: nothing from src/federation
 * or src/core is imported. It first checks itself against the document's worked examples,
 * then proves it can talk to a real platform (a signed ping, a valid push), then misbehaves:
 * each fault must get the documented status and leave nothing stored.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, createPrivateKey, generateKeyPairSync, randomBytes, sign, type KeyObject } from 'node:crypto';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { startTestPlatform, type ApiClient, type TestPlatform } from '../support/platform.ts';

// ---------------------------------------------------------------------------------------------
// The protocol, from docs/federation.md.

/** "Canonical JSON and the hash": RFC 8785 for the values actions contain. */
function canonical(v: unknown): string {
  if (v === null) return 'null';
  if (typeof v === 'boolean') return v ? 'true' : 'false';
  if (typeof v === 'number') {
    if (!Number.isInteger(v)) throw new Error('numbers are integers');
    return String(v);
  }
  if (typeof v === 'string') return JSON.stringify(v);
  if (Array.isArray(v)) return `[${v.map(canonical).join(',')}]`;
  const o = v as Record<string, unknown>;
  const keys = Object.keys(o)
    .filter((k) => o[k] !== undefined)
    .sort(); // UTF-16 code unit order
  return `{${keys.map((k) => `${JSON.stringify(k)}:${canonical(o[k])}`).join(',')}}`;
}

const sha256 = (data: string | Buffer) => createHash('sha256').update(data).digest();

/** `hash` = hex SHA-256 of the canonical JSON of the action without `hash` and `sig`. */
function hashOf(action: Record<string, unknown>): string {
  const { hash: _h, sig: _s, ...rest } = action;
  return sha256(canonical(rest)).toString('hex');
}

/** The conversation key: first 32 hex of SHA-256 of `<creator>\n<published_at>\n<subject>`. */
const convKey = (creator: string, ts: string, subject: string) => sha256(`${creator}\n${ts}\n${subject}`).toString('hex').slice(0, 32);

/** A platform's identity: Ed25519 key, keyid `<platform>#<first 16 hex of SHA-256(raw public key)>`. */
interface Identity {
  platform: string;
  keyId: string;
  privateKey: KeyObject;
  /** raw 32-byte public key, base64url without padding */
  publicKey: string;
}

function identity(platform: string, privateKey?: KeyObject): Identity {
  const priv = privateKey ?? generateKeyPairSync('ed25519').privateKey;
  const jwk = priv.export({ format: 'jwk' }) as { x: string };
  const id = sha256(Buffer.from(jwk.x, 'base64url')).toString('hex').slice(0, 16);
  return { platform, keyId: `${platform}#${id}`, privateKey: priv, publicKey: jwk.x };
}

/** `sig = <keyid> ":" base64url(Ed25519(key, UTF-8("parley-action-v1:" + hash)))`, no padding. */
const actionSig = (hash: string, who: Pick<Identity, 'keyId' | 'privateKey'>) =>
  `${who.keyId}:${sign(null, Buffer.from(`parley-action-v1:${hash}`, 'utf8'), who.privateKey).toString('base64url')}`;

/** Signs a request per "Signed requests": Content-Digest, Signature-Input and Signature. */
function signRequest(method: string, url: string, body: Buffer, who: Pick<Identity, 'keyId' | 'privateKey'>, opts: { created?: number; nonce?: string } = {}) {
  const digest = `sha-256=:${sha256(body).toString('base64')}:`;
  const created = opts.created ?? Math.floor(Date.now() / 1000);
  const nonce = opts.nonce ?? randomBytes(12).toString('base64url');
  const params = `("@method" "@target-uri" "content-digest");created=${created};keyid="${who.keyId}";alg="ed25519";nonce="${nonce}"`;
  const base = [`"@method": ${method.toUpperCase()}`, `"@target-uri": ${url}`, `"content-digest": ${digest}`, `"@signature-params": ${params}`].join('\n');
  const signature = sign(null, Buffer.from(base, 'utf8'), who.privateKey).toString('base64');
  return { 'content-digest': digest, 'signature-input': `parley=${params}`, signature: `parley=:${signature}:` };
}

type WireAction = Record<string, unknown> & { id: number; hash: string; prev: string | null; conv: string; actor: string; ts: string; act: string };

/** Builds a chain of actions continuing `prev` (or a new log), hashed and signed by `signer`. */
function chain(conv: string, from: { id: number; hash: string | null }, ts: string, signer: Identity, items: Record<string, unknown>[]): WireAction[] {
  const out: WireAction[] = [];
  let id = from.id;
  let prev = from.hash;
  for (const item of items) {
    const a = { conv, id: ++id, ts, prev, ...item } as WireAction;
    a.hash = hashOf(a);
    a.sig = actionSig(a.hash, signer);
    prev = a.hash;
    out.push(a);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------

describe('the peer implementation matches the worked examples of docs/federation.md', () => {
  const exampleKey = createPrivateKey(`-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIJ+DYvh6SEqVTm50DFtMDoQikTmiCqirVv9mWG9qfSnF\n-----END PRIVATE KEY-----\n`);
  const alpha = identity('alpha.example', exampleKey);

  it('key id, action hashes, conversation key and action signature', () => {
    assert.equal(alpha.publicKey, 'JrQLj5P_89iXES9-vFgrIy29clF9CC_oPPsw3c5D0bs');
    assert.equal(alpha.keyId, 'alpha.example#b16c2d1bead12626');
    const ts = '2026-01-15T09:30:00.000Z';
    const conv = convKey('alice@alpha.example', ts, 'Lunch?');
    assert.equal(conv, '83cb27b16e2b068ca8ba8505e3a34d9a');
    const [a1, a2] = chain(conv, { id: 0, hash: null }, ts, alpha, [
      { act: 'conv:create', actor: 'alice@alpha.example', body: 'Lunch?' },
      { act: 'participant:add', actor: 'alice@alpha.example', participant: 'bob@beta.example', perms: 'write' },
    ]);
    assert.equal(a1.hash, '3b34e082f45cc52418829698ccb7b81a1ad07250e2c35f601542b812a9494d58');
    assert.equal(a2.hash, '08f52f55b4e6a46ad198ef643a1c435212286d13beba40b737f9fbfd0fc00964');
    assert.equal(
      a1.sig,
      'alpha.example#b16c2d1bead12626:OAdSUjcfKBEDHkW9uGW_cCect72e2LKhaLwruSjQPvCHV6LTt_gTTOvKRupKcp-u3W32j71JPfmn0esw8lQRAQ',
    );
  });

  it('the request signature of the worked example', () => {
    const h = signRequest('POST', 'https://parley.beta.example/federation/v1/ping', Buffer.from('{"hello": "world"}'), alpha, { created: 1618884473, nonce: 'rfc9421-example-nonce' });
    assert.equal(h['content-digest'], 'sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:');
    assert.equal(h['signature-input'], 'parley=("@method" "@target-uri" "content-digest");created=1618884473;keyid="alpha.example#b16c2d1bead12626";alg="ed25519";nonce="rfc9421-example-nonce"');
    assert.equal(h.signature, 'parley=:fnsUbCpBYygVB6yhGe8BjmP1dlEd8DedJDwM9a8HXbgKrx+dKda2QBeDP8aAsURTooQeSGF9fod7K+d+tEvyDw==:');
  });
});

describe('a misbehaving peer against a real platform', () => {
  const PEER = 'peer.test';
  const me = identity(PEER);
  const impostor = identity(PEER); // same platform name and keyid form, a key the peer never published
  const impostorSameKeyId = { keyId: me.keyId, privateKey: impostor.privateKey };
  // Another platform, neither leading the peer's conversation nor (at first) with a user in it; its keys are served under /third.
  const third = identity('third.test');
  let server: Server;
  let peerUrl: string;
  let tp: TestPlatform;
  let alice: ApiClient;

  // The peer's own conversation, led by it, with alice@alpha.test as a participant.
  const ts = new Date(Date.now() - 1000).toISOString();
  const creator = `mallory@${PEER}`;
  const subject = 'From the peer';
  const conv = convKey(creator, ts, subject);
  let log: WireAction[] = [];
  /** The logs this peer serves (its conversations as it sent them), by key. */
  const logs = new Map<string, WireAction[]>();
  const head = () => ({ id: log.at(-1)!.id, hash: log.at(-1)!.hash });

  before(async () => {
    server = createServer((req, res) => {
      if (req.url === '/.well-known/parley/keys' || req.url === '/third/.well-known/parley/keys') {
        const who = req.url === '/.well-known/parley/keys' ? me : third;
        res.setHeader('content-type', 'application/json');
        res.end(
          JSON.stringify({
            platform: who.platform,
            keys: [{ key_id: who.keyId, alg: 'ed25519', public_key: who.publicKey, created_at: new Date(Date.now() - 86400_000).toISOString(), not_after: new Date(Date.now() + 86400_000).toISOString(), active: true }],
          }),
        );
        return;
      }
      // "Backfill" and the whole log (docs/federation.md): GET …/conversations/{key}/(actions|log)?since=N&limit=M.
      // This peer answers from its logs without checking the caller's signature.
      const url = new URL(req.url ?? '/', 'http://peer');
      const m = /^\/federation\/v1\/conversations\/([0-9a-f]{32})\/(actions|log)$/.exec(url.pathname);
      const own = m ? logs.get(m[1]) : undefined;
      if (req.method === 'GET' && own) {
        const since = Number(url.searchParams.get('since') ?? 0);
        const limit = Number(url.searchParams.get('limit') ?? 500);
        res.setHeader('content-type', 'application/json');
        res.end(JSON.stringify({ actions: own.filter((a) => a.id > since).slice(0, limit), last_id: own.at(-1)!.id }));
        return;
      }
      res.statusCode = 404;
      res.setHeader('content-type', 'application/json');
      res.end('{"error":{"code":"not_found","message":"nothing here"}}');
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    peerUrl = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
    tp = await startTestPlatform({ federationRoutes: { [PEER]: peerUrl, 'third.test': `${peerUrl}/third` } }, ['web']);
    alice = await tp.user('alice@alpha.test');
  });
  after(async () => {
    await tp?.stop();
    server?.close();
  });

  const send = async (method: string, path: string, body: unknown, who: Pick<Identity, 'keyId' | 'privateKey'> = me, raw?: Buffer) => {
    const url = tp.base + path;
    const bytes = raw ?? (body === undefined ? Buffer.alloc(0) : Buffer.from(JSON.stringify(body), 'utf8'));
    const headers: Record<string, string> = signRequest(method, url, bytes, who);
    if (body !== undefined || raw) headers['content-type'] = 'application/json';
    return request(method, url, headers, method === 'GET' ? undefined : bytes);
  };
  const request = async (method: string, url: string, headers: Record<string, string>, body?: Buffer) => {
    const r = await fetch(url, { method, headers, body: body as BodyInit | undefined });
    const text = await r.text();
    let json: any = null;
    try {
      json = JSON.parse(text);
    } catch {
      /* not JSON */
    }
    return { status: r.status, body: json, text };
  };
  const push = (actions: unknown[], who: Pick<Identity, 'keyId' | 'privateKey'> = me) => send('POST', `/federation/v1/conversations/${conv}/actions`, { actions }, who);

  /** What the platform stored of a conversation: its last id and the ids in `actions`. */
  const stored = async (key = conv) => {
    const db = tp.platform.deps.db.kysely;
    const row = await db.selectFrom('conversations').select(['id', 'last_id']).where('key', '=', key).executeTakeFirst();
    if (!row) return null;
    const ids = await db.selectFrom('actions').select('id').where('conv_id', '=', row.id).orderBy('id').execute();
    return { last_id: row.last_id, ids: ids.map((r) => r.id) };
  };
  const expectRefused = (r: { status: number; body: any; text: string }, status: number, code: string, reason?: string) => {
    assert.equal(r.status, status, r.text);
    assert.equal(r.body?.error?.code, code, r.text);
    if (reason !== undefined) assert.equal(r.body.error.details?.reason, reason, r.text);
  };

  it('is understood when it follows the protocol: a signed ping, and a push of its new conversation', async () => {
    const ping = await send('GET', '/federation/v1/ping', undefined);
    assert.equal(ping.status, 200, ping.text);
    assert.equal(ping.body.peer, PEER);
    assert.equal(ping.body.keyid, me.keyId);

    log = chain(conv, { id: 0, hash: null }, ts, me, [
      { act: 'conv:create', actor: creator, body: subject },
      { act: 'participant:add', actor: creator, participant: 'alice@alpha.test', perms: 'write' },
      { act: 'message:add', actor: creator, body: 'Hello from a platform written from the docs' },
      { act: 'conv:publish', actor: creator },
    ]);
    logs.set(conv, log);
    const r = await push(log);
    assert.equal(r.status, 200, r.text);
    assert.equal(r.body.last_id, 4);
    assert.deepEqual(await stored(), { last_id: 4, ids: [1, 2, 3, 4] });
    // alice sees it through the client API.
    const seen = await alice.get(`/api/conversations/${conv}`);
    assert.equal(seen.status, 200, JSON.stringify(seen.body));
    assert.equal(seen.body.subject, subject);
  });

  it('forged request signature: 401 bad_signature (a key it never published), 401 digest_mismatch (body changed after signing); nothing stored', async () => {
    const next = chain(conv, head(), new Date().toISOString(), me, [{ act: 'message:add', actor: creator, body: 'forged request' }]);
    expectRefused(await push(next, impostorSameKeyId), 401, 'bad_signature');
    // Signed for one body, sent with another.
    const url = `${tp.base}/federation/v1/conversations/${conv}/actions`;
    const signedFor = Buffer.from(JSON.stringify({ actions: [] }));
    const headers = { ...signRequest('POST', url, signedFor, me), 'content-type': 'application/json' };
    expectRefused(await request('POST', url, headers, Buffer.from(JSON.stringify({ actions: next }))), 401, 'digest_mismatch');
    // Signed for another URL (another conversation's path).
    const other = { ...signRequest('POST', `${tp.base}/federation/v1/ping`, Buffer.from(JSON.stringify({ actions: next })), me), 'content-type': 'application/json' };
    expectRefused(await request('POST', url, other, Buffer.from(JSON.stringify({ actions: next }))), 401, 'bad_signature');
    // An unknown key id of the peer.
    expectRefused(await push(next, impostor), 401, 'unknown_key');
    assert.deepEqual(await stored(), { last_id: 4, ids: [1, 2, 3, 4] });
  });

  it('forged action signature: 422 invalid_log (bad_signature; wrong_origin for a user of the receiver); nothing stored', async () => {
    const t = new Date().toISOString();
    const [forged] = chain(conv, head(), t, me, [{ act: 'message:add', actor: creator, body: 'sig by another key' }]);
    forged.sig = actionSig(forged.hash, impostorSameKeyId);
    expectRefused(await push([forged]), 422, 'invalid_log', 'bad_signature');
    assert.equal((await push([forged])).body.error.details.id, 5);
    // The peer speaking for alice, a user of the receiving platform, with its own valid key.
    const asAlice = chain(conv, head(), t, me, [{ act: 'message:add', actor: 'alice@alpha.test', body: 'I never wrote this' }]);
    expectRefused(await push(asAlice), 422, 'invalid_log', 'wrong_origin');
    // No signature at all.
    const [unsigned] = chain(conv, head(), t, me, [{ act: 'message:add', actor: creator, body: 'unsigned' }]);
    delete unsigned.sig;
    expectRefused(await push([unsigned]), 422, 'invalid_log', 'missing_signature');
    assert.deepEqual(await stored(), { last_id: 4, ids: [1, 2, 3, 4] });
  });

  it('tampered hash chain: 422 invalid_log (prev_mismatch, hash_mismatch); nothing of the batch is stored', async () => {
    const t = new Date().toISOString();
    // A well-formed, well-signed action whose prev is not the hash of action 4.
    const badPrev = chain(conv, { id: 4, hash: 'f'.repeat(64) }, t, me, [{ act: 'message:add', actor: creator, body: 'elsewhere' }]);
    expectRefused(await push(badPrev), 422, 'invalid_log', 'prev_mismatch');
    // A valid action 5, then action 6 altered after it was hashed and signed.
    const two = chain(conv, head(), t, me, [
      { act: 'message:add', actor: creator, body: 'fine' },
      { act: 'message:add', actor: creator, body: 'original' },
    ]);
    two[1].body = 'altered in transit';
    const r = await push(two);
    expectRefused(r, 422, 'invalid_log', 'hash_mismatch');
    assert.equal(r.body.error.details.id, 6);
    assert.deepEqual(await stored(), { last_id: 4, ids: [1, 2, 3, 4] }, 'the valid action 5 of the refused batch is not stored either');
  });

  it('actions for a conversation its users are not in: 403; nothing stored', async () => {
    // (a) A new conversation of the peer with nobody of the receiving platform in it.
    const t = new Date().toISOString();
    const lonelyKey = convKey(creator, t, 'Nobody of yours');
    const lonely = chain(lonelyKey, { id: 0, hash: null }, t, me, [
      { act: 'conv:create', actor: creator, body: 'Nobody of yours' },
      { act: 'participant:add', actor: creator, participant: `trent@${PEER}`, perms: 'write' },
      { act: 'conv:publish', actor: creator },
    ]);
    logs.set(lonelyKey, lonely); // asked for its whole log, the peer gives it: still nobody of the receiver's
    const r1 = await send('POST', `/federation/v1/conversations/${lonelyKey}/actions`, { actions: lonely });
    expectRefused(r1, 403, 'no_local_participant');
    assert.equal(await stored(lonelyKey), null);

    // (b) A conversation led by the receiving platform, without any user of the peer.
    const c = await alice.post('/api/conversations', { subject: 'Alpha only', participants: [], messages: [{ body: 'private' }] });
    assert.equal(c.status, 201, JSON.stringify(c.body));
    const theirs = await stored(c.body.key);
    const last = c.body.actions.at(-1);
    const [intrusion] = chain(c.body.key, { id: last.id, hash: last.hash }, new Date().toISOString(), me, [{ act: 'message:add', actor: creator, body: 'let me in' }]);
    // Pushed as if the peer led it …
    expectRefused(await send('POST', `/federation/v1/conversations/${c.body.key}/actions`, { actions: [intrusion] }), 403, 'not_leader');
    // … or proposed to its leader by a platform none of whose users takes part.
    const p = await send('POST', `/federation/v1/conversations/${c.body.key}/proposals`, { actions: [intrusion] });
    expectRefused(p, 422, 'invalid_log', 'rule_violation');
    assert.equal(p.body.error.details.code, 'not_participant', p.text);
    // Nor may it read that conversation.
    const backfill = await send('GET', `/federation/v1/conversations/${c.body.key}/actions?since=0`, undefined);
    assert.equal(backfill.status, 403, backfill.text);
    assert.deepEqual(await stored(c.body.key), theirs);
  });

  it('a replayed request: 401 replayed, applied once', async () => {
    const next = chain(conv, head(), new Date().toISOString(), me, [{ act: 'message:add', actor: creator, body: 'say it once' }]);
    const url = `${tp.base}/federation/v1/conversations/${conv}/actions`;
    const body = Buffer.from(JSON.stringify({ actions: next }));
    const headers = { ...signRequest('POST', url, body, me), 'content-type': 'application/json' };
    const first = await request('POST', url, headers, body);
    assert.equal(first.status, 200, first.text);
    log.push(...next);
    expectRefused(await request('POST', url, headers, body), 401, 'replayed');
    assert.deepEqual(await stored(), { last_id: 5, ids: [1, 2, 3, 4, 5] });
  });

  it('an oversized batch: 413 (more than 500 actions; a body over the federation limit); nothing stored', async () => {
    const t = new Date().toISOString();
    const many = chain(conv, head(), t, me, Array.from({ length: 501 }, (_, i) => ({ act: 'message:add', actor: creator, body: `n${i}` })));
    const r = await push(many);
    assert.equal(r.status, 413, r.text);
    assert.match(r.body.error.code, /^(batch_too_large|too_large)$/);
    const huge = chain(conv, head(), t, me, Array.from({ length: 11 }, () => ({ act: 'message:add', actor: creator, body: 'x'.repeat(1_000_000) })));
    const big = await push(huge);
    expectRefused(big, 413, 'too_large');
    assert.deepEqual(await stored(), { last_id: 5, ids: [1, 2, 3, 4, 5] });
  });

  it('a gapped push: 409 gap with the last id; a reordered push: 422 sequence_mismatch; nothing stored', async () => {
    const t = new Date().toISOString();
    const [a6, a7, a8] = chain(conv, head(), t, me, [
      { act: 'message:add', actor: creator, body: 'six' },
      { act: 'message:add', actor: creator, body: 'seven' },
      { act: 'message:add', actor: creator, body: 'eight' },
    ]);
    const gap = await push([a7, a8]);
    expectRefused(gap, 409, 'gap');
    assert.equal(gap.body.error.details.last_id, 5);
    const reordered = await push([a6, a8, a7]);
    expectRefused(reordered, 422, 'invalid_log', 'sequence_mismatch');
    assert.deepEqual(await stored(), { last_id: 5, ids: [1, 2, 3, 4, 5] });
    // In order, the same actions are taken: the refusals were about the faults, not the actions.
    const ok = await push([a6, a7, a8]);
    assert.equal(ok.status, 200, ok.text);
    log.push(a6, a7, a8);
    assert.deepEqual(await stored(), { last_id: 8, ids: [1, 2, 3, 4, 5, 6, 7, 8] });
  });

  it('an email participant’s action signed by a platform that neither leads nor has a user in the conversation: 422 invalid_log (wrong_origin); nothing stored', async () => {
    const t = new Date().toISOString();
    const zoe = 'zoe@nowhere.test'; // nowhere.test has no platform: an email participant
    // The leader adds zoe and bridges her email reply: taken.
    const bridged = chain(conv, head(), t, me, [
      { act: 'participant:add', actor: creator, participant: zoe, perms: 'write' },
      { act: 'message:add', actor: zoe, body: 'by email, bridged by the leader' },
    ]);
    const r = await push(bridged);
    assert.equal(r.status, 200, r.text);
    log.push(...bridged);
    const before = await stored();
    assert.equal(before?.last_id, 10);
    // The same kind of action signed, validly, by third.test: refused, nothing stored.
    const foreign = chain(conv, head(), t, third, [{ act: 'message:add', actor: zoe, body: 'by email, bridged by a stranger' }]);
    const refused = await push(foreign);
    expectRefused(refused, 422, 'invalid_log', 'wrong_origin');
    assert.equal(refused.body.error.details.id, 11, refused.text);
    assert.deepEqual(await stored(), before);
    // Once a user of third.test takes part, third.test may bridge her email (an email reply
    // received by a follower, proposed to the leader and signed by the follower).
    const [addTia] = chain(conv, head(), t, me, [{ act: 'participant:add', actor: creator, participant: 'tia@third.test', perms: 'write' }]);
    const viaFollower = chain(conv, { id: addTia.id, hash: addTia.hash }, t, third, [{ act: 'message:add', actor: zoe, body: 'by email, bridged by a follower' }]);
    const taken = await push([addTia, ...viaFollower]);
    assert.equal(taken.status, 200, taken.text);
    assert.equal((await stored())?.last_id, 12);
  });

  it('a multi-conversation push (POST /federation/v1/push): each entry answered as its own push — gapped, reordered and forged entries refused alone, the others stored; a malformed or oversized envelope refused whole', async () => {
    const t = new Date().toISOString();
    const pushMany = (entries: { key: string; actions: unknown[] }[], who: Pick<Identity, 'keyId' | 'privateKey'> = me) =>
      send('POST', '/federation/v1/push', { conversations: entries }, who);
    /** A new conversation of the peer with alice in it, as the peer would push it first. */
    const newConversation = (subject: string) => {
      const key = convKey(creator, t, subject);
      const actions = chain(key, { id: 0, hash: null }, t, me, [
        { act: 'conv:create', actor: creator, body: subject },
        { act: 'participant:add', actor: creator, participant: 'alice@alpha.test', perms: 'write' },
        { act: 'conv:publish', actor: creator },
      ]);
      logs.set(key, actions);
      return { key, actions };
    };
    const before = await stored();
    // The head of the peer's conversation as the platform holds it (earlier tests pushed actions outside `log`).
    const db = tp.platform.deps.db.kysely;
    const top = async () => {
      const row = await db.selectFrom('conversations').select(['id']).where('key', '=', conv).executeTakeFirstOrThrow();
      const a = await db.selectFrom('actions').select(['id', 'hash']).where('conv_id', '=', row.id).orderBy('id', 'desc').limit(1).executeTakeFirstOrThrow();
      return { id: a.id, hash: a.hash };
    };

    // Two conversations in one request: both stored, each answered with its last id, in request order.
    const second = newConversation('Second of the peer');
    const [next] = chain(conv, await top(), t, me, [{ act: 'message:add', actor: creator, body: 'with another conversation' }]);
    const ok = await pushMany([second, { key: conv, actions: [next] }]);
    assert.equal(ok.status, 200, ok.text);
    assert.deepEqual(ok.body.results, [
      { key: second.key, status: 200, last_id: 3 },
      { key: conv, status: 200, last_id: before!.last_id + 1 },
    ]);
    assert.deepEqual(await stored(second.key), { last_id: 3, ids: [1, 2, 3] });
    assert.equal((await stored())?.last_id, before!.last_id + 1);

    // A reordered entry, a gapped entry and a valid one in one request: only the valid one is stored.
    const third = newConversation('Third of the peer');
    const [x, y, z] = chain(conv, await top(), t, me, [
      { act: 'message:add', actor: creator, body: 'x' },
      { act: 'message:add', actor: creator, body: 'y' },
      { act: 'message:add', actor: creator, body: 'z' },
    ]);
    const secondNext = chain(second.key, { id: 3, hash: second.actions[2].hash }, t, me, [
      { act: 'message:add', actor: creator, body: 'four' },
      { act: 'message:add', actor: creator, body: 'five' },
    ]);
    const mixed = await pushMany([
      { key: conv, actions: [x, z, y] },
      { key: second.key, actions: [secondNext[1]] },
      third,
    ]);
    assert.equal(mixed.status, 200, mixed.text);
    const [reordered, gapped, fine] = mixed.body.results;
    assert.equal(reordered.key, conv);
    assert.equal(reordered.status, 422, mixed.text);
    assert.equal(reordered.error.code, 'invalid_log');
    assert.equal(reordered.error.details.reason, 'sequence_mismatch');
    assert.equal(gapped.key, second.key);
    assert.equal(gapped.status, 409, mixed.text);
    assert.equal(gapped.error.code, 'gap');
    assert.equal(gapped.error.details.last_id, 3);
    assert.deepEqual(fine, { key: third.key, status: 200, last_id: 3 });
    assert.equal((await stored())?.last_id, before!.last_id + 1, 'nothing of the reordered entry');
    assert.deepEqual(await stored(second.key), { last_id: 3, ids: [1, 2, 3] }, 'nothing of the gapped entry');
    assert.deepEqual(await stored(third.key), { last_id: 3, ids: [1, 2, 3] });

    // A forged action signature in one entry, a tampered chain in another, a valid third: only the third is stored.
    const [forged] = chain(conv, await top(), t, me, [{ act: 'message:add', actor: creator, body: 'forged in a multi push' }]);
    forged.sig = actionSig(forged.hash, impostorSameKeyId);
    const tampered = chain(third.key, { id: 3, hash: third.actions[2].hash }, t, me, [{ act: 'message:add', actor: creator, body: 'original' }]);
    tampered[0].body = 'altered';
    const signedRight = await pushMany([
      { key: conv, actions: [forged] },
      { key: third.key, actions: tampered },
      { key: second.key, actions: secondNext },
    ]);
    assert.equal(signedRight.status, 200, signedRight.text);
    const [f, tp2, s2] = signedRight.body.results;
    assert.deepEqual([f.status, f.error?.details?.reason], [422, 'bad_signature'], signedRight.text);
    assert.deepEqual([tp2.status, tp2.error?.details?.reason], [422, 'hash_mismatch'], signedRight.text);
    assert.deepEqual(s2, { key: second.key, status: 200, last_id: 5 });
    assert.equal((await stored())?.last_id, before!.last_id + 1);
    assert.deepEqual(await stored(third.key), { last_id: 3, ids: [1, 2, 3] });

    // The envelope: refused whole, nothing stored.
    const valid = chain(third.key, { id: 3, hash: third.actions[2].hash }, t, me, [{ act: 'message:add', actor: creator, body: 'valid, refused with its envelope' }]);
    const snapshot = async () => [await stored(), await stored(second.key), await stored(third.key)];
    const was = await snapshot();
    // A request signature by a key the peer never published.
    expectRefused(await pushMany([{ key: third.key, actions: valid }], impostorSameKeyId), 401, 'bad_signature');
    // The same conversation twice; an entry without actions; no conversations at all.
    expectRefused(await pushMany([{ key: third.key, actions: valid }, { key: third.key, actions: valid }]), 400, 'invalid_request');
    expectRefused(await send('POST', '/federation/v1/push', { conversations: [{ key: third.key }] }), 400, 'invalid_request');
    expectRefused(await send('POST', '/federation/v1/push', { conversations: [] }), 400, 'invalid_request');
    // More than 500 actions in all (each entry alone would be within the limit).
    const many = chain(conv, await top(), t, me, Array.from({ length: 251 }, (_, i) => ({ act: 'message:add', actor: creator, body: `m${i}` })));
    const more = chain(second.key, { id: 5, hash: secondNext[1].hash }, t, me, Array.from({ length: 250 }, (_, i) => ({ act: 'message:add', actor: creator, body: `n${i}` })));
    expectRefused(await pushMany([{ key: conv, actions: many }, { key: second.key, actions: more }]), 413, 'batch_too_large');
    // More than 100 conversations.
    const keys = Array.from({ length: 101 }, (_, i) => ({ key: convKey(creator, t, `k${i}`), actions: valid }));
    expectRefused(await pushMany(keys), 413, 'batch_too_large');
    // A body over the federation limit.
    const huge = chain(conv, await top(), t, me, Array.from({ length: 11 }, () => ({ act: 'message:add', actor: creator, body: 'x'.repeat(1_000_000) })));
    expectRefused(await pushMany([{ key: conv, actions: huge }]), 413, 'too_large');
    assert.deepEqual(await snapshot(), was);
  });
});
