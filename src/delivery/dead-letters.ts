import { sql } from 'kysely';
import type { Deps } from '../context.ts';
import { badRequest, conflict, notFound } from '../platform/errors.ts';
import type { Delivery } from './plugin.ts';
import { nextStep, stepKey, wakeWorkers } from './state.ts';

/** A delivery as the dead-letter API and CLI show it. Times are UTC ISO 8601; ids are opaque strings. */
export interface DeliveryInfo {
  id: string;
  org_id: string | null;
  state: string;
  plugin: string;
  destination: string;
  /** The servicechain, null for a single-plugin row (the email bridge's). */
  chain: string[] | null;
  chain_index: number;
  /** Attempts at the current step. */
  attempts: number;
  last_error: string | null;
  idempotency_key: string;
  provider_ref: string | null;
  conv_id: string | null;
  action_id: number | null;
  contact_id: string | null;
  blast_id: string | null;
  outbound_message_id: string | null;
  created_at: string;
  updated_at: string;
  sent_at: string | null;
  delivered_at: string | null;
  read_at: string | null;
  replied_at: string | null;
}

/** Largest page of the dead-letter list. */
export const MAX_PAGE = 500;

const iso = (v: Date | string | null) => (v === null ? null : new Date(v).toISOString());
const idStr = (v: number | null) => (v === null ? null : String(v));

/** The API shape of a delivery row. */
export function deliveryInfo(d: Delivery): DeliveryInfo {
  return {
    id: String(d.id),
    org_id: idStr(d.org_id),
    state: d.state,
    plugin: d.plugin,
    destination: d.destination,
    chain: d.chain,
    chain_index: d.chain_index,
    attempts: d.attempts,
    last_error: d.last_error,
    idempotency_key: d.idempotency_key,
    provider_ref: d.provider_ref,
    conv_id: idStr(d.conv_id),
    action_id: d.action_id,
    contact_id: idStr(d.contact_id),
    blast_id: idStr(d.blast_id),
    outbound_message_id: idStr(d.outbound_message_id),
    created_at: iso(d.created_at)!,
    updated_at: iso(d.updated_at)!,
    sent_at: iso(d.sent_at),
    delivered_at: iso(d.delivered_at),
    read_at: iso(d.read_at),
    replied_at: iso(d.replied_at),
  };
}

function encodeCursor(d: Delivery): string {
  return Buffer.from(`${new Date(d.updated_at).toISOString()}|${d.id}`).toString('base64url');
}

function decodeCursor(c: string): { at: Date; id: number } {
  const m = /^(\d{4}-\d\d-\d\dT[\d:.]+Z)\|(\d{1,15})$/.exec(Buffer.from(c, 'base64url').toString('utf8'));
  if (!m || Number.isNaN(Date.parse(m[1]))) throw badRequest('invalid_cursor', 'the cursor is not one this API returned');
  return { at: new Date(m[1]), id: Number(m[2]) };
}

/**
 * `listFailed` — the dead letters (issue 4 §3): deliveries `failed` after the last step of
 * their chain, newest failure first, of one organisation (`orgId`) or of all (null: platform
 * admins). Paged with an opaque cursor.
 * @throws AppError 400 `invalid_cursor`
 */
export async function listFailed(deps: Deps, q: { orgId: number | null; cursor?: string; limit?: number }): Promise<{ items: DeliveryInfo[]; next_cursor: string | null }> {
  const limit = Math.max(1, Math.min(q.limit ?? 100, MAX_PAGE));
  let query = deps.db.kysely.selectFrom('deliveries').selectAll().where('state', '=', 'failed');
  if (q.orgId !== null) query = query.where('org_id', '=', q.orgId);
  if (q.cursor) {
    const c = decodeCursor(q.cursor);
    query = query.where(sql<boolean>`(updated_at, id) < (${c.at}, ${c.id})`);
  }
  const rows = await query.orderBy('updated_at', 'desc').orderBy('id', 'desc').limit(limit + 1).execute();
  const page = rows.slice(0, limit);
  return { items: page.map(deliveryInfo), next_cursor: rows.length > limit ? encodeCursor(page[page.length - 1]) : null };
}

async function find(deps: Deps, id: string | number, orgId: number | null): Promise<Delivery> {
  const s = String(id);
  if (!/^\d{1,15}$/.test(s)) throw notFound('delivery', { id: s });
  let q = deps.db.kysely.selectFrom('deliveries').selectAll().where('id', '=', Number(s));
  if (orgId !== null) q = q.where('org_id', '=', orgId);
  const d = await q.executeTakeFirst();
  if (!d) throw notFound('delivery', { id: s });
  return d;
}

/**
 * `getDelivery` — one delivery with its attempts and events (oldest first), for the
 * organisation `orgId` (null: any).
 * @throws AppError 404
 */
export async function getDelivery(deps: Deps, id: string, orgId: number | null) {
  const d = await find(deps, id, orgId);
  const attempts = await deps.db.kysely.selectFrom('delivery_attempts').selectAll().where('delivery_id', '=', d.id).orderBy('id').limit(1000).execute();
  const events = await deps.db.kysely.selectFrom('delivery_events').selectAll().where('delivery_id', '=', d.id).orderBy('id').limit(1000).execute();
  return {
    ...deliveryInfo(d),
    attempts: attempts.map((a) => ({ at: iso(a.at)!, plugin: a.plugin, outcome: a.outcome, error: a.error, provider_ref: a.provider_ref, duration_ms: a.duration_ms, worker: a.worker })),
    events: events.map((e) => ({ at: iso(e.at)!, plugin: e.plugin, kind: e.kind, provider_ref: e.provider_ref, detail: e.detail })),
  };
}

/** Where a retried dead letter starts again: the step that failed last, or the first step of its chain. */
export type RetryFrom = 'failed_step' | 'first_step';

/**
 * `retryDelivery` — puts a dead letter back to `pending` (issue 4 §3), now, with attempts
 * reset: at the step that failed last (`failed_step`, the default: the same plugin and
 * idempotency key, so a provider that saw it cannot send it twice), or at the first step of
 * its chain that has a destination (`first_step`). Recorded as a `retried` event naming `by`.
 * @throws AppError 404 (no such delivery for this organisation), 409 `not_failed` (only dead letters are retried), 409 `no_destination`
 */
export async function retryDelivery(deps: Deps, id: string, opts: { orgId: number | null; from?: RetryFrom; by: string }): Promise<DeliveryInfo> {
  const from = opts.from ?? 'failed_step';
  return deps.db.kysely.transaction().execute(async (tx) => {
    const d0 = await find(deps, id, opts.orgId);
    const d = (await tx.selectFrom('deliveries').selectAll().where('id', '=', d0.id).forUpdate().executeTakeFirstOrThrow()) as Delivery;
    if (d.state !== 'failed') throw conflict('not_failed', `delivery ${d.id} is ${d.state}; only failed deliveries (dead letters) are retried`, { state: d.state });
    const step = from === 'first_step' && d.chain ? nextStep(d.chain, d.destinations, -1) : d.destination ? { index: d.chain_index, plugin: d.plugin, destination: d.destination } : null;
    if (!step) throw conflict('no_destination', `delivery ${d.id} has no destination for any plugin of its servicechain`);
    const now = new Date(deps.clock.now());
    const updated = await tx
      .updateTable('deliveries')
      .set({
        state: 'pending',
        chain_index: step.index,
        plugin: step.plugin,
        destination: step.destination,
        idempotency_key: d.chain ? stepKey(d, step.plugin) : d.idempotency_key,
        attempts: 0,
        next_attempt_at: now,
        step_started_at: now,
        provider_ref: null,
        sent_at: null,
        delivered_at: null,
        read_at: null,
        fallback_at: null,
        locked_by: null,
        locked_until: null,
        ...(d.expires_at !== null && new Date(d.expires_at) <= now ? { expires_at: null } : {}),
        updated_at: now,
      })
      .where('id', '=', d.id)
      .returningAll()
      .executeTakeFirstOrThrow();
    await tx
      .insertInto('delivery_events')
      .values({ delivery_id: d.id, org_id: d.org_id, plugin: step.plugin, kind: 'retried', provider_ref: null, detail: JSON.stringify({ from, by: opts.by, step: step.index, last_error: d.last_error }) })
      .execute();
    await wakeWorkers(tx);
    return deliveryInfo(updated as Delivery);
  });
}

/**
 * `cancelDelivery` — stops a delivery that is pending, being attempted or failed (issue 4
 * §3): state `cancelled`, recorded as a `cancelled` event naming `by`. An attempt already in
 * flight may still reach the recipient; its outcome is recorded but not applied.
 * @throws AppError 404, 409 `not_cancellable` (already sent or further, or already cancelled)
 */
export async function cancelDelivery(deps: Deps, id: string, opts: { orgId: number | null; by: string }): Promise<DeliveryInfo> {
  return deps.db.kysely.transaction().execute(async (tx) => {
    const d0 = await find(deps, id, opts.orgId);
    const d = (await tx.selectFrom('deliveries').selectAll().where('id', '=', d0.id).forUpdate().executeTakeFirstOrThrow()) as Delivery;
    if (!['pending', 'sending', 'failed'].includes(d.state))
      throw conflict('not_cancellable', `delivery ${d.id} is ${d.state}; only pending, sending or failed deliveries are cancelled`, { state: d.state });
    const now = new Date(deps.clock.now());
    const updated = await tx
      .updateTable('deliveries')
      .set({ state: 'cancelled', fallback_at: null, locked_by: null, locked_until: null, updated_at: now })
      .where('id', '=', d.id)
      .returningAll()
      .executeTakeFirstOrThrow();
    await tx
      .insertInto('delivery_events')
      .values({ delivery_id: d.id, org_id: d.org_id, plugin: d.plugin, kind: 'cancelled', provider_ref: null, detail: JSON.stringify({ by: opts.by, was: d.state }) })
      .execute();
    return deliveryInfo(updated as Delivery);
  });
}
