import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import type { Deps } from '../context.ts';
import type { Delivery, DeliveryPlugin, SendContext, SendResult } from './plugin.ts';

/** How a counterpart answers the next attempts. */
export type CounterpartMode = 'accept' | 'transient' | 'permanent' | 'hang';

/**
 * The real thing a plugin talks to, driven by the contract suite (issue 4 §6): an HTTP
 * receiver, an SMS gateway, an MTA. It must be a real server the plugin reaches over the
 * network, not a stand-in for the plugin's own code.
 */
export interface ContractCounterpart {
  /** Shown in the suite's title. */
  name: string;
  /** The modes this counterpart can produce; cases needing another are skipped (say why in `name`). */
  modes: readonly CounterpartMode[];
  start(): Promise<void>;
  stop(): Promise<void>;
  /** The dependencies `send` and `validate` get (configuration such as the relay URL). */
  deps(): Deps;
  /** The organisation's config of the plugin that points at this counterpart. */
  config(): Record<string, unknown>;
  /** Configs `validate(deps, config)` must reject (at least one). */
  brokenConfigs: Record<string, unknown>[];
  /** Optional: dependencies with which `validate(deps)` (start-up) must reject. */
  brokenDeps?(): Deps;
  /** A destination of this counterpart's recipient. */
  destination(): string;
  behave(mode: CounterpartMode): void;
  /**
   * What the counterpart took in whose text contains `marker`: one identity per copy it
   * keeps (after its own deduplication — a counterpart honouring idempotency keys keeps one
   * copy per key), e.g. the provider sid or the email's Message-ID. Waits until at least
   * `atLeast` copies are there or `timeoutMs` passes, then returns what it has.
   */
  received(marker: string, atLeast: number, timeoutMs: number): Promise<string[]>;
}

/** Options of the suite. */
export interface ContractOptions {
  /** Time limit given to `send` in the timeout case, in ms (default 600). */
  timeoutMs?: number;
  /** How long to wait for the counterpart to show what it received, in ms (default 20000: an MTA delivers asynchronously). */
  receiveMs?: number;
}

/** A delivery row as a worker would hand it to `plugin.send`, with a unique marker in its text. */
export function contractDelivery(plugin: DeliveryPlugin, destination: string, marker: string): Delivery {
  const now = new Date();
  return {
    id: 1 + Math.floor(Math.random() * 1e9),
    conv_id: null,
    action_id: null,
    plugin: plugin.name,
    destination,
    state: 'sending',
    attempts: 1,
    next_attempt_at: now,
    expires_at: null,
    last_error: null,
    provider_ref: null,
    idempotency_key: `contract-${marker}:${plugin.name}`,
    idempotency_base: `contract-${marker}`,
    payload: { text: `Contract test message ${marker}.`, subject: `Contract ${marker}`, contact: { name: 'Contract Contact' } },
    locked_by: 'contract',
    locked_until: null,
    created_at: now,
    updated_at: now,
    org_id: 1,
    outbound_message_id: null,
    contact_id: null,
    blast_id: null,
    chain: [plugin.name],
    chain_index: 0,
    destinations: { [plugin.name]: destination },
    fallback_at: null,
    fallback_policy: null,
    step_started_at: now,
    sent_at: null,
    delivered_at: null,
    read_at: null,
    replied_at: null,
  };
}

/** Calls `send` like a worker: with the config, an AbortSignal that fires after `timeoutMs`. */
async function sendAsWorker(plugin: DeliveryPlugin, d: Delivery, deps: Deps, config: Record<string, unknown>, timeoutMs: number): Promise<SendResult> {
  const ac = new AbortController();
  const timer = setTimeout(() => ac.abort(), timeoutMs);
  try {
    const ctx: SendContext = { config, signal: ac.signal, timeoutMs, orgId: d.org_id };
    return await plugin.send(d, deps, ctx);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * `runPluginContract` — the contract every delivery plugin passes (issue 4 §6; modelled on
 * automerge-repo's storage-adapter-tests). Registers a node:test `describe` block; call it
 * at the top level of a test file with a factory of the plugin and a real counterpart. A
 * plugin must:
 * 1. declare a name, a config schema and capabilities, and refuse an empty destination;
 * 2. pass `validate` at start-up and with a good config; reject every broken config;
 * 3. accept a valid delivery, returning a provider ref (string) or null, and the counterpart has it;
 * 4. return `retry` for a transient counterpart failure and `failed` for a permanent one;
 * 5. be idempotent per idempotency key: the same delivery sent twice is kept once by a
 *    counterpart honouring keys (`dedupe: 'key'`, with the same provider ref), or arrives
 *    with the same identity both times (`dedupe: 'message-id'`);
 * 6. time out cleanly: against a counterpart that never answers, resolve with `retry` once
 *    the attempt's signal fires (the case has a generous test timeout, not a timing assertion).
 */
export function runPluginContract(makePlugin: () => DeliveryPlugin | Promise<DeliveryPlugin>, counterpart: ContractCounterpart, opts: ContractOptions = {}): void {
  const timeoutMs = opts.timeoutMs ?? 600;
  const receiveMs = opts.receiveMs ?? 20_000;
  const can = (m: CounterpartMode) => (counterpart.modes.includes(m) ? false : `${counterpart.name} cannot produce "${m}"`);

  describe(`delivery plugin contract: ${counterpart.name}`, () => {
    let plugin: DeliveryPlugin;
    const marker = () => randomBytes(6).toString('hex');
    before(async () => {
      await counterpart.start();
      plugin = await makePlugin();
    });
    after(async () => {
      await counterpart.stop();
    });

    it('declares a name, a config schema and capabilities, and refuses an empty destination', () => {
      assert.match(plugin.name, /^[a-z][a-z0-9_-]*$/);
      assert.equal(typeof plugin.configSchema, 'object');
      for (const k of ['receipts', 'read', 'replies'] as const) assert.equal(typeof plugin.capabilities[k], 'boolean', `capabilities.${k}`);
      assert.ok(['key', 'message-id', 'local'].includes(plugin.capabilities.dedupe));
      assert.equal(plugin.checkDestination(counterpart.destination()), null);
      assert.notEqual(plugin.checkDestination(''), null);
    });

    it('validates at start-up and a good config, and rejects a broken config', async () => {
      await plugin.validate(counterpart.deps());
      await plugin.validate(counterpart.deps(), counterpart.config());
      assert.ok(counterpart.brokenConfigs.length > 0, 'the counterpart names at least one broken config');
      for (const c of counterpart.brokenConfigs) await assert.rejects(plugin.validate(counterpart.deps(), c), `config ${JSON.stringify(c)} must be rejected`);
      if (counterpart.brokenDeps) await assert.rejects(plugin.validate(counterpart.brokenDeps()));
    });

    it('accepts a valid delivery with a provider ref or null, and the counterpart has it', { skip: can('accept') }, async () => {
      counterpart.behave('accept');
      const m = marker();
      const r = await sendAsWorker(plugin, contractDelivery(plugin, counterpart.destination(), m), counterpart.deps(), counterpart.config(), 10_000);
      assert.equal(r.outcome, 'accepted', JSON.stringify(r));
      const ref = (r as { providerRef?: string | null }).providerRef;
      assert.ok(ref === undefined || ref === null || (typeof ref === 'string' && ref.length > 0), `provider ref ${JSON.stringify(ref)}`);
      const got = await counterpart.received(m, 1, receiveMs);
      assert.equal(got.length, 1);
    });

    it('returns retry for a transient counterpart failure', { skip: can('transient') }, async () => {
      counterpart.behave('transient');
      const r = await sendAsWorker(plugin, contractDelivery(plugin, counterpart.destination(), marker()), counterpart.deps(), counterpart.config(), 10_000);
      assert.equal(r.outcome, 'retry', JSON.stringify(r));
      assert.ok((r as { error: string }).error.length > 0);
    });

    it('returns failed for a permanent counterpart failure', { skip: can('permanent') }, async () => {
      counterpart.behave('permanent');
      const r = await sendAsWorker(plugin, contractDelivery(plugin, counterpart.destination(), marker()), counterpart.deps(), counterpart.config(), 10_000);
      assert.equal(r.outcome, 'failed', JSON.stringify(r));
      assert.ok((r as { error: string }).error.length > 0);
    });

    it('is idempotent per idempotency key', { skip: can('accept') }, async () => {
      counterpart.behave('accept');
      const m = marker();
      const d = contractDelivery(plugin, counterpart.destination(), m);
      const r1 = await sendAsWorker(plugin, d, counterpart.deps(), counterpart.config(), 10_000);
      const r2 = await sendAsWorker(plugin, d, counterpart.deps(), counterpart.config(), 10_000);
      assert.equal(r1.outcome, 'accepted', JSON.stringify(r1));
      assert.equal(r2.outcome, 'accepted', JSON.stringify(r2));
      if (plugin.capabilities.dedupe === 'key') {
        const got = await counterpart.received(m, 1, receiveMs);
        assert.equal(got.length, 1, `the counterpart kept ${got.length} copies of one idempotency key`);
        assert.equal((r2 as { providerRef?: string | null }).providerRef ?? null, (r1 as { providerRef?: string | null }).providerRef ?? null);
      } else if (plugin.capabilities.dedupe === 'message-id') {
        const got = await counterpart.received(m, 2, receiveMs);
        assert.equal(got.length, 2);
        assert.equal(got[0], got[1], 'both copies carry the same identity (Message-ID)');
      }
    });

    it('times out cleanly against a counterpart that never answers', { skip: can('hang'), timeout: timeoutMs + 15_000 }, async () => {
      counterpart.behave('hang');
      const r = await sendAsWorker(plugin, contractDelivery(plugin, counterpart.destination(), marker()), counterpart.deps(), counterpart.config(), timeoutMs);
      assert.equal(r.outcome, 'retry', JSON.stringify(r));
      counterpart.behave('accept');
    });
  });
}
