import { type Deps, primaryDomain } from '../context.ts';
import { outboundMessageId } from '../mail/outbound/enqueue.ts';
import { badRequest } from '../platform/errors.ts';
import type { Tx } from '../store/db.ts';
import type { DeliveryPlugin, MessagePayload } from './plugin.ts';
import { knownPlugins } from './registry.ts';
import { nextStep, wakeWorkers } from './state.ts';

/** Limits of `enqueueDelivery` (docs/delivery.md). */
export const ENQUEUE_LIMITS = {
  /** Most plugins in one servicechain. */
  maxChain: 8,
  /** Longest idempotency key, in characters. */
  maxKey: 200,
  /** Longest time-window fallback, in seconds (30 days). */
  maxFallbackS: 30 * 86_400,
} as const;

/** One delivery to enqueue: a message to one recipient along a servicechain (issue 4 §2, §3). */
export interface EnqueueDeliveryInput {
  /** The servicechain: plugin names in order, each at most once, e.g. `['sms', 'smtp']`. */
  chain: string[];
  /** This recipient's destination per plugin (`{sms: '+447700900123', smtp: 'ann@example.com', webhook: 'contact-17'}`); steps without one are skipped. */
  destinations: Record<string, string>;
  /** What the plugins render (see MessagePayload): `text`, `subject`, `contact`, … */
  payload: MessagePayload;
  /** The caller's idempotency key (≤ 200 characters): a second enqueue with it returns null and writes nothing. Each chain step sends with `<key>:<plugin>`. */
  idempotencyKey: string;
  /** The conversation and action the message is (the smtp plugin renders that action; replies thread). */
  convId?: number;
  actionId?: number;
  orgId?: number;
  outboundMessageId?: number;
  contactId?: number;
  blastId?: number;
  /** After this the message is worthless: whichever step it is on, it fails (no fallback). */
  expiresAt?: Date;
  /** Time-window fallback in seconds: move on when a sent step is not delivered / not read in time (only for plugins that report it). */
  fallback?: { notDeliveredS?: number; notReadS?: number };
}

/**
 * Checks a servicechain: 1 to 8 plugin names, each known to this process and used once.
 * Exported so the organisations API can check chains (organisation, contact, message) before storing them.
 * @throws AppError 400 `invalid_chain` (empty, too long, repeated plugin) or `unknown_plugin`
 */
export function checkChain(chain: unknown, plugins: Map<string, DeliveryPlugin> = knownPlugins()): string[] {
  if (!Array.isArray(chain) || chain.length === 0 || chain.length > ENQUEUE_LIMITS.maxChain)
    throw badRequest('invalid_chain', `a servicechain is a list of 1 to ${ENQUEUE_LIMITS.maxChain} plugin names`, { chain });
  const seen = new Set<string>();
  for (const name of chain) {
    if (typeof name !== 'string' || !plugins.has(name))
      throw badRequest('unknown_plugin', `unknown delivery plugin ${JSON.stringify(name)}; plugins are ${[...plugins.keys()].join(', ')}`, { plugin: name, plugins: [...plugins.keys()] });
    if (seen.has(name)) throw badRequest('invalid_chain', `plugin ${name} appears twice in the servicechain (one plugin never sends a message twice)`, { chain });
    seen.add(name);
  }
  return chain as string[];
}

/**
 * Checks one destination for a plugin (e.g. a phone number for `sms` must be E.164).
 * @throws AppError 400 `invalid_destination` with {plugin, reason}, or `unknown_plugin`
 */
export function checkDestination(plugin: string, destination: unknown, plugins: Map<string, DeliveryPlugin> = knownPlugins()): string {
  const p = plugins.get(plugin);
  if (!p) throw badRequest('unknown_plugin', `unknown delivery plugin ${JSON.stringify(plugin)}`, { plugin });
  const problem = typeof destination !== 'string' ? 'a destination is a string' : p.checkDestination(destination);
  if (problem) throw badRequest('invalid_destination', `invalid ${plugin} destination: ${problem}`, { plugin, reason: problem });
  return destination as string;
}

function checkSeconds(name: string, v: unknown): number | undefined {
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 1 || v > ENQUEUE_LIMITS.maxFallbackS)
    throw badRequest('invalid_fallback', `${name} is a whole number of seconds from 1 to ${ENQUEUE_LIMITS.maxFallbackS}`, { [name]: v });
  return v;
}

/**
 * `enqueueDelivery` — creates, in the caller's transaction (the transactional outbox), the
 * delivery row of one message to one recipient along a servicechain (issue 4 §2–3;
 * docs/delivery.md). The row starts at the first step whose plugin has a destination for
 * this recipient; workers are woken at commit. With `smtp` in the chain and a conversation
 * action, the email's Message-ID is recorded for threading replies (as the email bridge does).
 * A recipient with no destination for any step gets a row that is `failed` at once (a dead
 * letter saying so) rather than an error, so a blast still accounts for every contact.
 * @returns the delivery id, or null when a delivery with this idempotency key exists (nothing written)
 * @throws AppError 400 `invalid_chain` / `unknown_plugin` / `invalid_destination` / `invalid_fallback` /
 *   `invalid_idempotency_key` — the caller's transaction must roll back
 */
export async function enqueueDelivery(tx: Tx, deps: Deps, d: EnqueueDeliveryInput): Promise<number | null> {
  const plugins = knownPlugins();
  const chain = checkChain(d.chain, plugins);
  if (typeof d.idempotencyKey !== 'string' || d.idempotencyKey.length === 0 || d.idempotencyKey.length > ENQUEUE_LIMITS.maxKey || /[\x00-\x1f\x7f]/.test(d.idempotencyKey))
    throw badRequest('invalid_idempotency_key', `an idempotency key is 1 to ${ENQUEUE_LIMITS.maxKey} characters without control characters`);
  const destinations: Record<string, string> = {};
  for (const name of chain) {
    const v = d.destinations?.[name];
    if (v === undefined || v === null || v === '') continue;
    destinations[name] = checkDestination(name, v, plugins);
  }
  const fallback = {
    not_delivered_s: checkSeconds('notDeliveredS', d.fallback?.notDeliveredS),
    not_read_s: checkSeconds('notReadS', d.fallback?.notReadS),
  };
  const payload: MessagePayload = { ...(d.payload ?? {}) };
  if (d.convId !== undefined && (payload.conversation_key === undefined || (chain.includes('smtp') && d.actionId !== undefined))) {
    const conv = await tx.selectFrom('conversations').select('key').where('id', '=', d.convId).executeTakeFirst();
    if (!conv) throw badRequest('unknown_conversation', `no conversation ${d.convId}`);
    payload.conversation_key ??= conv.key;
    if (chain.includes('smtp') && d.actionId !== undefined) {
      payload.message_id ??= outboundMessageId(conv.key, d.actionId, primaryDomain(deps));
      await tx
        .insertInto('email_messages')
        .values({ conv_id: d.convId, message_id: payload.message_id, direction: 'out', action_id: d.actionId })
        .onConflict((oc) => oc.doNothing())
        .execute();
    }
  }
  const now = new Date(deps.clock.now());
  const first = nextStep(chain, destinations, -1);
  const plugin = first?.plugin ?? chain[0];
  const row = await tx
    .insertInto('deliveries')
    .values({
      conv_id: d.convId ?? null,
      action_id: d.actionId ?? null,
      org_id: d.orgId ?? null,
      outbound_message_id: d.outboundMessageId ?? null,
      contact_id: d.contactId ?? null,
      blast_id: d.blastId ?? null,
      plugin,
      destination: first?.destination ?? '',
      chain,
      chain_index: first?.index ?? 0,
      destinations: JSON.stringify(destinations),
      idempotency_base: d.idempotencyKey,
      idempotency_key: `${d.idempotencyKey}:${plugin}`,
      payload: JSON.stringify(payload),
      expires_at: d.expiresAt ?? null,
      fallback_policy: fallback.not_delivered_s || fallback.not_read_s ? JSON.stringify(fallback) : null,
      step_started_at: now,
      next_attempt_at: now,
      last_error: first ? null : `no destination for any plugin of the servicechain [${chain.join(', ')}]`,
      provider_ref: null,
      locked_by: null,
      locked_until: null,
      ...(first ? {} : { state: 'failed' as const }),
    })
    .onConflict((oc) => oc.doNothing())
    .returning('id')
    .executeTakeFirst();
  if (!row) return null;
  if (first) await wakeWorkers(tx);
  return row.id;
}
