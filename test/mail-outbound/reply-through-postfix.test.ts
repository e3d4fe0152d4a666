import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import nodemailer from 'nodemailer';
import { simpleParser } from 'mailparser';
import { type ApiClient, type TestPlatform, startTestPlatform } from '../support/platform.ts';
import { type PostfixInstance, getFreePort, postfixSkipReason, startPostfix } from '../support/postfix.ts';

/**
 * Issue 2, Done means 4: a reply written through the API to a conversation that came from
 * email reaches a mailbox behind a real Postfix as one MIME message threaded under the
 * original; with the relay stopped the reply waits, and goes out once the relay is back.
 */
const skip = postfixSkipReason();

/** Polls `fn` until it returns a truthy value or the deadline passes. */
async function until<T>(what: string, fn: () => Promise<T | null | undefined | false>, timeoutMs = 30_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

describe('outbound email through a real Postfix', { skip }, () => {
  let relayPort: number;
  let postfix: PostfixInstance;
  let tp: TestPlatform;
  let alice: ApiClient;

  before(async () => {
    relayPort = await getFreePort();
    postfix = await startPostfix({ listenPort: relayPort, mailboxDomains: ['remote.test'] });
    tp = await startTestPlatform({ relayUrl: `smtp://127.0.0.1:${relayPort}` });
    alice = await tp.user('alice@alpha.test');
  });
  after(async () => {
    await tp?.stop();
    await postfix?.stop();
  });

  it('threads an API reply under the original email, and holds it while the relay is down', async () => {
    const original = '<original-1@remote.test>';
    const inbound = nodemailer.createTransport({ host: '127.0.0.1', port: tp.platform.smtpPort!, secure: false, ignoreTLS: true });
    await inbound.sendMail({
      from: 'Bob Remote <bob@remote.test>',
      to: 'alice@alpha.test',
      subject: 'Quarterly numbers',
      messageId: original,
      text: 'Hi Alice, can you send the numbers?',
    });
    const list = await until('the emailed conversation', async () => {
      const r = await alice.get('/api/conversations?folder=inbox');
      return r.body.items.find((i: any) => i.subject === 'Quarterly numbers');
    });
    const key = list.key;

    const reply = await alice.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'message:add', body: 'Here they are: 42.' }] });
    assert.equal(reply.status, 200, JSON.stringify(reply.body));
    const [mail] = await postfix.waitForMail('bob', 'remote.test', 1, 30_000);
    const parsed = await simpleParser(mail);
    assert.equal(parsed.inReplyTo, original);
    const refs = Array.isArray(parsed.references) ? parsed.references : [parsed.references];
    assert.ok(refs.includes(original), `References ${JSON.stringify(refs)} should include ${original}`);
    assert.equal(parsed.from?.value[0].address, 'alice@alpha.test');
    assert.match(parsed.text ?? '', /Here they are: 42\./);
    assert.match(parsed.html || '', /Here they are: 42\./);
    assert.match(String(parsed.headers.get('content-type') && (parsed.headers.get('content-type') as any).value), /multipart\/alternative/);
    const firstMessageId = parsed.messageId!;

    // The relay goes away: the next reply waits as a pending delivery with the reason.
    await postfix.stop();
    const second = await alice.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'message:add', body: 'And the appendix.' }] });
    assert.equal(second.status, 200);
    const waiting = await until('a failed attempt recorded', async () => {
      const d = await alice.get(`/api/conversations/${key}/deliveries`);
      return d.body.deliveries.find((x: any) => x.action_id === second.body.actions[0].id && x.attempts >= 1 && x.state === 'pending');
    });
    assert.equal(waiting.recipient, 'bob@remote.test');
    assert.match(waiting.last_error, /relay/);

    // The relay is back on the same port: the reply goes out, threaded after the first.
    postfix = await startPostfix({ listenPort: relayPort, mailboxDomains: ['remote.test'] });
    const [late] = await postfix.waitForMail('bob', 'remote.test', 1, 60_000);
    const p2 = await simpleParser(late);
    assert.match(p2.text ?? '', /And the appendix\./);
    assert.equal(p2.inReplyTo, firstMessageId);
    const refs2 = Array.isArray(p2.references) ? p2.references : [p2.references];
    assert.ok(refs2.includes(original));
    const done = await until('the delivery marked sent', async () => {
      const d = await alice.get(`/api/conversations/${key}/deliveries`);
      return d.body.deliveries.find((x: any) => x.action_id === second.body.actions[0].id && x.state === 'sent');
    });
    assert.ok(done.attempts >= 2);
  });
});
