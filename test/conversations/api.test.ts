import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { type ApiClient, type TestPlatform, startTestPlatform } from '../support/platform.ts';

describe('conversations over the client API', () => {
  let tp: TestPlatform;
  let alice: ApiClient;
  let bob: ApiClient;
  let carol: ApiClient;
  before(async () => {
    tp = await startTestPlatform();
    alice = await tp.user('alice@alpha.test');
    bob = await tp.user('bob@alpha.test');
    carol = await tp.user('carol@alpha.test');
  });
  after(async () => tp.stop());

  it('creates a published conversation that both participants see, hash-chained from 1', async () => {
    const r = await alice.post('/api/conversations', { subject: 'Lunch?', participants: ['bob@alpha.test'], messages: [{ body: 'Noon at the usual place?' }] });
    assert.equal(r.status, 201, JSON.stringify(r.body));
    const { key, actions } = r.body;
    assert.match(key, /^[0-9a-f]{32}$/);
    assert.deepEqual(actions.map((a: any) => a.act), ['conv:create', 'participant:add', 'message:add', 'conv:publish']);
    assert.deepEqual(actions.map((a: any) => a.id), [1, 2, 3, 4]);
    assert.equal(actions[0].prev, null);
    for (let i = 1; i < actions.length; i++) assert.equal(actions[i].prev, actions[i - 1].hash);

    const b = await bob.get(`/api/conversations/${key}`);
    assert.equal(b.status, 200);
    assert.equal(b.body.subject, 'Lunch?');
    assert.equal(b.body.messages[0].body, 'Noon at the usual place?');
    assert.equal(b.body.flags.inbox, true);
    assert.equal(b.body.flags.seen, false);

    const list = await bob.get('/api/conversations?folder=inbox');
    assert.equal(list.status, 200);
    assert.deepEqual(list.body.items.map((i: any) => i.key), [key]);
    const sent = await alice.get('/api/conversations?folder=sent');
    assert.deepEqual(sent.body.items.map((i: any) => i.key), [key]);

    const c = await carol.get(`/api/conversations/${key}`);
    assert.equal(c.status, 404);
    assert.equal(c.body.error.code, 'not_found');
  });

  it('enforces follows on the head and locks, with 409s', async () => {
    const r = await alice.post('/api/conversations', { subject: 'Edit me', participants: ['bob@alpha.test'], messages: [{ body: 'v1' }] });
    const key = r.body.key;
    const msgId = r.body.actions.find((a: any) => a.act === 'message:add').id;
    const lock = await bob.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'message:lock', follows: msgId }] });
    assert.equal(lock.status, 200, JSON.stringify(lock.body));
    const lockId = lock.body.actions[0].id;
    const stale = await alice.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'message:modify', follows: msgId, body: 'v2' }] });
    assert.equal(stale.status, 409);
    assert.equal(stale.body.error.code, 'follows_not_head');
    const locked = await alice.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'message:modify', follows: lockId, body: 'v2' }] });
    assert.equal(locked.status, 409);
    assert.equal(locked.body.error.code, 'locked');
    const edit = await bob.post(`/api/conversations/${key}/actions`, {
      actions: [
        { act: 'message:modify', follows: lockId, body: 'v2 by bob' },
        { act: 'message:release', follows: lockId + 1 },
      ],
    });
    assert.equal(edit.status, 200, JSON.stringify(edit.body));
    const got = await alice.get(`/api/conversations/${key}`);
    assert.equal(got.body.messages[0].body, 'v2 by bob');
    assert.equal(got.body.messages[0].lock, null);
  });

  it('drafts are private until published, and publishing drops deleted messages', async () => {
    const d = await alice.post('/api/conversations', { subject: 'Draft', participants: ['bob@alpha.test'], messages: [{ body: 'keep' }, { body: 'drop' }], publish: false });
    assert.equal(d.status, 201);
    assert.match(d.body.key, /^dft-/);
    assert.equal((await bob.get(`/api/conversations/${d.body.key}`)).status, 404);
    const dropId = d.body.actions.filter((a: any) => a.act === 'message:add')[1].id;
    const del = await alice.post(`/api/conversations/${d.body.key}/actions`, { actions: [{ act: 'message:delete', follows: dropId }] });
    assert.equal(del.status, 200, JSON.stringify(del.body));
    const p = await alice.post(`/api/conversations/${d.body.key}/publish`);
    assert.equal(p.status, 200, JSON.stringify(p.body));
    const got = await bob.get(`/api/conversations/${p.body.key}`);
    assert.equal(got.status, 200);
    assert.deepEqual(got.body.messages.map((m: any) => m.body), ['keep']);
    const again = await alice.post(`/api/conversations/${p.body.key}/publish`);
    assert.equal(again.status, 409);
  });

  it('a removed participant reads up to the removal, and gets 403 when acting', async () => {
    const r = await alice.post('/api/conversations', { subject: 'Team', participants: ['bob@alpha.test', { address: 'carol@alpha.test', perms: 'write' }], messages: [{ body: 'hello' }] });
    const key = r.body.key;
    const carolHead = r.body.actions.find((a: any) => a.act === 'participant:add' && a.participant === 'carol@alpha.test').id;
    const rm = await alice.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'participant:remove', participant: 'carol@alpha.test', follows: carolHead }] });
    assert.equal(rm.status, 200, JSON.stringify(rm.body));
    await alice.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'message:add', body: 'secret after removal' }] });
    const c = await carol.get(`/api/conversations/${key}`);
    assert.equal(c.status, 200);
    assert.deepEqual(c.body.messages.map((m: any) => m.body), ['hello']);
    const act = await carol.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'message:add', body: 'me again' }] });
    assert.equal(act.status, 403);
    assert.equal(act.body.error.code, 'removed');
  });

  it('answers bad input with 4xx JSON errors, never 500', async () => {
    const r = await alice.post('/api/conversations', { subject: 'x', participants: ['bob@alpha.test'], messages: [{ body: 'm' }] });
    const key = r.body.key;
    const bad = await alice.call('POST', `/api/conversations/${key}/actions`, '{"actions": [', { 'content-type': 'application/json' });
    assert.equal(bad.status, 400);
    assert.equal(bad.body.error.code, 'invalid_json');
    const unknown = await alice.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'message:add', body: 'x', colour: 'red' }] });
    assert.equal(unknown.status, 400);
    assert.equal(unknown.body.error.code, 'invalid_request');
    const huge = await alice.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'message:add', body: 'x'.repeat(2 * 1024 * 1024) }] });
    assert.equal(huge.status, 413);
    assert.equal(huge.body.error.code, 'too_large');
    const noAuth = await fetch(`${tp.base}/api/conversations`);
    assert.equal(noAuth.status, 401);
  });
});
