import { after, before } from 'node:test';
import type { Deps } from '../../src/context.ts';
import { runPluginContract } from '../../src/delivery/contract.ts';
import { webhookPlugin } from '../../src/delivery/plugins/webhook.ts';
import { testDeps } from './support/deps.ts';
import { type WebhookReceiver, startWebhookReceiver } from './support/webhook-receiver.ts';

/** Issue 4, Done means 1: the `webhook` plugin passes the contract against a local HTTP receiver that checks signatures and honours idempotency keys. */
let env: Awaited<ReturnType<typeof testDeps>>;
let deps: Deps;
let rx: WebhookReceiver;
before(async () => {
  env = await testDeps();
  deps = env.deps;
});
after(async () => env?.stop());

runPluginContract(webhookPlugin, {
  name: 'webhook → local HTTP receiver',
  modes: ['accept', 'transient', 'permanent', 'hang'],
  async start() {
    rx = await startWebhookReceiver();
  },
  async stop() {
    await rx.close();
  },
  deps: () => deps,
  config: () => ({ url: rx.url, secret: rx.secret }),
  brokenConfigs: [{}, { url: 'ftp://example.test/x', secret: 'webhook-secret-0123456789abcdef' }, { url: 'http://example.test/', secret: 'short' }, { url: 'http://example.test/', secret: 'webhook-secret-0123456789abcdef', extra: 1 }],
  destination: () => 'contact-17',
  behave(mode) {
    rx.mode = mode;
  },
  async received(marker, atLeast, timeoutMs) {
    const mine = () => rx.kept.filter((k) => String(k.body.text).includes(marker));
    await rx.waitFor(`${atLeast} deliveries with ${marker}`, () => mine().length >= atLeast, timeoutMs).catch(() => {});
    return mine().map((k) => k.key);
  },
});
