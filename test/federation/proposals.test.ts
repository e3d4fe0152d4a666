import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { sql } from 'kysely';
import { startTestPlatform, type TestPlatform } from '../support/platform.ts';
import { waitUntil } from '../support/federation.ts';
import { type FederationWorker, startFederationWorker } from '../../src/federation/pusher.ts';

/**
 * Leader sequencing on a moved head (issue 3 §4), made deterministic: two real platforms in
 * this process, where the leader (alpha.test) pushes only while the test runs its federation
 * worker. With the worker stopped, beta.test's head goes stale and its proposals meet
 * `409 stale_head`: the follower takes the missing actions from the answer, re-checks its
 * user's intent on the new head, and proposes again — or refuses the user when the intent no
 * longer holds.
 */
describe('proposals to a leader whose head moved', () => {
  let A: TestPlatform;
  let B: TestPlatform;
  before(async () => {
    [A, B] = await Promise.all([startTestPlatform({}, ['web']), startTestPlatform({ domains: ['beta.test'] }, ['web'])]);
    const routes = { 'alpha.test': A.base, 'beta.test': B.base };
    A.config.federationRoutes = routes;
    B.config.federationRoutes = routes;
  });
  after(async () => {
    await Promise.all([A?.stop(), B?.stop()]);
  });

  const log = async (p: TestPlatform, key: string) =>
    (await sql<{ id: number; hash: string }>`select a.id, a.hash from actions a join conversations c on c.id = a.conv_id where c.key = ${key} order by a.id`.execute(p.platform.deps.db.kysely)).rows;

  it('rebuilds on the new head and is numbered after the actions it missed; a follows overtaken meanwhile is the user’s 409', async () => {
    const alice = await A.user('alice@alpha.test');
    const bob = await B.user('bob@beta.test');
    const created = await alice.post('/api/conversations', { subject: 'Stale heads', participants: ['bob@beta.test'], messages: [{ body: 'one' }] });
    assert.equal(created.status, 201, JSON.stringify(created.body));
    const key = created.body.key;
    let pusher: FederationWorker | null = await startFederationWorker(A.platform.deps);
    await waitUntil('beta.test to have the conversation', async () => (await bob.get(`/api/conversations/${key}`)).status === 200);
    await pusher.stop();
    pusher = null;

    // The leader moves on; beta.test does not hear of it (nobody pushes).
    const a2 = await alice.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'message:add', body: 'two, from alpha' }] });
    assert.equal(a2.status, 200);
    const onBBefore = await log(B, key);
    assert.equal(onBBefore.length, a2.body.actions[0].id - 1, 'beta.test is one action behind');

    // bob's proposal was built on the stale head: stale_head, rebuilt, numbered after a2.
    const b1 = await bob.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'message:add', body: 'three, from beta' }] });
    assert.equal(b1.status, 200, JSON.stringify(b1.body));
    assert.equal(b1.body.actions[0].id, a2.body.actions[0].id + 1);
    assert.equal(b1.body.actions[0].prev, a2.body.actions[0].hash);
    assert.deepEqual(await log(B, key), await log(A, key), 'beta.test took the missed action from the answer');

    // alice changes the subject; bob, still on the old head, edits it too: his follows is stale.
    const subjectHead = (await bob.get(`/api/conversations/${key}`)).body.subject_head;
    const renamed = await alice.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'subject:modify', follows: subjectHead, body: 'Renamed on alpha' }] });
    assert.equal(renamed.status, 200);
    const refused = await bob.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'subject:modify', follows: subjectHead, body: 'Renamed on beta' }] });
    assert.equal(refused.status, 409, JSON.stringify(refused.body));
    assert.equal(refused.body.error.code, 'follows_not_head');
    const onA = (await alice.get(`/api/conversations/${key}`)).body;
    assert.equal(onA.subject, 'Renamed on alpha');
    assert.equal(onA.last_action_id, renamed.body.actions[0].id, 'nothing of the refused edit reached the leader');
    // The refusal is shown to bob as a failed proposal, and nothing is pending.
    const onB = (await bob.get(`/api/conversations/${key}`)).body;
    assert.deepEqual(onB.pending.map((p: any) => [p.state, p.error_code]), [['failed', 'follows_not_head']]);
    assert.equal(onB.subject, 'Renamed on alpha', 'beta.test stored the rename it was missing');
  });
});
