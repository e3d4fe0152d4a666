import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { type ApiClient, type TestPlatform, startTestPlatform } from '../support/platform.ts';

describe('two users converse and see each other live over the websocket', () => {
  let tp: TestPlatform;
  let alice: ApiClient;
  let bob: ApiClient;
  let eve: ApiClient;
  before(async () => {
    tp = await startTestPlatform();
    alice = await tp.user('alice@alpha.test');
    bob = await tp.user('bob@alpha.test');
    eve = await tp.user('eve@alpha.test');
  });
  after(async () => tp.stop());

  it('delivers every new action to participants, nothing to others, and resumes from a cursor', async () => {
    const aliceWs = await alice.websocket();
    const bobWs = await bob.websocket();
    const eveWs = await eve.websocket();

    const created = await alice.post('/api/conversations', { subject: 'Plans', participants: ['bob@alpha.test'], messages: [{ body: 'Hi Bob' }] });
    assert.equal(created.status, 201);
    const key = created.body.key;
    const publish = await bobWs.waitFor((f) => f.type === 'event' && f.conv === key && f.action?.act === 'conv:publish');
    assert.equal(publish.action.actor, 'alice@alpha.test');

    const reply = await bob.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'message:add', body: 'Hi Alice' }] });
    assert.equal(reply.status, 200);
    const seenByAlice = await aliceWs.waitFor((f) => f.type === 'event' && f.action?.id === reply.body.actions[0].id);
    assert.equal(seenByAlice.action.body, 'Hi Alice');
    assert.equal(seenByAlice.action.hash, reply.body.actions[0].hash);

    // Bob's own action is in his stream too.
    await bobWs.waitFor((f) => f.type === 'event' && f.action?.id === reply.body.actions[0].id);
    // Bob disconnects, Alice writes twice, Bob reconnects with his last cursor: exactly the missed events.
    const lastSeq = bobWs.frames.filter((f) => f.type === 'event').at(-1).seq;
    bobWs.close();
    const m1 = await alice.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'message:add', body: 'one' }] });
    const m2 = await alice.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'message:add', body: 'two' }] });
    const back = await bob.websocket(lastSeq);
    await back.waitFor((f) => f.type === 'event' && f.action?.id === m2.body.actions[0].id);
    const missed = back.frames.filter((f) => f.type === 'event');
    assert.deepEqual(missed.map((f) => f.action.id), [m1.body.actions[0].id, m2.body.actions[0].id]);
    assert.deepEqual(missed.map((f) => f.seq), [lastSeq + 1, lastSeq + 2]);

    // The same events through the polling endpoint.
    const page = await bob.get(`/api/events?cursor=${lastSeq}`);
    assert.deepEqual(page.body.events.map((e: any) => e.action.id), [m1.body.actions[0].id, m2.body.actions[0].id]);

    // Eve, not a participant, received nothing about this conversation.
    const other = await eve.post('/api/conversations', { subject: 'Eve alone', messages: [{ body: 'note to self' }] });
    await eveWs.waitFor((f) => f.type === 'event' && f.conv === other.body.key);
    assert.equal(eveWs.frames.filter((f) => f.type === 'event' && f.conv === key).length, 0);
    for (const s of [aliceWs, back, eveWs]) s.close();
  });

  it('sends live exactly the events the stream holds, numbered alike, also when one transaction writes several for a user', async () => {
    const convs: string[] = [];
    for (let i = 0; i < 4; i++) {
      const c = await alice.post('/api/conversations', { subject: `Parallel ${i}`, participants: ['bob@alpha.test'], messages: [{ body: `start ${i}` }] });
      assert.equal(c.status, 201);
      convs.push(c.body.key);
    }
    const start = (await alice.get('/api/events?cursor=0&limit=1000')).body.events.at(-1).seq;
    const ws = await alice.websocket(start);
    // Concurrent appends to different conversations share group-commit transactions, each
    // writing several of Alice's events in one statement.
    const sent = await Promise.all(
      convs.flatMap((key, i) => [
        bob.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'message:add', body: `bob ${i}` }] }),
        alice.post(`/api/conversations/${convs[(i + 1) % convs.length]}/actions`, { actions: [{ act: 'message:add', body: `alice ${i}` }, { act: 'message:add', body: `alice ${i} again` }] }),
      ]),
    );
    for (const r of sent) assert.equal(r.status, 200);
    const expected = sent.reduce((n, r) => n + r.body.actions.length, 0);
    await ws.waitFor(() => ws.frames.filter((f) => f.type === 'event').length >= expected);
    const live = ws.frames.filter((f) => f.type === 'event').map(({ type: _type, ...e }) => e);
    const stored = (await alice.get(`/api/events?cursor=${start}&limit=1000`)).body.events;
    assert.equal(stored.length, expected);
    assert.deepEqual(live, stored);
    assert.deepEqual(live.map((e) => e.seq), Array.from({ length: expected }, (_, i) => start + 1 + i));
    ws.close();
  });

  it('sends nothing to a removed participant after the removal', async () => {
    const created = await alice.post('/api/conversations', { subject: 'Shrinking', participants: ['bob@alpha.test'], messages: [{ body: 'start' }] });
    const key = created.body.key;
    const bobAdd = created.body.actions.find((a: any) => a.act === 'participant:add').id;
    const bobWs = await bob.websocket();
    const rm = await alice.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'participant:remove', participant: 'bob@alpha.test', follows: bobAdd }] });
    assert.equal(rm.status, 200);
    await bobWs.waitFor((f) => f.type === 'event' && f.action?.act === 'participant:remove');
    const later = await alice.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'message:add', body: 'after' }] });
    // A marker event in Bob's own stream after Alice's write proves the stream moved past it.
    const mine = await bob.post('/api/conversations', { subject: 'marker', messages: [{ body: 'm' }] });
    await bobWs.waitFor((f) => f.type === 'event' && f.conv === mine.body.key);
    assert.equal(bobWs.frames.filter((f) => f.type === 'event' && f.action?.id === later.body.actions[0].id && f.conv === key).length, 0);
    bobWs.close();
  });

  it('rejects an unauthenticated websocket', async () => {
    const { default: WebSocket } = await import('ws');
    const ws = new WebSocket(`${tp.base.replace('http', 'ws')}/api/ws`);
    const code = await new Promise<number>((res) => ws.on('close', (c) => res(c)));
    assert.equal(code, 4401);
  });
});
