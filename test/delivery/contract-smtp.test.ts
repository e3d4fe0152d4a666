import { createServer, type Server, type Socket } from 'node:net';
import { after, before } from 'node:test';
import type { Deps } from '../../src/context.ts';
import { runPluginContract } from '../../src/delivery/contract.ts';
import { closeSmtpTransports, smtpPlugin } from '../../src/mail/outbound/smtp-plugin.ts';
import { type PostfixInstance, postfixSkipReason, startPostfix } from '../support/postfix.ts';
import { type SmtpSink, extractMessageId, startSmtpSink } from '../support/smtp-sink.ts';
import { testDeps } from './support/deps.ts';

/**
 * Issue 4, Done means 1: the `smtp` plugin passes the contract — against a real Postfix for
 * acceptance and idempotency (skipped where Postfix cannot run), and against the in-process
 * SMTP sink for the failure modes (451 → retry, 550 → failed) and a relay that never greets.
 */
let env: Awaited<ReturnType<typeof testDeps>>;
before(async () => {
  env = await testDeps();
});
after(async () => {
  closeSmtpTransports();
  await env?.stop();
});
const withRelay = (relayUrl: string): Deps => ({ ...env.deps, config: { ...env.deps.config, relayUrl } });
const broken = [{ from: 'someone@example.test' }];

let sink: SmtpSink;
let silent: Server;
const sockets = new Set<Socket>();
let mode = 'accept';
runPluginContract(() => smtpPlugin, {
  name: 'smtp → SMTP sink (4xx, 5xx) and a silent relay',
  modes: ['accept', 'transient', 'permanent', 'hang'],
  async start() {
    sink = await startSmtpSink();
    silent = createServer((s) => {
      sockets.add(s);
      s.on('close', () => sockets.delete(s));
    });
    await new Promise<void>((r) => silent.listen(0, '127.0.0.1', r));
  },
  async stop() {
    for (const s of sockets) s.destroy();
    await new Promise<void>((r) => silent.close(() => r()));
    await sink.close();
  },
  deps: () => (mode === 'hang' ? withRelay(`smtp://127.0.0.1:${(silent.address() as any).port}`) : withRelay(`smtp://127.0.0.1:${sink.port}`)),
  brokenDeps: () => withRelay('http://relay.example.test/'),
  config: () => ({}),
  brokenConfigs: broken,
  destination: () => 'ann@remote.test',
  behave(m) {
    mode = m;
    sink.setFailure(m === 'transient' ? { code: 451, message: 'try again later' } : m === 'permanent' ? { code: 550, message: 'no such user' } : null);
  },
  async received(marker, atLeast, timeoutMs) {
    const mine = () => sink.messages.filter((m) => m.raw.toString('latin1').includes(marker));
    const deadline = Date.now() + timeoutMs;
    while (mine().length < atLeast && Date.now() < deadline) await sink.waitForMessages(sink.messages.length + 1, Math.max(1, deadline - Date.now())).catch(() => {});
    return mine().map((m) => m.messageId ?? '');
  },
});

const skip = postfixSkipReason();
let postfix: PostfixInstance | null = null;
runPluginContract(() => smtpPlugin, {
  name: `smtp → real Postfix${skip ? ` (skipped: ${skip})` : ''} (accept and idempotency; failure modes are the sink's)`,
  modes: skip ? [] : ['accept'],
  async start() {
    if (!skip) postfix = await startPostfix({ mailboxDomains: ['remote.test'] });
  },
  async stop() {
    await postfix?.stop();
  },
  deps: () => withRelay(postfix ? `smtp://127.0.0.1:${postfix.port}` : 'smtp://127.0.0.1:1'),
  config: () => ({}),
  brokenConfigs: broken,
  destination: () => 'bob@remote.test',
  behave() {},
  async received(marker, atLeast, timeoutMs) {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const all = await postfix!.waitForMail('bob', 'remote.test', 0, 1000);
      const mine = all.filter((raw) => raw.toString('latin1').includes(marker));
      if (mine.length >= atLeast || Date.now() > deadline) return mine.map((raw) => extractMessageId(raw) ?? '');
      await new Promise((r) => setTimeout(r, 100));
    }
  },
});
