import { after, before } from 'node:test';
import type { Deps } from '../../src/context.ts';
import { runPluginContract } from '../../src/delivery/contract.ts';
import { smsPlugin } from '../../src/delivery/plugins/sms.ts';
import { testDeps } from './support/deps.ts';
import { type FakeSms, startFakeSms } from './support/fake-sms.ts';

/** Issue 4, Done means 1: the `sms` plugin passes the contract against a fake Twilio-like gateway that accepts, rejects, fails and times out. */
let env: Awaited<ReturnType<typeof testDeps>>;
let deps: Deps;
let gw: FakeSms;
before(async () => {
  env = await testDeps();
  deps = env.deps;
});
after(async () => env?.stop());

runPluginContract(smsPlugin, {
  name: 'sms → fake Twilio-like gateway',
  modes: ['accept', 'transient', 'permanent', 'hang'],
  async start() {
    gw = await startFakeSms();
  },
  async stop() {
    await gw.close();
  },
  deps: () => deps,
  config: () => ({ base_url: gw.baseUrl, account: gw.account, token: gw.token, from: '+15550001000' }),
  brokenConfigs: [
    {},
    { base_url: 'not a url', account: 'AC_test', token: 'test-token-0123456789', from: '+15550001000' },
    { base_url: 'http://127.0.0.1:1/', account: 'AC test/../x', token: 'test-token-0123456789', from: '+15550001000' },
    { base_url: 'http://127.0.0.1:1/', account: 'AC_test', token: 'test-token-0123456789', from: '0044 not a number!' },
  ],
  destination: () => '+15550002000',
  behave(mode) {
    gw.mode = mode;
  },
  async received(marker, atLeast, timeoutMs) {
    const mine = () => gw.messages.filter((m) => m.body.includes(marker));
    await gw.waitFor(`${atLeast} messages with ${marker}`, () => mine().length >= atLeast, timeoutMs).catch(() => {});
    return mine().map((m) => m.sid);
  },
});
