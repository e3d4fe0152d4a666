// Proves the Postfix test harness (test/support/postfix.ts) against a REAL Postfix:
// relay mode into an in-process sink, mailbox mode into Maildirs, deferral on a 4xx
// from the relay target and delivery after a flush, and two instances chained.
// Skipped (not failed) where Postfix is missing: run scripts/install-system-deps.sh.
import assert from 'node:assert/strict';
import { describe, test, type TestContext } from 'node:test';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { createTransport } from 'nodemailer';
import { postfixSkipReason, startPostfix, type PostfixInstance } from './support/postfix.ts';
import { startSmtpSink, type SmtpSink } from './support/smtp-sink.ts';

const skip = postfixSkipReason();

/** Sends one message over plain SMTP to host:port with nodemailer. */
async function send(
  to: { host: string; port: number },
  mail: { from: string; to: string | string[]; subject: string; text: string; messageId: string },
): Promise<void> {
  const transport = createTransport({
    host: to.host,
    port: to.port,
    secure: false,
    ignoreTLS: true,
    name: 'client.parley.test',
    connectionTimeout: 10_000,
  });
  try {
    const info = await transport.sendMail({ ...mail, headers: { 'X-Parley-Test': 'postfix-harness' } });
    assert.deepEqual(info.rejected, [], 'Postfix rejected a recipient');
  } finally {
    transport.close();
  }
}

/** What each harness test gets: Postfix and sink starters whose instances are cleaned up. */
interface Harness {
  postfix(opts: Parameters<typeof startPostfix>[0]): Promise<PostfixInstance>;
  sink(opts?: Parameters<typeof startSmtpSink>[0]): Promise<SmtpSink>;
}

/**
 * Declares a test that starts Postfix instances and sinks through `h`; on failure it
 * prints every instance's log, and it always stops them all.
 */
function harnessTest(name: string, body: (t: TestContext, h: Harness) => Promise<void>): void {
  test(name, async (t) => {
    const instances: PostfixInstance[] = [];
    const sinks: SmtpSink[] = [];
    const h: Harness = {
      async postfix(opts) {
        const started = Date.now();
        const pf = await startPostfix(opts);
        instances.push(pf);
        t.diagnostic(`postfix ${pf.host}:${pf.port} started in ${Date.now() - started} ms`);
        return pf;
      },
      async sink(opts) {
        const s = await startSmtpSink(opts);
        sinks.push(s);
        return s;
      },
    };
    try {
      await body(t, h);
    } catch (err) {
      for (const pf of instances) {
        process.stderr.write(`--- postfix log ${pf.host}:${pf.port} (${pf.logFile}) ---\n${await pf.readLog()}\n`);
      }
      throw err;
    } finally {
      await Promise.all(instances.map((pf) => pf.stop()));
      await Promise.all(sinks.map((s) => s.close()));
    }
  });
}

/** Header block of a raw message, unfolded, as lower-cased name -> values. */
function headers(raw: Buffer): Map<string, string[]> {
  const text = raw.toString('utf8');
  const end = text.indexOf('\r\n\r\n') >= 0 ? text.indexOf('\r\n\r\n') : text.indexOf('\n\n');
  const block = text.slice(0, end).replace(/\r?\n[ \t]+/g, ' ');
  const out = new Map<string, string[]>();
  for (const line of block.split(/\r?\n/)) {
    const i = line.indexOf(':');
    if (i <= 0) continue;
    const name = line.slice(0, i).toLowerCase();
    out.set(name, [...(out.get(name) ?? []), line.slice(i + 1).trim()]);
  }
  return out;
}

/** Polls `check` every 50 ms until it returns something truthy; fails after `timeoutMs`. */
async function waitFor<T>(what: string, check: () => Promise<T | undefined | false>, timeoutMs = 15_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await check();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

function masterPid(pf: PostfixInstance): number {
  return Number(readFileSync(join(pf.queueDir, 'pid', 'master.pid'), 'utf8').trim());
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** Warnings/errors in a Postfix log, ignoring none: a clean config logs none. */
function logProblems(log: string): string[] {
  return log.split('\n').filter((l) => /\b(warning|error|fatal|panic):/.test(l));
}

describe('postfix harness', { skip, timeout: 120_000 }, () => {
  harnessTest('relay mode delivers into the smtp sink with the original envelope', async (t, h) => {
    const sink = await h.sink();
    const pf = await h.postfix({ relayHost: { host: sink.host, port: sink.port }, myDomains: ['parley.test'] });

    await send(pf, {
      from: 'corpus@origin.test',
      to: ['alice@parley.test', 'bob@elsewhere.test'],
      subject: 'relay mode',
      text: 'hello through postfix\n',
      messageId: '<relay-1@origin.test>',
    });
    const [msg] = await sink.waitForMessages(1, 20_000);
    assert.equal(msg.mailFrom, 'corpus@origin.test');
    assert.deepEqual([...msg.rcptTo].sort(), ['alice@parley.test', 'bob@elsewhere.test']);
    assert.equal(msg.messageId, '<relay-1@origin.test>');
    assert.equal(msg.remoteAddress, '127.0.0.1');
    const hdr = headers(msg.raw);
    assert.equal(hdr.get('subject')?.[0], 'relay mode');
    assert.equal(hdr.get('x-parley-test')?.[0], 'postfix-harness');
    assert.match(hdr.get('received')?.[0] ?? '', /by mx-[\w-]+\.postfix\.test \(Postfix\)/);
    await pf.waitForQueueEmpty(10_000);
    assert.deepEqual(logProblems(await pf.readLog()), []);

    const pid = masterPid(pf);
    assert.ok(isAlive(pid), 'master running before stop');
    const stopping = Date.now();
    await pf.stop();
    t.diagnostic(`postfix stopped in ${Date.now() - stopping} ms`);
    assert.ok(!isAlive(pid), 'master gone after stop');
  });

  harnessTest('mailbox mode delivers into per-recipient Maildirs', async (_t, h) => {
    const pf = await h.postfix({ mailboxDomains: ['example.test', 'other.test'], messageSizeLimit: 5_000_000 });

    await send(pf, {
      from: 'parley@parley.test',
      to: ['carol@example.test', 'Dave@Other.test'],
      subject: 'mailbox mode',
      text: 'hello mailbox\n',
      messageId: '<mailbox-1@parley.test>',
    });
    const [carol] = await pf.waitForMail('carol', 'example.test', 1, 20_000);
    const hdr = headers(carol);
    assert.equal(hdr.get('message-id')?.[0], '<mailbox-1@parley.test>');
    assert.equal(hdr.get('subject')?.[0], 'mailbox mode');
    assert.equal(hdr.get('from')?.[0], 'parley@parley.test');
    assert.equal(hdr.get('return-path')?.[0], '<parley@parley.test>');
    assert.equal(hdr.get('delivered-to')?.[0], 'carol@example.test');
    assert.match(carol.toString('utf8'), /\nhello mailbox\r?\n/);

    // Local part and domain are matched case-insensitively.
    const [dave] = await pf.waitForMail('dave', 'other.test', 1, 20_000);
    assert.equal(headers(dave).get('message-id')?.[0], '<mailbox-1@parley.test>');
    assert.deepEqual(await pf.readMailbox('nobody', 'example.test'), []);

    // A second message lands after the first, in order.
    await send(pf, {
      from: 'parley@parley.test',
      to: 'carol@example.test',
      subject: 'second',
      text: 'two\n',
      messageId: '<mailbox-2@parley.test>',
    });
    const both = await pf.waitForMail('carol', 'example.test', 2, 20_000);
    assert.deepEqual(
      both.map((m) => headers(m).get('message-id')?.[0]),
      ['<mailbox-1@parley.test>', '<mailbox-2@parley.test>'],
    );
    await pf.waitForQueueEmpty(10_000);
  });

  harnessTest('relay mode keeps mail queued on a 4xx and delivers after the relay recovers', async (_t, h) => {
    const sink = await h.sink({ failWith: { code: 451, message: 'try again later', stage: 'rcpt' } });
    const pf = await h.postfix({ relayHost: { host: sink.host, port: sink.port } });

    await send(pf, {
      from: 'corpus@origin.test',
      to: 'alice@parley.test',
      subject: 'deferred',
      text: 'retry me\n',
      messageId: '<deferred-1@origin.test>',
    });
    const [rej] = await sink.waitForRejections(1, 20_000);
    assert.equal(rej.code, 451);
    assert.equal(rej.mailFrom, 'corpus@origin.test');
    assert.equal(sink.messages.length, 0);
    assert.equal(await pf.queueIsEmpty(), false);

    // The message sits in the deferred queue with the relay's reason.
    const entry = await waitFor('the message in the deferred queue', async () =>
      (await pf.listQueue()).find((e) => e.queue_name === 'deferred'),
    );
    assert.equal(entry.sender, 'corpus@origin.test');
    assert.equal(entry.recipients[0].address, 'alice@parley.test');
    assert.match(entry.recipients[0].delay_reason ?? '', /451/);
    assert.equal(await pf.queueIsEmpty(), false);

    sink.setFailure(null);
    await pf.flushQueue();
    const [msg] = await sink.waitForMessages(1, 20_000);
    assert.equal(msg.messageId, '<deferred-1@origin.test>');
    assert.deepEqual(msg.rcptTo, ['alice@parley.test']);
    await pf.waitForQueueEmpty(10_000);
    assert.equal(sink.messages.length, 1, 'delivered exactly once');
  });

  harnessTest('relay mode retries by itself, within seconds, once a down relay comes back', async (_t, h) => {
    const first = await h.sink();
    const port = first.port;
    await first.close(); // nothing listens on `port` now: connection refused
    const pf = await h.postfix({ relayHost: { host: '127.0.0.1', port } });

    await send(pf, {
      from: 'corpus@origin.test',
      to: 'alice@parley.test',
      subject: 'relay down',
      text: 'wait for me\n',
      messageId: '<down-1@origin.test>',
    });
    await waitFor('the message deferred with connection refused', async () =>
      (await pf.listQueue()).some((e) => /refused/i.test(e.recipients[0]?.delay_reason ?? '')),
    );

    const back = await h.sink({ port });
    const started = Date.now();
    const [msg] = await back.waitForMessages(1, 20_000); // no flushQueue(): the retry timer does it
    assert.equal(msg.messageId, '<down-1@origin.test>');
    assert.ok(Date.now() - started < 10_000, `retried after ${Date.now() - started} ms`);
    await pf.waitForQueueEmpty(10_000);
  });

  harnessTest('two instances at once: a relay instance feeding a mailbox instance', async (_t, h) => {
    const inbox = await h.postfix({ mailboxDomains: ['chain.test'] });
    const hop = await h.postfix({ listenHost: '127.0.0.2', relayHost: { host: inbox.host, port: inbox.port } });
    assert.notEqual(hop.configDir, inbox.configDir);
    assert.notEqual(hop.queueDir, inbox.queueDir);

    await send(hop, {
      from: 'sender@origin.test',
      to: 'erin@chain.test',
      subject: 'two hops',
      text: 'via two postfixes\n',
      messageId: '<chain-1@origin.test>',
    });
    const [m] = await inbox.waitForMail('erin', 'chain.test', 1, 20_000);
    const hdr = headers(m);
    assert.equal(hdr.get('message-id')?.[0], '<chain-1@origin.test>');
    assert.equal(hdr.get('received')?.length, 2, 'one Received header per Postfix hop');
    await hop.waitForQueueEmpty(10_000);
    await inbox.waitForQueueEmpty(10_000);
  });
});
