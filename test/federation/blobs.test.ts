import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { startTestPlatform, type ApiClient, type TestPlatform } from '../support/platform.ts';
import { signedFetch } from '../../src/federation/client.ts';
import { fetchMissingBlobs } from '../../src/federation/blobs.ts';
import { AppError } from '../../src/platform/errors.ts';
import type { Action } from '../../src/core/actions.ts';

/**
 * Attachments across platforms (issue 3 §7): two real platforms in this process, alpha.test
 * (A, where files are uploaded) and beta.test (B, which fetches them), plus a lying source.
 */
describe('federation blobs: GET /federation/v1/blobs/{sha256} and fetchMissingBlobs', () => {
  let A: TestPlatform;
  let B: TestPlatform;
  let alice: ApiClient;
  let liar: Server;
  /** What the lying source answers per sha256: bytes, or a status. */
  const lies = new Map<string, Buffer | number>();

  const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');
  const upload = async (bytes: Buffer) => {
    const r = await alice.call('POST', '/api/attachments', bytes, { 'content-type': 'application/pdf' });
    assert.equal(r.status, 201, JSON.stringify(r.body));
    assert.equal(r.body.sha256, sha(bytes));
    return { sha256: r.body.sha256 as string, name: 'report.pdf', content_type: 'application/pdf', size: bytes.length };
  };
  const create = async (participants: string[], files: unknown[]) => {
    const r = await alice.post('/api/conversations', { subject: 'Files', participants, messages: [{ body: 'see attached', files }] });
    assert.equal(r.status, 201, JSON.stringify(r.body));
    return r.body as { key: string; actions: Action[] };
  };
  const getBlob = (from: TestPlatform, shaHex: string) => signedFetch(from.platform.deps, `${A.base}/federation/v1/blobs/${shaHex}`);
  const appError = async (p: Promise<unknown>) => {
    try {
      await p;
    } catch (e) {
      if (e instanceof AppError) return e;
      throw e;
    }
    assert.fail('expected an AppError');
  };
  const storedOnB = async (shaHex: string) => ({
    file: B.platform.deps.blobs.has(shaHex),
    row: !!(await B.platform.deps.db.kysely.selectFrom('blobs').select('sha256').where('sha256', '=', shaHex).executeTakeFirst()),
  });

  before(async () => {
    liar = createServer((req, res) => {
      const m = /^\/federation\/v1\/blobs\/([0-9a-f]{64})$/.exec(req.url ?? '');
      const lie = m ? lies.get(m[1]) : undefined;
      if (lie === undefined || typeof lie === 'number') {
        res.statusCode = typeof lie === 'number' ? lie : 404;
        res.end();
        return;
      }
      res.setHeader('content-type', 'application/octet-stream');
      res.end(lie); // no Content-Length header is set: chunked
    });
    await new Promise<void>((r) => liar.listen(0, '127.0.0.1', r));
    [A, B] = await Promise.all([startTestPlatform({}, ['web']), startTestPlatform({ domains: ['beta.test'] }, ['web'])]);
    const routes = { 'alpha.test': A.base, 'beta.test': B.base, 'liar.test': `http://127.0.0.1:${(liar.address() as AddressInfo).port}` };
    A.config.federationRoutes = routes;
    B.config.federationRoutes = routes;
    alice = await A.user('alice@alpha.test');
    await A.user('carol@alpha.test');
  });
  after(async () => {
    await Promise.all([A?.stop(), B?.stop()]);
    liar?.close();
  });

  it('serves a blob to a platform whose user is in a conversation naming it, and nothing else', async () => {
    const bytes = randomBytes(70_000);
    const file = await upload(bytes);
    await create(['bob@beta.test'], [file]);
    const r = await getBlob(B, file.sha256);
    assert.equal(r.status, 200);
    assert.equal(r.headers.get('content-length'), String(bytes.length));
    assert.ok(Buffer.from(await r.arrayBuffer()).equals(bytes));

    // Attached only where no user of beta.test is.
    const privateFile = await upload(randomBytes(1000));
    await create(['carol@alpha.test'], [privateFile]);
    const hidden = await getBlob(B, privateFile.sha256);
    assert.equal(hidden.status, 404);
    assert.equal((await hidden.json()).error.code, 'not_found');
    // Uploaded, never attached; and unknown.
    const loose = await upload(randomBytes(1000));
    assert.equal((await getBlob(B, loose.sha256)).status, 404);
    assert.equal((await getBlob(B, '0'.repeat(64))).status, 404);
    // Unsigned.
    const unsigned = await fetch(`${A.base}/federation/v1/blobs/${file.sha256}`);
    assert.equal(unsigned.status, 401);
  });

  it('does not serve a file of a message added after the platform’s last user was removed', async () => {
    const { key } = await create(['bob@beta.test'], []);
    const removed = await alice.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'participant:remove', participant: 'bob@beta.test', follows: 2 }] });
    assert.equal(removed.status, 200, JSON.stringify(removed.body));
    const later = await upload(randomBytes(2000));
    const added = await alice.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'message:add', body: 'after bob left', files: [later] }] });
    assert.equal(added.status, 200, JSON.stringify(added.body));
    assert.equal((await getBlob(B, later.sha256)).status, 404);
  });

  it('fetchMissingBlobs fetches what is missing from the sender, checks it, stores file and row; once', async () => {
    const bytes = randomBytes(300_000);
    const file = await upload(bytes);
    const { actions } = await create(['bob@beta.test'], [file]);
    assert.deepEqual(await storedOnB(file.sha256), { file: false, row: false });
    const first = await fetchMissingBlobs(B.platform.deps, { platform: 'alpha.test' }, actions);
    assert.deepEqual(first, { fetched: [file.sha256], present: 0 });
    assert.deepEqual(await storedOnB(file.sha256), { file: true, row: true });
    const row = await B.platform.deps.db.kysely.selectFrom('blobs').selectAll().where('sha256', '=', file.sha256).executeTakeFirstOrThrow();
    assert.equal(Number(row.size), bytes.length);
    assert.equal(row.content_type, 'application/pdf');
    const chunks: Buffer[] = [];
    for await (const c of B.platform.deps.blobs.read(file.sha256)) chunks.push(c as Buffer);
    assert.ok(Buffer.concat(chunks).equals(bytes));
    assert.deepEqual(await fetchMissingBlobs(B.platform.deps, { platform: 'alpha.test' }, actions), { fetched: [], present: 1 });
  });

  it('falls back to the platform that signed the action when the sender does not have the file', async () => {
    const file = await upload(randomBytes(5000));
    const { actions } = await create(['bob@beta.test'], [file]);
    lies.set(file.sha256, 404);
    const r = await fetchMissingBlobs(B.platform.deps, { platform: 'liar.test' }, actions);
    assert.deepEqual(r.fetched, [file.sha256]);
    assert.deepEqual(await storedOnB(file.sha256), { file: true, row: true });
  });

  const tmpFiles = () => readdirSync(join(B.config.dataDir, 'blobs', 'tmp')).length;
  const actionNaming = (file: { sha256: string; size: number }): Action =>
    ({ conv: '0'.repeat(32), id: 5, act: 'message:add', actor: 'mallory@liar.test', ts: new Date().toISOString(), prev: null, hash: '0'.repeat(64), body: 'x', files: [{ ...file, name: 'x.bin', content_type: 'application/octet-stream' }] }) as Action;

  it('refuses other bytes than declared (422 invalid_blob) and keeps nothing', async () => {
    const real = randomBytes(4000);
    const declared = { sha256: sha(real), size: real.length };
    for (const [what, lie] of [
      ['same length, other bytes', randomBytes(4000)],
      ['longer than declared', Buffer.concat([real, Buffer.from('tail')])],
      ['shorter than declared', real.subarray(0, 3000)],
    ] as const) {
      lies.set(declared.sha256, lie);
      const e = await appError(fetchMissingBlobs(B.platform.deps, { platform: 'liar.test' }, [actionNaming(declared)]));
      assert.equal(e.status, 422, what);
      assert.equal(e.code, 'invalid_blob', what);
      assert.deepEqual(await storedOnB(declared.sha256), { file: false, row: false }, what);
      assert.equal(B.platform.deps.blobs.has(sha(lie)), false, `${what}: the wrong bytes are not kept under their own hash`);
      assert.equal(tmpFiles(), 0, `${what}: no temporary file left`);
    }
  });

  it('answers 503 blob_unavailable when no source has it, and 413 for a file larger than this platform takes', async () => {
    const missing = { sha256: sha(randomBytes(10)), size: 10 };
    lies.set(missing.sha256, 500);
    const e = await appError(fetchMissingBlobs(B.platform.deps, { platform: 'liar.test' }, [actionNaming(missing)]));
    assert.equal(e.status, 503);
    assert.equal(e.code, 'blob_unavailable');
    const huge = { sha256: sha(randomBytes(10)), size: B.config.maxAttachmentBytes + B.config.maxMessageBytes };
    const big = await appError(fetchMissingBlobs(B.platform.deps, { platform: 'liar.test' }, [actionNaming(huge)]));
    assert.equal(big.status, 413);
    const bad = await appError(fetchMissingBlobs(B.platform.deps, { platform: 'liar.test' }, [actionNaming({ sha256: 'nothex', size: 1 })]));
    assert.equal(bad.status, 400);
    assert.equal(bad.code, 'invalid_file');
  });
});

describe('files cross platforms with replication (issue 3 §7, through the replication hooks)', () => {
  let A: TestPlatform;
  let B: TestPlatform;
  let alice: ApiClient;
  let bob: ApiClient;

  before(async () => {
    [A, B] = await Promise.all([startTestPlatform({}, ['web', 'worker']), startTestPlatform({ domains: ['beta.test'] }, ['web', 'worker'])]);
    const routes = { 'alpha.test': A.base, 'beta.test': B.base };
    A.config.federationRoutes = routes;
    B.config.federationRoutes = routes;
    alice = await A.user('alice@alpha.test');
    bob = await B.user('bob@beta.test');
  });
  after(async () => {
    await Promise.all([A?.stop(), B?.stop()]);
  });

  /** Polls `fn` until it returns a value other than undefined (deadline 20 s). */
  const eventually = async <T>(fn: () => Promise<T | undefined>, what: string): Promise<T> => {
    const deadline = Date.now() + 20_000;
    for (;;) {
      const v = await fn();
      if (v !== undefined) return v;
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  };
  const download = async (who: ApiClient, sha256: string) => {
    const r = await fetch(`${who.base}/api/attachments/${sha256}`, { headers: { authorization: `Bearer ${who.token}` } });
    return { status: r.status, bytes: Buffer.from(await r.arrayBuffer()) };
  };

  it('a file attached on the leader reaches the replica with the message; one attached on the follower reaches the leader with the proposal', async () => {
    const first = randomBytes(50_000);
    const up = await alice.call('POST', '/api/attachments', first, { 'content-type': 'image/png' });
    assert.equal(up.status, 201);
    const file = { sha256: up.body.sha256, name: 'photo.png', content_type: 'image/png', size: first.length };
    const c = await alice.post('/api/conversations', { subject: 'Photos', participants: ['bob@beta.test'], messages: [{ body: 'look', files: [file] }] });
    assert.equal(c.status, 201, JSON.stringify(c.body));
    const key = c.body.key as string;

    // Replicated to B with its file: bob downloads it from his own platform.
    await eventually(async () => ((await bob.get(`/api/conversations/${key}`)).status === 200 ? true : undefined), 'the conversation on B');
    const onB = await download(bob, file.sha256);
    assert.equal(onB.status, 200);
    assert.ok(onB.bytes.equals(first));

    // bob answers from B with a file of his: proposed to A, which fetches it from B.
    const second = randomBytes(30_000);
    const up2 = await bob.call('POST', '/api/attachments', second, { 'content-type': 'application/pdf' });
    assert.equal(up2.status, 201);
    const file2 = { sha256: up2.body.sha256, name: 'answer.pdf', content_type: 'application/pdf', size: second.length };
    const reply = await bob.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'message:add', body: 'here is mine', files: [file2] }] });
    assert.equal(reply.status, 200, JSON.stringify(reply.body));
    const onA = await eventually(async () => {
      const d = await download(alice, file2.sha256);
      return d.status === 200 ? d : undefined;
    }, 'bob’s file on A');
    assert.ok(onA.bytes.equals(second));
  });
});
