import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { type Federation, type FedPlatform, logOf, startFederation, waitUntil } from '../support/federation.ts';
import type { ApiClient } from '../support/platform.ts';

/**
 * Conversation replication between Parley platforms (issue 3 §4–6, §8; Done means 1, 2, 4):
 * four platforms as four real processes on four databases (alpha, beta, gamma, delta .test),
 * static routes between them, loopback HTTP. Every wait polls the real state with a deadline.
 */
describe('replication between platforms (real processes)', () => {
  let fed: Federation;
  let A: FedPlatform;
  let B: FedPlatform;
  let C: FedPlatform;
  let D: FedPlatform;

  before(async () => {
    fed = await startFederation(['alpha.test', 'beta.test', 'gamma.test', 'delta.test']);
    [A, B, C, D] = ['alpha.test', 'beta.test', 'gamma.test', 'delta.test'].map((d) => fed.get(d));
  });
  after(async () => {
    if (process.env.PARLEY_FED_DEBUG) for (const p of fed?.platforms.values() ?? []) console.error(`--- ${p.domain}\n${p.output().slice(-6000)}`);
    await fed?.stop();
  });

  const ok = (r: { status: number; body: any }, status = 200) => {
    assert.equal(r.status, status, JSON.stringify(r.body));
    return r.body;
  };
  /** Posts `n` messages as `u`, `per` actions per request; returns the last action. */
  const postMany = async (u: ApiClient, key: string, n: number, label: string, per = 100) => {
    let last: any;
    for (let i = 0; i < n; i += per) {
      const actions = Array.from({ length: Math.min(per, n - i) }, (_, j) => ({ act: 'message:add', body: `${label} ${i + j + 1}` }));
      last = ok(await u.post(`/api/conversations/${key}/actions`, { actions })).actions.at(-1);
    }
    return last;
  };
  const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');
  /** Uploads `bytes` as `u` on their own platform (POST /api/attachments); returns the `files` entry naming it. */
  const attach = async (u: ApiClient, bytes: Buffer, name: string) => {
    const up = ok(await u.call('POST', '/api/attachments', bytes, { 'content-type': 'application/octet-stream' }), 201);
    assert.equal(up.sha256, sha(bytes));
    return { sha256: up.sha256 as string, name, content_type: 'application/octet-stream', size: bytes.length };
  };
  /** Waits until `p` holds exactly `expected` (ids and hashes) for `key`. */
  const converged = (p: FedPlatform, key: string, expected: [number, string][], timeoutMs = 30_000) =>
    waitUntil(
      `${p.domain} to hold the ${expected.length} actions of ${key}`,
      async () => {
        const log = await logOf(p, key);
        return log.length === expected.length && log.every(([id, h], i) => id === expected[i][0] && h === expected[i][1]);
      },
      timeoutMs,
    ).catch((e) => {
      throw new Error(`${e.message}\n--- ${p.domain} output:\n${p.output().slice(-3000)}`);
    });
  /** A's log of `key` once it has at least `minId` actions. */
  const leaderLog = async (key: string, minId: number) => {
    await waitUntil(`alpha.test to reach action ${minId}`, async () => (await logOf(A, key)).length >= minId);
    return logOf(A, key);
  };

  it('Done means 1: a conversation created on A with participants on B and C ends identical on all three after messages, edits, subject, participants, files', async () => {
    const alice = await A.user('alice@alpha.test');
    const bob = await B.user('bob@beta.test');
    const carol = await C.user('carol@gamma.test');
    const dave = await B.user('dave@beta.test');
    const erin = await C.user('erin@gamma.test');

    const created = ok(
      await alice.post('/api/conversations', { subject: 'Across three platforms', participants: ['bob@beta.test', 'carol@gamma.test', 'zoe@nowhere.test'], messages: [{ body: 'hello from A' }] }),
      201,
    );
    const key: string = created.key;
    // Each remote participant's platform creates the conversation and puts it in their inbox.
    for (const u of [bob, carol]) {
      const inbox = await waitUntil(`${u.address} to see ${key} in the inbox`, async () => {
        const r = await u.get('/api/conversations?folder=inbox');
        return r.status === 200 && r.body.items?.some((c: any) => c.key === key) ? r.body : null;
      });
      assert.ok(inbox);
      const conv = ok(await u.get(`/api/conversations/${key}`));
      assert.equal(conv.leader, 'alpha.test');
      assert.equal(conv.subject, 'Across three platforms');
    }

    // bob on B writes: proposed to A, numbered there, returned numbered.
    const bobWs = await bob.websocket();
    const fromBob = ok(await bob.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'message:add', body: 'hello from B' }] }));
    const bobMsg: number = fromBob.actions[0].id;
    assert.equal(fromBob.actions[0].actor, 'bob@beta.test');
    assert.ok(fromBob.actions[0].sig.startsWith('beta.test#'), 'signed by beta.test');
    // carol on C replies to it, once C has it (pushed A → C).
    await waitUntil('C to hold bob’s message', async () => (await logOf(C, key)).some(([id]) => id === bobMsg));
    const fromCarol = ok(await carol.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'message:add', body: 'hello from C', parent: bobMsg }] }));
    // bob sees carol's message on his websocket (replicated A → B, effects on B).
    await bobWs.waitFor((f) => f.type === 'event' && f.kind === 'action' && f.conv === key && f.action?.id === fromCarol.actions[0].id && f.action.actor === 'carol@gamma.test', 15_000);
    bobWs.close();

    // Files: bob and carol each upload one on their own platform and attach it to a message.
    const bytesB = randomBytes(50_000);
    const bytesC = randomBytes(120_000);
    const fileB = await attach(bob, bytesB, 'from-beta.bin');
    const fileC = await attach(carol, bytesC, 'from-gamma.bin');
    const withB = ok(await bob.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'message:add', body: 'a file from B', files: [fileB] }] })).actions[0];
    const withC = ok(await carol.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'message:add', body: 'a file from C', files: [fileC] }] })).actions[0];
    assert.deepEqual(withC.files.map((f: any) => f.sha256), [fileC.sha256]);

    // bob edits his message: lock, modify, release (each follows the head of the message).
    const lock = ok(await bob.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'message:lock', follows: bobMsg }] })).actions[0];
    // While bob holds the lock, carol's edit is refused by the same rules (on C, before anything
    // reaches A) — once C has the lock: until then C does not know the action her edit follows.
    await waitUntil('C to hold bob’s lock', async () => (await logOf(C, key)).some(([id]) => id === lock.id));
    const refused = await carol.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'message:modify', follows: lock.id, body: 'carol was here' }] });
    assert.equal(refused.status, 409, JSON.stringify(refused.body));
    const mod = ok(await bob.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'message:modify', follows: lock.id, body: 'hello from B, edited' }] })).actions[0];
    const rel = ok(await bob.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'message:release', follows: mod.id }] })).actions[0];
    assert.equal(rel.follows, mod.id);

    // carol changes the subject, following its head as C knows it.
    const onC = ok(await carol.get(`/api/conversations/${key}`));
    ok(await carol.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'subject:modify', follows: onC.subject_head, body: 'Across three platforms (renamed on C)' }] }));

    // Participants: alice (A) adds erin on C; bob (B) adds dave on B; alice removes carol.
    ok(await alice.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'participant:add', participant: 'erin@gamma.test' }] }));
    ok(await bob.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'participant:add', participant: 'dave@beta.test' }] }));
    const onA = ok(await alice.get(`/api/conversations/${key}`));
    const carolHead = onA.participants.find((p: any) => p.address === 'carol@gamma.test').head;
    const removal = ok(await alice.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'participant:remove', participant: 'carol@gamma.test', follows: carolHead }] })).actions[0];
    // A message from the new participants on B and C.
    await waitUntil('dave to see the conversation on B', async () => (await dave.get(`/api/conversations/${key}`)).status === 200);
    ok(await dave.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'message:add', body: 'dave joined from B' }] }));
    await waitUntil('erin to see the conversation on C', async () => (await erin.get(`/api/conversations/${key}`)).status === 200);
    const last = ok(await erin.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'message:add', body: 'erin joined from C' }] })).actions[0];

    const expected = await leaderLog(key, last.id);
    assert.equal(expected.length, last.id);
    await converged(B, key, expected);
    await converged(C, key, expected);
    // Same states too: subject, messages, participants as each platform's users see them.
    const states = await Promise.all([alice, bob, erin].map(async (u) => ok(await u.get(`/api/conversations/${key}`))));
    for (const s of states.slice(1)) {
      assert.equal(s.last_hash, states[0].last_hash);
      assert.equal(s.subject, 'Across three platforms (renamed on C)');
      const shape = (m: any) => [m.id, m.body, m.author, (m.files ?? []).map((f: any) => f.sha256)];
      assert.deepEqual(s.messages.map(shape), states[0].messages.map(shape));
      const byAddress = (l: any[]) => [...l].sort((x, y) => x.address.localeCompare(y.address));
      assert.deepEqual(byAddress(s.participants), byAddress(states[0].participants));
    }
    assert.equal(states[0].messages.find((m: any) => m.id === bobMsg).body, 'hello from B, edited');
    assert.deepEqual(states[0].messages.find((m: any) => m.id === withB.id).files.map((f: any) => f.sha256), [sha(bytesB)]);
    // Every platform serves both files to its own participants (none of them uploaded either):
    // alice on A, dave on B, erin on C — the bytes as uploaded.
    for (const u of [alice, dave, erin])
      for (const [file, bytes] of [[fileB, bytesB], [fileC, bytesC]] as const) {
        const r = await fetch(`${u.base}/api/attachments/${file.sha256}`, { headers: { authorization: `Bearer ${u.token}` } });
        assert.equal(r.status, 200, `${u.address} gets ${file.name}: ${r.status}`);
        assert.ok(Buffer.from(await r.arrayBuffer()).equals(bytes), `${u.address} gets the bytes of ${file.name}`);
      }
    // carol was removed: she keeps the conversation up to her removal.
    const carolView = ok(await carol.get(`/api/conversations/${key}`));
    assert.equal(carolView.removed_id, removal.id);
    // The email participant is mailed by the leader only: A has deliveries for zoe, B and C none.
    const mails = async (p: FedPlatform) => Number((await p.pool.query(`select count(*) from deliveries d join conversations c on c.id = d.conv_id where c.key = $1`, [key])).rows[0].count);
    assert.ok((await mails(A)) > 0, 'alpha.test emails zoe@nowhere.test');
    assert.equal(await mails(B), 0);
    assert.equal(await mails(C), 0);
    const toRemote = await A.pool.query(`select destination from deliveries d join conversations c on c.id = d.conv_id where c.key = $1 and destination not like '%@nowhere.test'`, [key]);
    assert.deepEqual(toRemote.rows, [], 'remote participants are replicated to, never emailed');

    // The last participant of C leaves: C gets the removal and nothing after.
    const onA2 = ok(await alice.get(`/api/conversations/${key}`));
    const erinHead = onA2.participants.find((p: any) => p.address === 'erin@gamma.test').head;
    const leave = ok(await erin.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'participant:remove', participant: 'erin@gamma.test', follows: erinHead }] })).actions[0];
    const after = ok(await alice.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'message:add', body: 'after C left' }] })).actions[0];
    const full = await leaderLog(key, after.id);
    await converged(B, key, full);
    await converged(C, key, full.slice(0, leave.id));
    const stop = await A.pool.query(`select l.stop_id, l.acked_id from federation_links l join conversations c on c.id = l.conv_id where c.key = $1 and l.platform = 'gamma.test'`, [key]);
    assert.deepEqual(stop.rows[0], { stop_id: leave.id, acked_id: leave.id });
  });

  it('Done means 4: a participant on a fourth platform added after 500 actions receives the whole conversation', async () => {
    const alice = await A.user('amy@alpha.test');
    await B.user('ben@beta.test');
    const dan = await D.user('dan@delta.test');
    const key = ok(await alice.post('/api/conversations', { subject: 'Long before delta', participants: ['ben@beta.test'], messages: [{ body: 'start' }] }), 201).key;
    await postMany(alice, key, 500, 'early');
    const added = ok(await alice.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'participant:add', participant: 'dan@delta.test' }] })).actions[0];
    assert.ok(added.id > 500);
    const expected = await leaderLog(key, added.id);
    await converged(D, key, expected, 60_000);
    await converged(B, key, expected, 60_000);
    // dan sees every message and can write: his proposal is numbered by A and reaches B.
    const onD = ok(await dan.get(`/api/conversations/${key}`));
    assert.equal(onD.messages.length, 501);
    assert.equal(onD.messages.at(-1).body, 'early 500');
    const own = ok(await dan.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'message:add', body: 'hello from delta' }] })).actions[0];
    assert.equal(own.id, added.id + 1);
    await converged(B, key, await leaderLog(key, own.id));
  });

  it('Done means 2: B killed (SIGKILL) while A pushes 1,000 actions converges with no loss and no duplicate', async () => {
    const alice = await A.user('kim@alpha.test');
    const bea = await B.user('bea@beta.test');
    const key = ok(await alice.post('/api/conversations', { subject: 'Under fire', participants: ['bea@beta.test'], messages: [{ body: 'start' }] }), 201).key;
    // 1,000 actions appended on A (100 per request) and pushed to B; B dies mid-stream.
    const posting = postMany(alice, key, 1000, 'burst');
    await waitUntil('B to store some of the burst', async () => (await logOf(B, key)).length > 3, 60_000, 20);
    await B.kill('SIGKILL');
    const last = await posting;
    const expected = await leaderLog(key, last.id);
    assert.equal(expected.length, last.id);
    assert.ok(expected.length >= 1000);
    const atKill = (await logOf(B, key)).length;
    assert.ok(atKill > 3 && atKill < expected.length, `B had ${atKill} of ${expected.length} actions when killed`);
    await B.start();
    await converged(B, key, expected, 180_000);
    // No loss, no duplicate: each message once, in order, as on A.
    const bodies = async (p: FedPlatform) =>
      (await p.pool.query(`select m.body from messages m join conversations c on c.id = m.conv_id where c.key = $1 order by m.id`, [key])).rows.map((r) => r.body);
    const onB = await bodies(B);
    assert.equal(onB.length, 1001);
    assert.equal(new Set(onB).size, 1001);
    assert.deepEqual(onB, await bodies(A));
    // bea's view on B: the whole conversation.
    assert.equal(ok(await bea.get(`/api/conversations/${key}`)).messages.length, 1001);
  });

  it('Done means 2: a post on B while the leader A is stopped is pending, then applied exactly once when A is back, and reaches everyone', async () => {
    const alice = await A.user('lee@alpha.test');
    const bo = await B.user('bo@beta.test');
    const cy = await C.user('cy@gamma.test');
    const key = ok(await alice.post('/api/conversations', { subject: 'Leader away', participants: ['bo@beta.test', 'cy@gamma.test'], messages: [{ body: 'before' }] }), 201).key;
    await waitUntil('bo to see the conversation', async () => (await bo.get(`/api/conversations/${key}`)).status === 200);
    await waitUntil('cy to see the conversation', async () => (await cy.get(`/api/conversations/${key}`)).status === 200);

    await A.kill('SIGTERM');
    const posted = await bo.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'message:add', body: 'written while alpha was down' }] });
    assert.equal(posted.status, 202, JSON.stringify(posted.body));
    assert.equal(posted.body.pending, true);
    assert.equal(posted.body.actions[0].body, 'written while alpha was down');
    const whileDown = ok(await bo.get(`/api/conversations/${key}`));
    assert.equal(whileDown.pending.length, 1);
    assert.equal(whileDown.pending[0].state, 'pending');
    assert.equal(whileDown.pending[0].actions[0].body, 'written while alpha was down');
    assert.equal(whileDown.messages.length, 1, 'not in the log before the leader numbers it');

    await A.start();
    const count = async (p: FedPlatform) =>
      Number((await p.pool.query(`select count(*) from messages m join conversations c on c.id = m.conv_id where c.key = $1 and m.body = $2`, [key, 'written while alpha was down'])).rows[0].count);
    await waitUntil('the pending post to be applied on A', async () => (await count(A)) > 0, 180_000);
    const expected = await logOf(A, key);
    await converged(B, key, expected);
    await converged(C, key, expected);
    for (const p of [A, B, C]) assert.equal(await count(p), 1, `exactly once on ${p.domain}`);
    const after = ok(await bo.get(`/api/conversations/${key}`));
    assert.deepEqual(after.pending, [], 'nothing pending any more');
    assert.equal(ok(await cy.get(`/api/conversations/${key}`)).messages.at(-1).body, 'written while alpha was down');
  });
});
