import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { type ApiClient, type TestPlatform, startTestPlatform } from '../support/platform.ts';

/**
 * Property (issue 2, Done means 5): after any sequence of actions, folder and label counts
 * equal a recount from scratch. The recount applies the em2 folder rules (seed 000,
 * "Conversation Flags"), written here independently of src/core/folders.ts, to every
 * conversation the user can list.
 */
type Item = { key: string; creator: string; published: boolean; unseen: boolean; flags: { inbox: boolean; deleted: boolean; spam: boolean }; labels: number[] };

function recount(items: Item[], me: string) {
  const inFolder: Record<string, (i: Item) => boolean> = {
    inbox: (i) => i.flags.inbox && !i.flags.deleted && !i.flags.spam,
    draft: (i) => i.creator === me && !i.published && !i.flags.deleted,
    sent: (i) => i.creator === me && i.published && !i.flags.deleted,
    archive: (i) => !i.flags.inbox && !i.flags.spam && !i.flags.deleted && i.creator !== me,
    spam: (i) => i.flags.spam && !i.flags.deleted,
    deleted: (i) => i.flags.deleted,
  };
  const folders: Record<string, { total: number; unseen: number }> = {};
  for (const [f, pred] of Object.entries(inFolder)) {
    const xs = items.filter(pred);
    folders[f] = { total: xs.length, unseen: xs.filter((i) => i.unseen).length };
  }
  const labels: Record<string, { total: number; unseen: number }> = {};
  for (const i of items)
    for (const l of i.labels) {
      labels[l] ??= { total: 0, unseen: 0 };
      labels[l].total++;
      if (i.unseen) labels[l].unseen++;
    }
  return { folders, labels };
}

async function listAll(c: ApiClient): Promise<Item[]> {
  const out: Item[] = [];
  let cursor: string | null = null;
  do {
    const r: any = await c.get(`/api/conversations?limit=7${cursor ? `&cursor=${cursor}` : ''}`);
    assert.equal(r.status, 200);
    out.push(...r.body.items);
    cursor = r.body.next_cursor;
  } while (cursor);
  return out;
}

const USERS = ['alice@alpha.test', 'bob@alpha.test', 'carol@alpha.test'];
const FLAG_OPS = ['archive', 'inbox', 'delete', 'restore', 'spam', 'ham', 'mute', 'unmute', 'seen', 'unseen'];

const opArb = fc.oneof(
  fc.record({ kind: fc.constant('create' as const), by: fc.nat(2), with: fc.subarray([0, 1, 2]), publish: fc.boolean() }),
  fc.record({ kind: fc.constant('message' as const), by: fc.nat(2), conv: fc.nat(50) }),
  fc.record({ kind: fc.constant('flag' as const), by: fc.nat(2), conv: fc.nat(50), op: fc.constantFrom(...FLAG_OPS) }),
  fc.record({ kind: fc.constant('publish' as const), conv: fc.nat(50) }),
  fc.record({ kind: fc.constant('label' as const), by: fc.nat(2), conv: fc.nat(50), remove: fc.boolean() }),
  fc.record({ kind: fc.constant('dropLabel' as const), by: fc.nat(2) }),
  fc.record({ kind: fc.constant('leave' as const), by: fc.nat(2), conv: fc.nat(50) }),
  fc.record({ kind: fc.constant('seenAction' as const), by: fc.nat(2), conv: fc.nat(50) }),
);

describe('folder and label counts', () => {
  let tp: TestPlatform;
  const clients: ApiClient[] = [];
  const convs: string[] = [];
  const labels: Map<number, number[]> = new Map([[0, []], [1, []], [2, []]]);
  before(async () => {
    tp = await startTestPlatform({}, ['web']);
    for (const u of USERS) clients.push(await tp.user(u));
  });
  after(async () => tp.stop());

  it('always equal a recount from scratch, after any sequence of actions', async () => {
    let labelSeq = 0;
    await fc.assert(
      fc.asyncProperty(fc.array(opArb, { minLength: 1, maxLength: 25 }), async (ops) => {
        for (const op of ops) {
          const pick = (n: number) => convs[n % Math.max(1, convs.length)];
          switch (op.kind) {
            case 'create': {
              const participants = op.with.filter((i) => i !== op.by).map((i) => USERS[i]);
              const r = await clients[op.by].post('/api/conversations', { subject: `c${convs.length}`, participants, messages: [{ body: 'hi' }], publish: op.publish });
              assert.equal(r.status, 201, JSON.stringify(r.body));
              convs.push(r.body.key);
              break;
            }
            case 'message': {
              if (!convs.length) break;
              const r = await clients[op.by].post(`/api/conversations/${pick(op.conv)}/actions`, { actions: [{ act: 'message:add', body: 'more' }] });
              assert.ok([200, 403, 404].includes(r.status), JSON.stringify(r.body));
              break;
            }
            case 'seenAction': {
              if (!convs.length) break;
              const r = await clients[op.by].post(`/api/conversations/${pick(op.conv)}/actions`, { actions: [{ act: 'seen' }] });
              assert.ok([200, 403, 404].includes(r.status), JSON.stringify(r.body));
              break;
            }
            case 'flag': {
              if (!convs.length) break;
              const r = await clients[op.by].post(`/api/conversations/${pick(op.conv)}/flags`, { ops: [op.op] });
              assert.ok([200, 404].includes(r.status), JSON.stringify(r.body));
              break;
            }
            case 'publish': {
              if (!convs.length) break;
              const i = op.conv % convs.length;
              for (const c of clients) {
                const r = await c.post(`/api/conversations/${convs[i]}/publish`);
                if (r.status === 200) convs[i] = r.body.key;
                assert.ok([200, 404, 409].includes(r.status), JSON.stringify(r.body));
              }
              break;
            }
            case 'label': {
              if (!convs.length) break;
              let mine = labels.get(op.by)!;
              if (mine.length === 0) {
                const r = await clients[op.by].post('/api/labels', { name: `l${labelSeq++}` });
                assert.equal(r.status, 201);
                mine.push(r.body.id);
              }
              const body = op.remove ? { remove: [mine[0]] } : { add: [mine[mine.length - 1]] };
              const r = await clients[op.by].post(`/api/conversations/${pick(op.conv)}/labels`, body);
              assert.ok([200, 404].includes(r.status), JSON.stringify(r.body));
              mine = labels.get(op.by)!;
              break;
            }
            case 'dropLabel': {
              const mine = labels.get(op.by)!;
              const id = mine.shift();
              if (id !== undefined) assert.equal((await clients[op.by].call('DELETE', `/api/labels/${id}`)).status, 204);
              break;
            }
            case 'leave': {
              if (!convs.length) break;
              const key = pick(op.conv);
              const got = await clients[op.by].get(`/api/conversations/${key}`);
              if (got.status !== 200 || got.body.removed_id !== null || !got.body.published) break;
              const me = got.body.participants.find((p: any) => p.address === USERS[op.by]);
              const r = await clients[op.by].post(`/api/conversations/${key}/actions`, { actions: [{ act: 'participant:remove', participant: USERS[op.by], follows: me.head }] });
              assert.equal(r.status, 200, JSON.stringify(r.body));
              break;
            }
          }
        }
        for (const [i, c] of clients.entries()) {
          const counts = await c.get('/api/counts');
          assert.equal(counts.status, 200);
          const items = await listAll(c);
          const expected = recount(items, USERS[i]);
          assert.deepEqual(counts.body.folders, expected.folders);
          for (const id of labels.get(i)!) expected.labels[id] ??= { total: 0, unseen: 0 };
          assert.deepEqual(counts.body.labels, expected.labels);
          // The folder listings agree with the counts too.
          for (const f of Object.keys(expected.folders)) {
            const r = await c.get(`/api/conversations?folder=${f}&limit=200`);
            assert.equal(r.body.items.length, expected.folders[f].total, `folder ${f} of ${USERS[i]}`);
          }
        }
      }),
      { numRuns: 12 },
    );
  });
});
