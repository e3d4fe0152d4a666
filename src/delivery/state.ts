import type { Updateable } from 'kysely';
import { notifyAfterCommit, type Tx } from '../store/db.ts';
import type { DeliveriesTable } from '../store/schema.ts';
import type { Delivery, PluginCapabilities } from './plugin.ts';

/**
 * Per-recipient delivery state (issue 4 §3): pending → sending → sent → delivered → read →
 * replied, or failed / cancelled. The rank orders the forward states; an event never moves a
 * row backwards (a late "delivered" after "read" changes nothing).
 */
export const STATE_RANK: Readonly<Record<string, number>> = { pending: 0, sending: 1, sent: 2, delivered: 3, read: 4, replied: 5 };

/** One step of a servicechain: its index in the chain, its plugin and this recipient's destination there. */
export interface ChainStep {
  index: number;
  plugin: string;
  destination: string;
}

/** Time-window fallback of a row (`deliveries.fallback_policy`), in seconds. */
export interface FallbackPolicy {
  not_delivered_s?: number;
  not_read_s?: number;
}

/**
 * The first step after index `after` whose plugin has a destination for this recipient
 * (steps without one — an `sms` step for a contact without a phone — are skipped), or null.
 */
export function nextStep(chain: readonly string[] | null, destinations: Readonly<Record<string, string>> | null, after: number): ChainStep | null {
  if (!chain) return null;
  for (let i = after + 1; i < chain.length; i++) {
    const dest = destinations?.[chain[i]];
    if (typeof dest === 'string' && dest !== '') return { index: i, plugin: chain[i], destination: dest };
  }
  return null;
}

/** The idempotency key of one chain step: `<base>:<plugin>` (so one plugin never sends one message twice). */
export function stepKey(d: Pick<Delivery, 'idempotency_base' | 'idempotency_key'>, plugin: string): string {
  return `${d.idempotency_base ?? d.idempotency_key}:${plugin}`;
}

/**
 * When an accepted step falls back if nothing more is heard (docs/delivery.md, "Time-window
 * fallback"): `sent + not_delivered_s` while not delivered, if the plugin reports delivery
 * receipts; else `sent + not_read_s` while not read, if it reports read receipts; null when
 * neither applies or there is no later step to fall back to.
 */
export function fallbackDeadline(d: Pick<Delivery, 'chain' | 'destinations' | 'chain_index' | 'fallback_policy'>, caps: PluginCapabilities | undefined, sentAt: Date, delivered: boolean): Date | null {
  const fp = (d.fallback_policy ?? {}) as FallbackPolicy;
  if (!caps || !nextStep(d.chain, d.destinations, d.chain_index)) return null;
  if (!delivered && fp.not_delivered_s && caps.receipts) return new Date(sentAt.getTime() + fp.not_delivered_s * 1000);
  if (fp.not_read_s && caps.read) return new Date(sentAt.getTime() + fp.not_read_s * 1000);
  return null;
}

/**
 * The change that moves a row on from its current step because of `reason`: to the next
 * step with a destination (state `pending`, attempts reset, that step's idempotency key,
 * per-step times cleared), or — after the last step — to `failed`, a dead letter.
 */
export function moveOnChange(d: Delivery, reason: string, now: Date): { set: Updateable<DeliveriesTable>; to: ChainStep | null } {
  const to = nextStep(d.chain, d.destinations, d.chain_index);
  const common = { last_error: reason.slice(0, 2000), locked_by: null, locked_until: null, fallback_at: null, updated_at: now };
  if (!to) return { set: { ...common, state: 'failed' }, to: null };
  return {
    to,
    set: {
      ...common,
      state: 'pending',
      chain_index: to.index,
      plugin: to.plugin,
      destination: to.destination,
      attempts: 0,
      next_attempt_at: now,
      idempotency_key: stepKey(d, to.plugin),
      provider_ref: null,
      step_started_at: now,
      sent_at: null,
      delivered_at: null,
      read_at: null,
    },
  };
}

/** The `detail` (JSON text) of a `fallback` event: `{from: {index, plugin}, to: {index, plugin} | null, reason}`. */
export function fallbackDetail(d: Pick<Delivery, 'chain_index' | 'plugin'>, to: ChainStep | null, reason: string): string {
  return JSON.stringify({ from: { index: d.chain_index, plugin: d.plugin }, to: to ? { index: to.index, plugin: to.plugin } : null, reason: reason.slice(0, 2000) });
}

/** Records a `fallback` event: the row left step `from` for `to` (or for the dead letters) because of `reason`. */
export async function recordFallback(tx: Tx, d: Delivery, to: ChainStep | null, reason: string): Promise<void> {
  await tx
    .insertInto('delivery_events')
    .values({
      delivery_id: d.id,
      org_id: d.org_id,
      plugin: d.plugin,
      kind: 'fallback',
      provider_ref: d.provider_ref,
      detail: fallbackDetail(d, to, reason),
    })
    .execute();
}

/** Notifies workers that deliveries are due (LISTEN parley_deliveries); delivered at commit. */
export async function wakeWorkers(tx: Tx): Promise<void> {
  await notifyAfterCommit(tx, 'parley_deliveries', '');
}

/**
 * Applies a receipt or reply to a row locked by the caller (`for update`), for the current
 * step of the row (`current`) or an earlier one. Returns the new state, or null if nothing
 * changed. Rules (docs/delivery.md, "Receipts and replies"):
 * - `delivered`: sent → delivered (current step only); the not-read window may start;
 * - `read`: sent/delivered → read (current step only);
 * - `failed`: sent/delivered → the next chain step (current step only), or failed;
 * - `replied`: any state but cancelled/replied → replied, whichever step it came through.
 */
export async function applyEvent(
  tx: Tx,
  d: Delivery,
  caps: PluginCapabilities | undefined,
  kind: 'delivered' | 'read' | 'replied' | 'failed',
  current: boolean,
  now: Date,
  error?: string,
): Promise<string | null> {
  const upd = (set: Updateable<DeliveriesTable>) => tx.updateTable('deliveries').set({ ...set, updated_at: now }).where('id', '=', d.id).execute();
  if (kind === 'replied') {
    if (d.state === 'cancelled' || d.state === 'replied') return null;
    await upd({ state: 'replied', replied_at: now, fallback_at: null });
    return 'replied';
  }
  if (!current) return null;
  if (kind === 'delivered' && d.state === 'sent') {
    const sentAt = d.sent_at ? new Date(d.sent_at) : now;
    await upd({ state: 'delivered', delivered_at: now, fallback_at: fallbackDeadline(d, caps, sentAt, true) });
    return 'delivered';
  }
  if (kind === 'read' && (d.state === 'sent' || d.state === 'delivered')) {
    await upd({ state: 'read', read_at: now, delivered_at: d.delivered_at ?? now, fallback_at: null });
    return 'read';
  }
  if (kind === 'failed' && (d.state === 'sent' || d.state === 'delivered')) {
    const reason = `${d.plugin}: ${error ?? 'the provider reports the message failed'}`;
    const { set, to } = moveOnChange(d, reason, now);
    await upd(set);
    await recordFallback(tx, d, to, reason);
    return to ? 'pending' : 'failed';
  }
  return null;
}
