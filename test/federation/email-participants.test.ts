import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { sql } from 'kysely';
import nodemailer from 'nodemailer';
import { startTestPlatform, type TestPlatform } from '../support/platform.ts';
import { startSmtpSink, type SmtpSink } from '../support/smtp-sink.ts';
import { waitUntil } from '../support/federation.ts';

/**
 * Email participants of a conversation led by another platform (issue 3 §8, PRODUCT.md §2):
 * exactly one platform — the leader — mails them, and their reply that arrives by email at a
 * follower (a reply-all reaching a follower's user) is proposed to the leader, numbered there
 * once, and replicated back. Two real platforms in this process (alpha.test leads,
 * beta.test follows), each with its own SMTP relay sink, and a real SMTP client.
 */
describe('email participants of a conversation led elsewhere', () => {
  let A: TestPlatform;
  let B: TestPlatform;
  let relayA: SmtpSink;
  let relayB: SmtpSink;
  before(async () => {
    [relayA, relayB] = await Promise.all([startSmtpSink(), startSmtpSink()]);
    [A, B] = await Promise.all([
      startTestPlatform({ relayUrl: `smtp://127.0.0.1:${relayA.port}` }, ['web', 'worker', 'smtp']),
      startTestPlatform({ domains: ['beta.test'], relayUrl: `smtp://127.0.0.1:${relayB.port}` }, ['web', 'worker', 'smtp']),
    ]);
    const routes = { 'alpha.test': A.base, 'beta.test': B.base };
    A.config.federationRoutes = routes;
    B.config.federationRoutes = routes;
  });
  after(async () => {
    await Promise.all([A?.stop(), B?.stop()]);
    await Promise.all([relayA?.close(), relayB?.close()]);
  });

  const log = async (p: TestPlatform, key: string) =>
    (
      await sql<{ id: number; hash: string; actor: string; act: string; body: unknown }>`
        select a.id, a.hash, a.actor, a.act, a.body from actions a join conversations c on c.id = a.conv_id
         where c.key = ${key} order by a.id`.execute(p.platform.deps.db.kysely)
    ).rows;
  const mailsTo = (sink: SmtpSink, rcpt: string) => sink.messages.filter((m) => m.rcptTo.includes(rcpt));

  /** `aliceAddr` (on alpha.test) starts a conversation with `bobAddr` (on beta.test) and the email participant `emailAddr`; resolves once beta.test has it. */
  async function startWithEmailParticipant(aliceAddr: string, bobAddr: string, emailAddr: string, subject: string, body: string) {
    const alice = await A.user(aliceAddr);
    const bob = await B.user(bobAddr);
    const created = await alice.post('/api/conversations', { subject, participants: [bobAddr, emailAddr], messages: [{ body }] });
    assert.equal(created.status, 201, JSON.stringify(created.body));
    const key: string = created.body.key;
    await waitUntil('beta.test to have the conversation', async () => (await bob.get(`/api/conversations/${key}`)).status === 200);
    return { alice, bob, key };
  }

  it('only the leader mails them; a reply by email at a follower is proposed to the leader, applied once and replicated', async () => {
    const zoe = 'zoe@mail.example';
    const { bob, key } = await startWithEmailParticipant('alice@alpha.test', 'bob@beta.test', zoe, 'Venue for the offsite', 'Shall we book the lake house?');

    // bob (on the follower) writes: proposed to alpha.test, numbered there, mailed to zoe by alpha.test.
    const byBob = await bob.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'message:add', body: 'Fine by me.' }] });
    assert.equal(byBob.status, 200, JSON.stringify(byBob.body));
    await waitUntil('alpha.test to mail zoe the conversation and bob’s message', async () => mailsTo(relayA, zoe).length >= 2);
    await waitUntil('beta.test to hold bob’s message', async () => (await log(B, key)).some((a) => a.id === byBob.body.actions[0].id));
    // beta.test has stored every action so far — any email of its own would have its delivery row by now.
    const deliveriesOnB = await sql<{ n: number }>`select count(*)::int as n from deliveries`.execute(B.platform.deps.db.kysely);
    assert.equal(deliveriesOnB.rows[0].n, 0, 'the follower queues no email for the email participant');
    assert.equal(relayB.messages.length, 0, 'the follower sent no email');

    // zoe answers the first email with reply-all: it reaches bob's platform (beta.test) too.
    const first = mailsTo(relayA, zoe)[0];
    assert.ok(first.messageId, 'alpha.test’s email has a Message-ID');
    const transport = nodemailer.createTransport({ host: '127.0.0.1', port: B.platform.smtpPort!, secure: false, ignoreTLS: true });
    await transport.sendMail({
      envelope: { from: zoe, to: ['bob@beta.test'] },
      from: `Zoe <${zoe}>`,
      to: 'bob@beta.test',
      subject: 'Re: Venue for the offsite',
      inReplyTo: first.messageId,
      references: [first.messageId!],
      text: 'The lake house is free on the 14th.\n\nOn Monday, Alice wrote:\n> Shall we book the lake house?\n',
    });
    transport.close();

    await waitUntil('alpha.test to number zoe’s reply', async () => (await log(A, key)).some((a) => a.actor === zoe && a.act === 'message:add'));
    const onA = await log(A, key);
    const fromZoe = onA.filter((a) => a.actor === zoe && a.act === 'message:add');
    assert.equal(fromZoe.length, 1, 'applied exactly once');
    assert.match(JSON.stringify(fromZoe[0].body), /lake house is free on the 14th/);
    await waitUntil('beta.test to replicate it', async () => JSON.stringify((await log(B, key)).map((a) => a.hash)) === JSON.stringify((await log(A, key)).map((a) => a.hash)));

    // Nothing else came of it on the follower: no conversation of its own for the reply.
    const convsOnB = await sql<{ n: number }>`select count(*)::int as n from conversations where key = ${key} or creator = ${zoe}`.execute(B.platform.deps.db.kysely);
    assert.equal(convsOnB.rows[0].n, 1, 'the reply threaded into the replicated conversation');
  });

  it('a reply-all that reaches the leader and a follower alike is applied once', async () => {
    const zoe = 'yan@mail.example';
    const { key } = await startWithEmailParticipant('alice2@alpha.test', 'bob2@beta.test', zoe, 'Budget review', 'Numbers attached next week.');
    const first = await waitUntil('alpha.test to mail the email participant', async () => mailsTo(relayA, zoe)[0]);

    const reply = {
      from: zoe,
      to: 'alice2@alpha.test, bob2@beta.test',
      subject: 'Re: Budget review',
      messageId: `<reply-all.${Date.now()}@mail.example>`,
      inReplyTo: first.messageId,
      references: [first.messageId!],
      text: 'Next week works for me.',
    };
    // The same email, delivered by the sender's MTA to each recipient's platform.
    for (const [p, rcpt] of [
      [B, 'bob2@beta.test'],
      [A, 'alice2@alpha.test'],
    ] as const) {
      const transport = nodemailer.createTransport({ host: '127.0.0.1', port: p.platform.smtpPort!, secure: false, ignoreTLS: true });
      await transport.sendMail({ ...reply, envelope: { from: zoe, to: [rcpt] } });
      transport.close();
    }
    const settled = async (p: TestPlatform) =>
      (await sql<{ n: number }>`select count(*)::int as n from inbound_emails where status in ('received')`.execute(p.platform.deps.db.kysely)).rows[0].n === 0;
    await waitUntil('both platforms to have ingested the reply', async () => (await settled(A)) && (await settled(B)));
    await waitUntil('the follower’s proposal to be settled', async () =>
      (await sql<{ n: number }>`select count(*)::int as n from federation_proposals where state = 'pending'`.execute(B.platform.deps.db.kysely)).rows[0].n === 0);
    const fromZoe = (await log(A, key)).filter((a) => a.actor === zoe && a.act === 'message:add');
    assert.equal(fromZoe.length, 1, `one message from the reply on the leader, not ${fromZoe.length}`);
    await waitUntil('beta.test to converge', async () => JSON.stringify((await log(B, key)).map((a) => a.hash)) === JSON.stringify((await log(A, key)).map((a) => a.hash)));
  });
});
