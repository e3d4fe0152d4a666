// The inbound SMTP server (issue 2 §6 "Inbound") driven by a real SMTP client (nodemailer)
// against a platform started in-process on a fresh database: acceptance and refusals with
// their reply codes, threading by In-Reply-To and by the reply+<key> address, Bcc, size
// limit, broken MIME, duplicate delivery.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createConnection } from 'node:net';
import { createTransport } from 'nodemailer';
import { type ApiClient, type TestPlatform, startTestPlatform } from '../support/platform.ts';

/** What the server answered for one message. */
interface SendOutcome {
  ok: boolean;
  /** Final reply code (250 when accepted). */
  code: number;
  /** The server's reply line(s). */
  response: string;
  rejected: string[];
}

/** Sends a raw message with an explicit envelope over plain SMTP; never throws on SMTP refusals. */
async function sendRaw(port: number, envelope: { from: string; to: string[] }, raw: string | Buffer): Promise<SendOutcome> {
  const transport = createTransport({ host: '127.0.0.1', port, secure: false, ignoreTLS: true, name: 'client.example.net' });
  try {
    const info = await transport.sendMail({ envelope, raw });
    return { ok: info.rejected.length === 0, code: Number(info.response.slice(0, 3)), response: info.response, rejected: info.rejected.map(String) };
  } catch (e) {
    const err = e as { responseCode?: number; response?: string; rejected?: string[]; message: string };
    return { ok: false, code: err.responseCode ?? 0, response: err.response ?? err.message, rejected: (err.rejected ?? []).map(String) };
  } finally {
    transport.close();
  }
}

/** A minimal RFC 5322 message. */
function message(h: { from: string; to: string; cc?: string; subject: string; messageId?: string; inReplyTo?: string; references?: string }, body: string): string {
  const lines = [
    `From: ${h.from}`,
    `To: ${h.to}`,
    ...(h.cc ? [`Cc: ${h.cc}`] : []),
    `Subject: ${h.subject}`,
    'Date: Tue, 03 Nov 2026 10:00:00 +0000',
    ...(h.messageId ? [`Message-ID: <${h.messageId}>`] : []),
    ...(h.inReplyTo ? [`In-Reply-To: <${h.inReplyTo}>`] : []),
    ...(h.references ? [`References: ${h.references}`] : []),
    'MIME-Version: 1.0',
    'Content-Type: text/plain; charset=utf-8',
    '',
    body,
    '',
  ];
  return lines.join('\r\n');
}

/** The caller's conversations whose subject is `subject` (any folder). */
async function findBySubject(user: ApiClient, subject: string): Promise<any[]> {
  const r = await user.get('/api/conversations?limit=100');
  assert.equal(r.status, 200, JSON.stringify(r.body));
  return r.body.items.filter((i: any) => i.subject === subject);
}

describe('inbound SMTP server', () => {
  let tp: TestPlatform;
  let alice: ApiClient;
  let bob: ApiClient;
  let carol: ApiClient;
  let port: number;
  before(async () => {
    tp = await startTestPlatform({ maxMessageBytes: 64 * 1024 });
    port = tp.platform.smtpPort!;
    alice = await tp.user('alice@alpha.test');
    bob = await tp.user('bob@alpha.test');
    carol = await tp.user('carol@alpha.test');
  });
  after(async () => tp.stop());

  it('stores accepted mail as a conversation the local recipient sees, with the sender as creator', async () => {
    const raw = message(
      { from: 'Zed Example <zed@example.net>', to: 'alice@alpha.test', cc: 'yan@example.org', subject: 'Hello from outside', messageId: 'm1@example.net' },
      'Hi Alice,\r\nthis came by SMTP.',
    );
    const sent = await sendRaw(port, { from: 'zed@example.net', to: ['alice@alpha.test'] }, raw);
    assert.equal(sent.code, 250, sent.response);

    const found = await findBySubject(alice, 'Hello from outside');
    assert.equal(found.length, 1);
    const conv = await alice.get(`/api/conversations/${found[0].key}`);
    assert.equal(conv.status, 200);
    assert.equal(conv.body.creator, 'zed@example.net');
    assert.deepEqual(conv.body.participants.map((p: any) => p.address).sort(), ['alice@alpha.test', 'yan@example.org', 'zed@example.net']);
    assert.equal(conv.body.messages.length, 1);
    assert.match(conv.body.messages[0].body, /this came by SMTP/);
    assert.equal(conv.body.messages[0].source.kind, 'email');
    assert.equal(conv.body.messages[0].source.message_id, 'm1@example.net');
    assert.deepEqual(conv.body.messages[0].source.recipients.sort(), ['alice@alpha.test', 'yan@example.org']);
    assert.equal(conv.body.flags.inbox, true);
    // Its recipients have the email: Parley sends nobody a copy of it.
    const deliveries = await tp.platform.deps.db.kysely.selectFrom('deliveries').select('id').execute();
    assert.equal(deliveries.length, 0);
  });

  it('threads a reply with In-Reply-To into the same conversation and separates the quoted text', async () => {
    await sendRaw(
      port,
      { from: 'zed@example.net', to: ['alice@alpha.test'] },
      message({ from: 'zed@example.net', to: 'alice@alpha.test', subject: 'Thread me', messageId: 'parent@example.net' }, 'First.'),
    );
    const reply = message(
      { from: 'Yan <yan@example.org>', to: 'zed@example.net', cc: 'alice@alpha.test', subject: 'Re: Thread me', messageId: 'child@example.org', inReplyTo: 'parent@example.net' },
      'Second, in reply.\r\n\r\nOn Tue, 3 Nov 2026 at 10:00, zed@example.net wrote:\r\n> First.\r\n',
    );
    const sent = await sendRaw(port, { from: 'yan@example.org', to: ['alice@alpha.test'] }, reply);
    assert.equal(sent.code, 250, sent.response);

    assert.equal((await findBySubject(alice, 'Re: Thread me')).length, 0, 'the reply must not start a conversation');
    const [conv] = await findBySubject(alice, 'Thread me');
    const full = await alice.get(`/api/conversations/${conv.key}?actions=true`);
    const msgs = full.body.messages;
    assert.equal(msgs.length, 2);
    assert.equal(msgs[1].author, 'yan@example.org');
    assert.equal(msgs[1].body, 'Second, in reply.');
    assert.match(msgs[1].source.quoted, /> First\./);
    // The new sender was added by the local recipient before writing.
    const yan = full.body.participants.find((p: any) => p.address === 'yan@example.org');
    assert.ok(yan, 'the replying sender became a participant');
  });

  it('threads mail sent to a conversation reply address, accepting reply+<key>@ as a recipient', async () => {
    const created = await alice.post('/api/conversations', { subject: 'Reply address', participants: ['zed@example.net'], messages: [{ body: 'Zed, answer me by email.' }] });
    assert.equal(created.status, 201);
    const key = created.body.key;
    const sent = await sendRaw(
      port,
      { from: 'zed@example.net', to: [`reply+${key}@alpha.test`] },
      message({ from: 'zed@example.net', to: `reply+${key}@alpha.test`, subject: 'Re: Reply address', messageId: 'zed-answer@example.net' }, 'Answered.'),
    );
    assert.equal(sent.code, 250, sent.response);
    const conv = await alice.get(`/api/conversations/${key}`);
    assert.deepEqual(conv.body.messages.map((m: any) => [m.author, m.body]), [
      ['alice@alpha.test', 'Zed, answer me by email.'],
      ['zed@example.net', 'Answered.'],
    ]);
    const unknownKey = await sendRaw(port, { from: 'zed@example.net', to: [`reply+${'0'.repeat(32)}@alpha.test`] }, message({ from: 'zed@example.net', to: 'x@alpha.test', subject: 'x' }, 'x'));
    assert.equal(unknownKey.code, 550, unknownKey.response);
    assert.match(unknownKey.response, /5\.1\.1.*no conversation/);
  });

  it('keeps attachments and inline parts as files the recipient can download', async () => {
    const png = Buffer.from('89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d4944415478da63f8cfc0f01f0005000201e0f00bbc0000000049454e44ae426082', 'hex');
    const pdf = Buffer.from('%PDF-1.4\n% a tiny test file\n');
    const raw = [
      'From: zed@example.net',
      'To: alice@alpha.test',
      'Subject: With files',
      'Message-ID: <files@example.net>',
      'MIME-Version: 1.0',
      'Content-Type: multipart/mixed; boundary="outer"',
      '',
      '--outer',
      'Content-Type: multipart/related; boundary="inner"',
      '',
      '--inner',
      'Content-Type: text/html; charset=utf-8',
      '',
      '<p>See <img src="cid:dot@example.net"> and the report.</p>',
      '--inner',
      'Content-Type: image/png',
      'Content-ID: <dot@example.net>',
      'Content-Disposition: inline; filename="dot.png"',
      'Content-Transfer-Encoding: base64',
      '',
      png.toString('base64'),
      '--inner--',
      '--outer',
      'Content-Type: application/pdf; name="report.pdf"',
      'Content-Disposition: attachment; filename="report.pdf"',
      'Content-Transfer-Encoding: base64',
      '',
      pdf.toString('base64'),
      '--outer--',
      '',
    ].join('\r\n');
    const sent = await sendRaw(port, { from: 'zed@example.net', to: ['alice@alpha.test'] }, raw);
    assert.equal(sent.code, 250, sent.response);
    const [conv] = await findBySubject(alice, 'With files');
    const full = await alice.get(`/api/conversations/${conv.key}`);
    const files = full.body.messages[0].files;
    assert.deepEqual(
      files.map((f: any) => [f.name, f.content_type, f.size, f.inline ?? false, f.content_id ?? null]),
      [
        ['dot.png', 'image/png', png.length, true, 'dot@example.net'],
        ['report.pdf', 'application/pdf', pdf.length, false, null],
      ],
    );
    const download = await fetch(`${tp.base}/api/attachments/${files[1].sha256}`, { headers: { authorization: `Bearer ${alice.token}` } });
    assert.equal(download.status, 200);
    assert.deepEqual(Buffer.from(await download.arrayBuffer()), pdf);
    assert.equal((await bob.get(`/api/attachments/${files[1].sha256}`)).status, 404, 'only participants may download');
  });

  it('refuses unknown local users with 550 5.1.1 and other domains with 550 (no open relay)', async () => {
    const unknown = await sendRaw(port, { from: 'zed@example.net', to: ['nobody@alpha.test'] }, message({ from: 'zed@example.net', to: 'nobody@alpha.test', subject: 'x' }, 'x'));
    assert.equal(unknown.code, 550, unknown.response);
    assert.match(unknown.response, /5\.1\.1 <nobody@alpha\.test>: no such user here/);
    const relay = await sendRaw(port, { from: 'zed@example.net', to: ['victim@example.com'] }, message({ from: 'zed@example.net', to: 'victim@example.com', subject: 'x' }, 'x'));
    assert.equal(relay.code, 550, relay.response);
    assert.match(relay.response, /5\.7\.1 .*relaying denied/);
    // A mixed envelope delivers to the valid recipient only.
    const mixed = await sendRaw(
      port,
      { from: 'zed@example.net', to: ['nobody@alpha.test', 'bob@alpha.test'] },
      message({ from: 'zed@example.net', to: 'bob@alpha.test', subject: 'Mixed envelope', messageId: 'mixed@example.net' }, 'x'),
    );
    assert.deepEqual(mixed.rejected, ['nobody@alpha.test']);
    assert.equal((await findBySubject(bob, 'Mixed envelope')).length, 1);
  });

  it('refuses a message over the size limit with 552 and keeps nothing', async () => {
    const before = await tp.platform.deps.db.kysely.selectFrom('inbound_emails').select('id').execute();
    const big = message({ from: 'zed@example.net', to: 'alice@alpha.test', subject: 'Too big' }, 'x'.repeat(70 * 1024));
    const sent = await sendRaw(port, { from: 'zed@example.net', to: ['alice@alpha.test'] }, big);
    assert.equal(sent.code, 552, sent.response);
    assert.equal((await findBySubject(alice, 'Too big')).length, 0);
    const afterRows = await tp.platform.deps.db.kysely.selectFrom('inbound_emails').select('id').execute();
    assert.equal(afterRows.length, before.length);
  });

  it('stores broken MIME (raw kept) without crashing, and refuses a message with no sender at all with 554 and the reason', async () => {
    const broken = [
      'From: zed@example.net',
      'To: alice@alpha.test',
      'Subject: Broken MIME',
      'Message-ID: <broken@example.net>',
      'Content-Type: multipart/mixed; boundary="nope"',
      'Content-Transfer-Encoding: base64',
      '',
      '--notTheBoundary',
      'Content-Type: text/plain',
      '',
      '\u0000\u0001 garbage ===== not base64 at all',
      '',
    ].join('\r\n');
    const sent = await sendRaw(port, { from: 'zed@example.net', to: ['alice@alpha.test'] }, broken);
    assert.equal(sent.code, 250, sent.response);
    const [conv] = await findBySubject(alice, 'Broken MIME');
    assert.ok(conv, 'the broken message became a conversation');
    const full = await alice.get(`/api/conversations/${conv.key}`);
    assert.ok(full.body.messages[0].source.warnings.length > 0, 'the defect is reported as a warning');
    const db = tp.platform.deps.db.kysely;
    const row = await db.selectFrom('inbound_emails').selectAll().where('status', '=', 'ingested').orderBy('id', 'desc').executeTakeFirstOrThrow();
    const stored = await new Promise<Buffer>((res, rej) => {
      const chunks: Buffer[] = [];
      tp.platform.deps.blobs.read(row.raw_sha256).on('data', (c) => chunks.push(c as Buffer)).on('end', () => res(Buffer.concat(chunks))).on('error', rej);
    });
    assert.match(stored.toString('latin1'), /Subject: Broken MIME/);

    // No From, no Sender, null reverse-path: nothing to attribute it to.
    const anonymous = await sendRaw(port, { from: '', to: ['alice@alpha.test'] }, 'Subject: who am I\r\n\r\nnobody\r\n');
    assert.equal(anonymous.code, 554, anonymous.response);
    assert.match(anonymous.response, /5\.6\.0 .*no sender/);
    const failed = await db.selectFrom('inbound_emails').selectAll().where('status', '=', 'failed').execute();
    assert.equal(failed.length, 1);
    assert.match(failed[0].error ?? '', /no sender/);
    assert.ok(tp.platform.deps.blobs.has(failed[0].raw_sha256), 'the refused message is kept raw');

    // Raw bytes, binary junk, a bare LF message: the server keeps answering.
    const junk = Buffer.from([0xff, 0xfe, 0x00, 0x0a, 0x0d, 0x0a, 0x2e, 0x2e, 0x0a, 0x80, 0x81]);
    const j = await sendRaw(port, { from: 'zed@example.net', to: ['alice@alpha.test'] }, junk);
    assert.ok([250, 554].includes(j.code), j.response);
    const health = await fetch(`${tp.base}/health`);
    assert.equal(health.status, 200);
  });

  it('adds nothing when the same message is delivered twice', async () => {
    const raw = message({ from: 'zed@example.net', to: 'alice@alpha.test', subject: 'Twice', messageId: 'twice@example.net' }, 'Once only.');
    const first = await sendRaw(port, { from: 'zed@example.net', to: ['alice@alpha.test'] }, raw);
    const second = await sendRaw(port, { from: 'zed@example.net', to: ['alice@alpha.test'] }, raw);
    assert.equal(first.code, 250);
    assert.equal(second.code, 250, 'a duplicate is acknowledged, so the sender stops retrying');
    const found = await findBySubject(alice, 'Twice');
    assert.equal(found.length, 1);
    const conv = await alice.get(`/api/conversations/${found[0].key}`);
    assert.equal(conv.body.messages.length, 1);
    const statuses = await tp.platform.deps.db.kysely
      .selectFrom('inbound_emails')
      .select('status')
      .where('raw_sha256', 'in', tp.platform.deps.db.kysely.selectFrom('blobs').select('sha256'))
      .orderBy('id', 'desc')
      .limit(2)
      .execute();
    assert.deepEqual(statuses.map((s) => s.status), ['duplicate', 'ingested']);
  });

  it('lets a Bcc recipient (envelope only) see the message, in a conversation of their own when it replies to one they are not in', async () => {
    const sent = await sendRaw(
      port,
      { from: 'zed@example.net', to: ['alice@alpha.test', 'carol@alpha.test'] },
      message({ from: 'zed@example.net', to: 'alice@alpha.test', subject: 'Secret Bcc', messageId: 'bcc@example.net' }, 'Carol is in Bcc.'),
    );
    assert.equal(sent.code, 250, sent.response);
    const [aliceConv] = await findBySubject(alice, 'Secret Bcc');
    const [carolConv] = await findBySubject(carol, 'Secret Bcc');
    assert.ok(aliceConv && carolConv, 'both recipients see it');
    assert.equal(aliceConv.key, carolConv.key, 'one delivery, one conversation');

    // A reply to a thread alice is in, Bcc'd to carol who is not: carol must not see the thread's history.
    const reply = await sendRaw(
      port,
      { from: 'zed@example.net', to: ['alice@alpha.test', 'carol@alpha.test'] },
      message({ from: 'zed@example.net', to: 'alice@alpha.test', subject: 'Re: Thread me', messageId: 'bcc-reply@example.net', inReplyTo: 'child@example.org' }, 'Carol gets only this.'),
    );
    assert.equal(reply.code, 250, reply.response);
    const [carolReply] = await findBySubject(carol, 'Re: Thread me');
    assert.ok(carolReply, 'carol got the reply in a conversation of her own');
    const carolView = await carol.get(`/api/conversations/${carolReply.key}`);
    assert.deepEqual(carolView.body.messages.map((m: any) => m.body), ['Carol gets only this.']);
    const [thread] = await findBySubject(alice, 'Thread me');
    const aliceView = await alice.get(`/api/conversations/${thread.key}`);
    assert.equal(aliceView.body.messages.at(-1).body, 'Carol gets only this.');
    assert.ok(!aliceView.body.participants.some((p: any) => p.address === 'carol@alpha.test'), 'the Bcc is not disclosed');
    assert.equal((await carol.get(`/api/conversations/${thread.key}`)).status, 404);
  });

  it('survives a client that disconnects in the middle of DATA', async () => {
    await new Promise<void>((resolve, reject) => {
      const s = createConnection({ host: '127.0.0.1', port });
      const script = ['EHLO rude.example\r\n', 'MAIL FROM:<zed@example.net>\r\n', 'RCPT TO:<alice@alpha.test>\r\n', 'DATA\r\n', 'Subject: cut\r\n\r\nhalf a mess'];
      let step = 0;
      s.setEncoding('latin1');
      s.on('data', (d: string) => {
        if (/^(220|250|354)/m.test(d) && step < script.length) {
          s.write(script[step++]);
          if (step === script.length) s.destroy();
        }
      });
      s.on('close', () => resolve());
      s.on('error', reject);
    });
    const again = await sendRaw(port, { from: 'zed@example.net', to: ['alice@alpha.test'] }, message({ from: 'zed@example.net', to: 'alice@alpha.test', subject: 'Still alive' }, 'yes'));
    assert.equal(again.code, 250, again.response);
  });

  it('commits messages arriving together for one mailbox, each once, while one of them is refused', async () => {
    // Sent at once over separate connections: the write combiner holds the first ready ones
    // for those still being parsed, so they share transactions; none may be lost, stored
    // twice, or held up by the one that is refused.
    const subjects = Array.from({ length: 6 }, (_, i) => `Together ${i}`);
    const outcomes = await Promise.all([
      ...subjects.map((subject, i) =>
        sendRaw(port, { from: 'zed@example.net', to: ['carol@alpha.test'] }, message({ from: 'zed@example.net', to: 'carol@alpha.test', subject, messageId: `together-${i}@example.net` }, `Message ${i}.`)),
      ),
      sendRaw(port, { from: '', to: ['carol@alpha.test'] }, 'Subject: Together, anonymous\r\n\r\nnobody\r\n'),
    ]);
    assert.deepEqual(outcomes.map((o) => o.code), [...subjects.map(() => 250), 554], JSON.stringify(outcomes.map((o) => o.response)));
    for (const subject of subjects) {
      const found = await findBySubject(carol, subject);
      assert.equal(found.length, 1, subject);
      const conv = await carol.get(`/api/conversations/${found[0].key}`);
      assert.deepEqual(conv.body.messages.map((m: any) => m.body), [`Message ${subject.slice(-1)}.`]);
    }
  });
});
