import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { sql } from 'kysely';
import { startTestPlatform, type ApiClient, type TestPlatform } from '../support/platform.ts';
import { waitUntil } from '../support/federation.ts';
import { federationOf } from '../../src/federation/runtime.ts';

/**
 * The allow/deny lists govern outbound traffic too (issue 3 §9; docs/federation.md, "Abuse
 * controls"): two real platforms in this process with their federation workers, alpha.test
 * (A) and beta.test (B). Once A denies B, A pushes nothing to B, proposes nothing to it and
 * fetches none of its keys; its link and proposal wait with `platform_denied`, and resume
 * when the lists let B in again.
 */
describe('outbound deny list: a platform sends nothing to a platform it denies', () => {
  let A: TestPlatform;
  let B: TestPlatform;
  let alice: ApiClient;
  let bob: ApiClient;
  let keysServer: Server;
  let keyFetches = 0;

  before(async () => {
    keysServer = createServer((req, res) => {
      keyFetches++;
      res.statusCode = 404;
      res.end();
    });
    await new Promise<void>((r) => keysServer.listen(0, '127.0.0.1', r));
    [A, B] = await Promise.all([startTestPlatform({}, ['web', 'worker']), startTestPlatform({ domains: ['beta.test'] }, ['web', 'worker'])]);
    const routes = { 'alpha.test': A.base, 'beta.test': B.base, 'keys.test': `http://127.0.0.1:${(keysServer.address() as AddressInfo).port}` };
    A.config.federationRoutes = routes;
    B.config.federationRoutes = routes;
    alice = await A.user('alice@alpha.test');
    bob = await B.user('bob@beta.test');
  });
  after(async () => {
    await Promise.all([A?.stop(), B?.stop()]);
    keysServer?.close();
  });

  const ok = (r: { status: number; body: any }, status = 200) => {
    assert.equal(r.status, status, JSON.stringify(r.body));
    return r.body;
  };
  /** The ids of conversation `key` stored on `p` (null: it does not have it). */
  const idsOn = async (p: TestPlatform, key: string) => {
    const db = p.platform.deps.db.kysely;
    const row = await db.selectFrom('conversations').select('id').where('key', '=', key).executeTakeFirst();
    if (!row) return null;
    return (await db.selectFrom('actions').select('id').where('conv_id', '=', row.id).orderBy('id').execute()).map((r) => r.id);
  };
  const lastIdOn = async (p: TestPlatform, key: string) => (await idsOn(p, key))?.at(-1) ?? 0;
  /** Signed requests B verified (each leaves a nonce in its replay store). */
  const requestsTo = async (p: TestPlatform) => Number((await sql<{ n: string }>`select count(*) as n from federation_replay`.execute(p.platform.deps.db.kysely)).rows[0].n);
  const link = async (key: string) =>
    (
      await sql<{ acked_id: number; last_error: string | null }>`
        select l.acked_id, l.last_error from federation_links l join conversations c on c.id = l.conv_id
         where c.key = ${key} and l.platform = 'beta.test'`.execute(A.platform.deps.db.kysely)
    ).rows[0];

  it('pushes, proposals and key fetches to a denied platform are not made; links and proposals wait with platform_denied, then resume', async () => {
    // Before the deny: A leads `led` with bob, B leads `byB` with alice; both replicate.
    const led = ok(await alice.post('/api/conversations', { subject: 'Led by alpha', participants: ['bob@beta.test'], messages: [{ body: 'one' }] }), 201).key as string;
    const byB = ok(await bob.post('/api/conversations', { subject: 'Led by beta', participants: ['alice@alpha.test'], messages: [{ body: 'uno' }] }), 201).key as string;
    const ledLast = await lastIdOn(A, led);
    await waitUntil('B to hold the conversation led by A', async () => (await lastIdOn(B, led)) === ledLast);
    const byBLast = await lastIdOn(B, byB);
    await waitUntil('A to hold the conversation led by B', async () => (await lastIdOn(A, byB)) === byBLast);

    A.config.federationDeny = ['beta.test', 'keys.test'];
    const seenByB = await requestsTo(B);

    // A push: the new message waits on A's link, with the reason, and never reaches B.
    const msg = ok(await alice.post(`/api/conversations/${led}/actions`, { actions: [{ act: 'message:add', body: 'while beta is denied' }] })).actions[0];
    const waiting = await waitUntil('the link to beta.test to wait with platform_denied', async () => {
      const l = await link(led);
      return l?.last_error?.startsWith('platform_denied') ? l : null;
    });
    assert.equal(waiting?.acked_id, ledLast, 'nothing after the deny is acked');
    // A new conversation with bob: its link waits too; B never hears of it.
    const fresh = ok(await alice.post('/api/conversations', { subject: 'After the deny', participants: ['bob@beta.test'], messages: [{ body: 'hi' }] }), 201).key as string;
    await waitUntil('the new link to beta.test to wait with platform_denied', async () => (await link(fresh))?.last_error?.startsWith('platform_denied'));

    // A proposal to the denied leader: pending, with the reason, and B's log does not move.
    const posted = await alice.post(`/api/conversations/${byB}/actions`, { actions: [{ act: 'message:add', body: 'to a denied leader' }] });
    assert.equal(posted.status, 202, JSON.stringify(posted.body));
    const pending = ok(await alice.get(`/api/conversations/${byB}`)).pending;
    assert.equal(pending.length, 1);
    assert.equal(pending[0].state, 'pending');
    assert.match(pending[0].last_error, /^platform_denied/);

    // Keys of a denied platform are not fetched: its key ids resolve to nothing.
    assert.equal(await federationOf(A.platform.deps).resolveKey('keys.test#0123456789abcdef'), null);
    assert.equal(keyFetches, 0, 'no request for the keys of a denied platform');

    // B received nothing: no new signed request, no new action, no new conversation.
    assert.equal(await requestsTo(B), seenByB, 'no signed request reached beta.test');
    assert.equal(await lastIdOn(B, led), ledLast);
    assert.equal(await lastIdOn(B, byB), byBLast);
    assert.equal(await idsOn(B, fresh), null);

    // The lists change: the waiting link and proposal go out (nothing was dropped).
    A.config.federationDeny = [];
    await waitUntil('B to receive the message that waited', async () => (await lastIdOn(B, led)) >= msg.id, 60_000);
    await waitUntil('B to receive the conversation created meanwhile', async () => (await idsOn(B, fresh)) !== null, 60_000);
    await waitUntil('the proposal to be applied by B', async () => (await lastIdOn(B, byB)) === byBLast + 1, 60_000);
    assert.equal(await federationOf(A.platform.deps).resolveKey('keys.test#0123456789abcdef'), null);
    assert.equal(keyFetches, 1, 'allowed again: its keys are fetched');
  });
});
