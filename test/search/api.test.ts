import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createUser } from '../../src/accounts/users.ts';
import { type ApiClient, type TestPlatform, startTestPlatform } from '../support/platform.ts';

/** Keys of every result of `q` for `who`, through all pages. */
async function searchKeys(who: ApiClient, q: string): Promise<string[]> {
  const keys: string[] = [];
  let cursor: string | null = null;
  do {
    const r: any = await who.get(`/api/search?q=${encodeURIComponent(q)}&limit=100${cursor ? `&cursor=${cursor}` : ''}`);
    assert.equal(r.status, 200, `${q}: ${JSON.stringify(r.body)}`);
    keys.push(...r.body.items.map((i: any) => i.key));
    cursor = r.body.next_cursor;
  } while (cursor);
  return keys;
}

/** Asserts that `q` finds exactly the conversations `expected` (any order) for `who`. */
async function finds(who: ApiClient, q: string, expected: string[]) {
  assert.deepEqual((await searchKeys(who, q)).sort(), [...expected].sort(), `${who.address} searching ${JSON.stringify(q)}`);
}

function headOf(actions: any[], pred: (a: any) => boolean): number {
  const a = actions.filter(pred).at(-1);
  assert.ok(a, 'action not found');
  return a.id;
}

describe('search over the client API', () => {
  let tp: TestPlatform;
  let alice: ApiClient;
  let bob: ApiClient;
  let carol: ApiClient;
  let dave: ApiClient;
  /** Conversation keys by name. */
  const k: Record<string, string> = {};

  before(async () => {
    tp = await startTestPlatform({}, ['web']);
    alice = await tp.user('alice@alpha.test');
    bob = await tp.user('bob@alpha.test');
    carol = await tp.user('carol@alpha.test');
    dave = await tp.user('dave@alpha.test');
    await createUser(tp.platform.deps, { address: 'frank@alpha.test' }); // added later; never logs in

    const up = await alice.call('POST', '/api/attachments', new TextEncoder().encode('quarter,amount\nQ3,1200\n'), { 'content-type': 'text/csv' });
    assert.equal(up.status, 201, JSON.stringify(up.body));
    const create = async (who: ApiClient, body: any) => {
      const r = await who.post('/api/conversations', body);
      assert.equal(r.status, 201, JSON.stringify(r.body));
      return r.body;
    };
    k.planning = (
      await create(alice, {
        subject: 'Quarterly planning meeting',
        participants: ['bob@alpha.test', 'erin.west@mail.example.com'],
        messages: [
          { body: "Let's discuss the organization of the offsite." },
          { body: 'Numbers attached.', files: [{ sha256: up.body.sha256, name: 'Q3-Budget.xlsx', content_type: 'text/csv' }] },
        ],
      })
    ).key;
    k.lunch = (await create(bob, { subject: 'Lunch on Friday', participants: ['carol@alpha.test', 'alice@alpha.test'], messages: [{ body: 'Pizza or sushi?' }] })).key;
    k.secret = (await create(dave, { subject: 'Secret meeting plans', participants: ['erin.west@mail.example.com'], messages: [{ body: 'meeting organization budget' }] })).key;
    k.draft = (await create(alice, { subject: 'Draft about the meeting', participants: ['bob@alpha.test'], messages: [{ body: 'unsent organization thoughts' }], publish: false })).key;

    // A deleted message never matches.
    const lunch = await bob.post(`/api/conversations/${k.lunch}/actions`, { actions: [{ act: 'message:add', body: 'mango smoothie' }] });
    assert.equal(lunch.status, 200, JSON.stringify(lunch.body));
    const del = await bob.post(`/api/conversations/${k.lunch}/actions`, { actions: [{ act: 'message:delete', follows: lunch.body.actions[0].id }] });
    assert.equal(del.status, 200, JSON.stringify(del.body));

    // Carol is removed from "Team sync"; what happens after must stay invisible to her searches.
    const team = await create(alice, {
      subject: 'Team sync',
      participants: ['bob@alpha.test', 'carol@alpha.test'],
      messages: [{ body: 'initial agenda' }, { body: 'kiwi notes' }],
    });
    k.team = team.key;
    const msgIds = team.actions.filter((a: any) => a.act === 'message:add').map((a: any) => a.id);
    const carolHead = headOf(team.actions, (a) => a.act === 'participant:add' && a.participant === 'carol@alpha.test');
    const rm = await alice.post(`/api/conversations/${k.team}/actions`, { actions: [{ act: 'participant:remove', participant: 'carol@alpha.test', follows: carolHead }] });
    assert.equal(rm.status, 200, JSON.stringify(rm.body));
    const afterRemoval = await alice.post(`/api/conversations/${k.team}/actions`, {
      actions: [
        { act: 'message:add', body: 'zebra confidential' },
        { act: 'subject:modify', follows: 1, body: 'Renamed xylophone' },
        { act: 'participant:add', participant: 'frank@alpha.test' },
        { act: 'message:modify', follows: msgIds[0], body: 'initial agenda walrus' },
        { act: 'message:delete', follows: msgIds[1] },
      ],
    });
    assert.equal(afterRemoval.status, 200, JSON.stringify(afterRemoval.body));
  });
  after(async () => tp.stop());

  it('matches free words by prefix and by stem in subject, bodies, addresses and file names', async () => {
    await finds(alice, 'meet', [k.planning, k.draft]);
    await finds(alice, 'meetings', [k.planning, k.draft]);
    await finds(alice, 'organiz', [k.planning, k.draft]);
    await finds(alice, 'offsite', [k.planning]);
    await finds(alice, 'budget', [k.planning]);
    await finds(alice, 'q3-budget.xlsx', [k.planning]);
    await finds(alice, 'xlsx', [k.planning]);
    await finds(alice, 'erin', [k.planning]);
    await finds(alice, 'west', [k.planning]);
    await finds(alice, 'example.com', [k.planning]);
    await finds(alice, 'sushi', [k.lunch]);
    await finds(alice, 'Quarterly OFFSITE numbers', [k.planning]);
    // every word must match somewhere in the same conversation
    await finds(alice, 'offsite sushi', []);
    await finds(alice, 'nonexistentword', []);
  });

  it('matches quoted phrases in order only', async () => {
    await finds(alice, '"organization of the offsite"', [k.planning]);
    await finds(alice, '"offsite organization"', []);
  });

  it('filters: from:, to:, includes:, subject:, has:attachment', async () => {
    await finds(alice, 'from:bob', [k.lunch]);
    await finds(alice, 'from:bob@alpha.test sushi', [k.lunch]);
    await finds(alice, 'from:alice', [k.planning, k.draft, k.team]);
    await finds(bob, 'from:alice', [k.planning, k.team]);
    await finds(alice, 'to:example.com', [k.planning]);
    await finds(alice, 'to:mail.example', [k.planning]);
    await finds(alice, 'to:erin.west@mail.example.com', [k.planning]);
    // the creator is not a recipient, but is included
    await finds(bob, 'to:alice', [k.lunch]);
    await finds(bob, 'includes:alice', [k.planning, k.lunch, k.team]);
    await finds(bob, 'to:bob', [k.planning, k.team]);
    await finds(alice, 'subject:planning', [k.planning]);
    await finds(alice, 'subject:plan', [k.planning]);
    await finds(alice, 'subject:offsite', []);
    await finds(alice, 'subject:"planning meeting"', [k.planning]);
    await finds(alice, 'has:attachment', [k.planning]);
    await finds(alice, 'has:attachment lunch', []);
    await finds(alice, 'from:bob has:attachment', []);
  });

  it("never shows another user's conversation or someone else's draft", async () => {
    await finds(alice, 'secret', []);
    await finds(alice, 'subject:secret', []);
    await finds(bob, 'meeting', [k.planning]);
    await finds(bob, 'unsent', []);
    await finds(dave, 'meeting', [k.secret]);
    await finds(dave, 'budget', [k.secret]);
    await finds(carol, 'offsite', []);
    await finds(carol, 'includes:erin', []);
  });

  it('deleted messages do not match', async () => {
    await finds(bob, 'mango', []);
    await finds(carol, 'mango', []);
  });

  it('a removed participant finds the conversation only as it was at the removal', async () => {
    await finds(bob, 'zebra', [k.team]);
    await finds(bob, 'xylophone', [k.team]);
    await finds(bob, 'walrus', [k.team]);
    await finds(bob, 'includes:frank', [k.team]);
    await finds(bob, 'kiwi', []);

    await finds(carol, 'zebra', []);
    await finds(carol, 'xylophone', []);
    await finds(carol, 'subject:xylophone', []);
    await finds(carol, 'walrus', []);
    await finds(carol, 'includes:frank', []);
    await finds(carol, 'frank', []);
    await finds(carol, 'subject:sync', [k.team]);
    await finds(carol, 'agenda', [k.team]);
    await finds(carol, 'kiwi', [k.team]);
    const r = await carol.get(`/api/search?q=kiwi`);
    assert.equal(r.body.items[0].subject, 'Team sync');
    assert.equal(r.body.items[0].removed, true);
    assert.match(r.body.items[0].snippet.text, /kiwi notes/);
  });

  it('returns list rows with a highlighted snippet of the best message', async () => {
    const r = await alice.get('/api/search?q=organiz');
    assert.equal(r.status, 200);
    const hit = r.body.items.find((i: any) => i.key === k.planning);
    assert.equal(hit.subject, 'Quarterly planning meeting');
    assert.equal(hit.creator, 'alice@alpha.test');
    assert.equal(typeof hit.unseen, 'boolean');
    assert.ok(hit.rank > 0);
    assert.match(hit.snippet.text, /organization of the offsite/);
    assert.ok(hit.snippet.highlights.length > 0);
    for (const [s, e] of hit.snippet.highlights) assert.match(hit.snippet.text.slice(s, e).toLowerCase(), /^organiz/);
    assert.deepEqual(r.body.ignored, []);
    const filtersOnly = await alice.get('/api/search?q=has:attachment');
    assert.equal(filtersOnly.body.items[0].rank, 0);
    assert.equal(filtersOnly.body.items[0].snippet.text, 'Numbers attached.');
  });

  it('ranks a subject match above a body match, then newer first', async () => {
    const older = await alice.post('/api/conversations', { subject: 'Giraffe sighting', participants: [], messages: [{ body: 'hello there' }] });
    const newer = await alice.post('/api/conversations', { subject: 'Hello again', participants: [], messages: [{ body: 'a giraffe walked by' }] });
    const r = await alice.get('/api/search?q=giraffe');
    assert.deepEqual(r.body.items.map((i: any) => i.key), [older.body.key, newer.body.key]);
  });

  it('pages with an opaque cursor bound to the query', async () => {
    const made: string[] = [];
    for (let i = 0; i < 5; i++) {
      const r = await carol.post('/api/conversations', { subject: `Pagination ${i}`, participants: [], messages: [{ body: 'paging body' }] });
      made.push(r.body.key);
    }
    const seen: string[] = [];
    const sizes: number[] = [];
    let cursor: string | null = null;
    do {
      const r: any = await carol.get(`/api/search?q=paging&limit=2${cursor ? `&cursor=${cursor}` : ''}`);
      assert.equal(r.status, 200, JSON.stringify(r.body));
      sizes.push(r.body.items.length);
      seen.push(...r.body.items.map((i: any) => i.key));
      cursor = r.body.next_cursor;
    } while (cursor);
    assert.deepEqual(sizes, [2, 2, 1]);
    assert.deepEqual([...seen].sort(), [...made].sort());
    // equal ranks: newest activity first
    assert.deepEqual(seen, [...made].reverse());

    const first = await carol.get('/api/search?q=paging&limit=2');
    const other = await carol.get(`/api/search?q=body&limit=2&cursor=${first.body.next_cursor}`);
    assert.equal(other.status, 400);
    assert.equal(other.body.error.code, 'invalid_cursor');
    const garbage = await carol.get('/api/search?q=paging&cursor=not-a-cursor');
    assert.equal(garbage.status, 400);
    assert.equal(garbage.body.error.code, 'invalid_cursor');
  });

  it('answers bad queries with 400 invalid_query, never 500', async () => {
    for (const [q, reason] of [
      ['', 'empty'],
      ['the and of', 'only_stopwords'],
      ['x'.repeat(501), 'too_long'],
      ['has:pictures', 'unknown_has'],
      ['from:', 'empty_filter'],
    ]) {
      const r = await alice.get(`/api/search?q=${encodeURIComponent(q!)}`);
      assert.equal(r.status, 400, q);
      assert.equal(r.body.error.code, 'invalid_query');
      assert.equal(r.body.error.details.reason, reason);
    }
    const missing = await alice.get('/api/search');
    assert.equal(missing.status, 400);
    assert.equal(missing.body.error.code, 'invalid_query');
    // odd characters reach SQL only as bound parameters and sanitised lexemes
    for (const q of [`o'brien`, 'a\\b', "from:o'brien", 'to:a\\b', '(x | y) & !z <-> w:*', 'subject:"\' or 1=1 --"', '∑ 東京 Ωmega']) {
      const r = await alice.get(`/api/search?q=${encodeURIComponent(q)}`);
      assert.equal(r.status, 200, `${q}: ${JSON.stringify(r.body)}`);
    }
    const tooMany = await alice.get('/api/search?q=x&limit=101');
    assert.equal(tooMany.status, 400);
    const anon = await fetch(`${tp.base}/api/search?q=x`);
    assert.equal(anon.status, 401);
  });

  it('random queries get 200 or 400 invalid_query, never 500 (seeded fuzz)', async () => {
    let seed = 0x5eed;
    const rnd = (n: number) => {
      seed = (seed * 1103515245 + 12345) % 2 ** 31;
      return seed % n;
    };
    const pieces = ['from:', 'to:', 'includes:', 'subject:', 'has:', 'attachment', '"', "'", '\\', ':*', '&', '|', '!', '(', ')', '<->', '<2>', '-', '@', '.', '/', '+', '_', ',', ' ', ' ', 'meet', 'bob', 'é', '東京', '🎉', '\u0301', 'the', 'x', '%', '$1', ';', '--', '\t', 'NULL', '*'];
    for (let i = 0; i < 40; i++) {
      const q = Array.from({ length: 1 + rnd(12) }, () => pieces[rnd(pieces.length)]).join('');
      const r = await alice.get(`/api/search?q=${encodeURIComponent(q)}&limit=5`);
      assert.ok(r.status === 200 || (r.status === 400 && r.body.error.code === 'invalid_query'), `${JSON.stringify(q)} → ${r.status} ${JSON.stringify(r.body)}`);
    }
  });

  it('is described in the OpenAPI document', async () => {
    const r = await alice.get('/api/openapi.json');
    const op = r.body.paths['/api/search'].get;
    assert.deepEqual(op.tags, ['search']);
    assert.match(op.description, /includes:/);
  });
});
