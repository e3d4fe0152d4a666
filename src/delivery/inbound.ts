import { sql } from 'kysely';
import type { Deps } from '../context.ts';
import { notFound } from '../platform/errors.ts';
import type { Tx } from '../store/db.ts';
import type { Delivery, DeliveryPlugin, InboundEvent } from './plugin.ts';
import { applyEvent, wakeWorkers } from './state.ts';

/** A reply from a contact, reported by a plugin's inbound route (issue 4 §5: replies thread). */
export interface InboundReply {
  /** The `delivery_events` row that stores it. */
  eventId: number;
  plugin: string;
  orgId: number;
  /** The delivery it answers, when it could be matched (by reference, delivery id, or the sender's address). */
  deliveryId: number | null;
  contactId: number | null;
  convId: number | null;
  outboundMessageId: number | null;
  /** The sender on that channel: a phone number (sms), the contact as the application names it (webhook). */
  from: string;
  text: string;
  /** The provider's reference of the reply itself, if any. */
  providerRef: string | null;
  at: Date;
}

/**
 * Handles a reply inside the transaction that stores its event: if it throws, nothing is
 * stored and the provider gets an error (and retries). The organisations engine registers
 * one to append the reply to the contact's conversation.
 */
export type InboundReplyHandler = (tx: Tx, deps: Deps, reply: InboundReply) => Promise<void>;

let replyHandler: InboundReplyHandler | null = null;

/**
 * Registers the handler of inbound replies (one per process; a second call replaces the
 * first). Until one is registered, replies are stored as `replied` events only.
 * @returns a function that unregisters it
 */
export function onInboundReply(handler: InboundReplyHandler): () => void {
  replyHandler = handler;
  return () => {
    if (replyHandler === handler) replyHandler = null;
  };
}

async function lockById(tx: Tx, id: number): Promise<Delivery | undefined> {
  return tx.selectFrom('deliveries').selectAll().where('id', '=', id).forUpdate().executeTakeFirst();
}

/**
 * Finds the delivery an event is about, for organisation `orgId`, and whether the event is
 * about its current chain step: by our delivery id; else by the provider's reference — the
 * current step's, then any earlier attempt's (`delivery_attempts`); else, for a reply, by the
 * sender's address on this plugin — the newest delivery whose current destination, then
 * whose destination for this plugin, it is.
 */
async function resolve(tx: Tx, plugin: string, orgId: number, ev: InboundEvent): Promise<{ d: Delivery; current: boolean } | null> {
  if (ev.deliveryId !== undefined) {
    const d = await lockById(tx, ev.deliveryId);
    if (!d || d.org_id !== orgId) throw notFound('delivery', { delivery_id: String(ev.deliveryId) });
    return { d, current: d.plugin === plugin && (ev.providerRef === undefined || ev.providerRef === d.provider_ref) };
  }
  if (ev.providerRef !== undefined) {
    const cur = await tx
      .selectFrom('deliveries')
      .selectAll()
      .where('plugin', '=', plugin)
      .where('provider_ref', '=', ev.providerRef)
      .where('org_id', '=', orgId)
      .orderBy('id', 'desc')
      .limit(1)
      .forUpdate()
      .executeTakeFirst();
    if (cur) return { d: cur, current: true };
    const past = await tx
      .selectFrom('delivery_attempts as a')
      .innerJoin('deliveries as d', 'd.id', 'a.delivery_id')
      .select('d.id')
      .where('a.plugin', '=', plugin)
      .where('a.provider_ref', '=', ev.providerRef)
      .where('d.org_id', '=', orgId)
      .orderBy('a.id', 'desc')
      .limit(1)
      .executeTakeFirst();
    if (past) {
      const d = await lockById(tx, past.id);
      if (d) return { d, current: d.plugin === plugin && d.provider_ref === ev.providerRef };
    }
  }
  if (ev.kind === 'replied' && ev.from) {
    const byCurrent = await tx
      .selectFrom('deliveries')
      .select('id')
      .where('org_id', '=', orgId)
      .where('plugin', '=', plugin)
      .where('destination', '=', ev.from)
      .orderBy('id', 'desc')
      .limit(1)
      .executeTakeFirst();
    const byChain =
      byCurrent ??
      (await tx
        .selectFrom('deliveries')
        .select('id')
        .where('org_id', '=', orgId)
        .where(sql<boolean>`destinations ->> ${plugin} = ${ev.from}`)
        .orderBy('id', 'desc')
        .limit(1)
        .executeTakeFirst());
    if (byChain) {
      const d = await lockById(tx, byChain.id);
      if (d) return { d, current: d.plugin === plugin };
    }
  }
  return null;
}

/**
 * Stores and applies the receipts and replies of one inbound request, all in one
 * transaction (issue 4 §1 "inbound handling"): each event becomes a `delivery_events` row
 * and advances its delivery (see `applyEvent`); a receipt whose reference is not known yet
 * (it raced the attempt's record) is kept unmatched and applied when the attempt is recorded;
 * a reply is handed to the registered InboundReplyHandler in the same transaction.
 * @returns how many events matched a delivery, and how many were kept unmatched
 * @throws AppError 404 when an event names a delivery id that is not the organisation's
 */
export async function applyInboundEvents(deps: Deps, plugin: DeliveryPlugin, orgId: number, events: InboundEvent[]): Promise<{ matched: number; unmatched: number }> {
  let matched = 0;
  let unmatched = 0;
  await deps.db.kysely.transaction().execute(async (tx) => {
    let wake = false;
    for (const ev of events) {
      const now = new Date(deps.clock.now());
      const hit = await resolve(tx, plugin.name, orgId, ev);
      const detail = { ...(ev.detail ?? {}), ...(ev.text !== undefined ? { text: ev.text } : {}), ...(ev.error ? { error: ev.error } : {}), ...(ev.from ? { from: ev.from } : {}) };
      const inserted = await tx
        .insertInto('delivery_events')
        .values({
          delivery_id: hit?.d.id ?? null,
          org_id: orgId,
          plugin: plugin.name,
          kind: ev.kind,
          provider_ref: ev.providerRef ?? null,
          detail: JSON.stringify(detail),
        })
        .returning('id')
        .executeTakeFirstOrThrow();
      if (hit) {
        matched++;
        const state = await applyEvent(tx, hit.d, plugin.capabilities, ev.kind, hit.current, now, ev.error);
        if (state === 'pending') wake = true;
      } else unmatched++;
      if (ev.kind === 'replied' && replyHandler) {
        await replyHandler(tx, deps, {
          eventId: inserted.id,
          plugin: plugin.name,
          orgId,
          deliveryId: hit?.d.id ?? null,
          contactId: hit?.d.contact_id ?? null,
          convId: hit?.d.conv_id ?? null,
          outboundMessageId: hit?.d.outbound_message_id ?? null,
          from: ev.from ?? hit?.d.destination ?? '',
          text: ev.text ?? '',
          providerRef: typeof ev.detail?.sid === 'string' ? ev.detail.sid : null,
          at: now,
        });
      }
    }
    if (wake) await wakeWorkers(tx);
  });
  return { matched, unmatched };
}

/**
 * Applies, to a delivery whose attempt was just accepted with `providerRef`, the receipts
 * that arrived before the attempt was recorded: unmatched events with that reference, and
 * events naming the delivery during this step. Runs in the recording transaction, the row
 * locked by it.
 */
export async function applyEarlyReceipts(tx: Tx, d: Delivery, plugin: DeliveryPlugin | undefined, now: Date): Promise<boolean> {
  const stepStart = d.step_started_at ?? d.created_at;
  if (d.provider_ref !== null) {
    await tx
      .updateTable('delivery_events')
      .set({ delivery_id: d.id })
      .where('delivery_id', 'is', null)
      .where('plugin', '=', d.plugin)
      .where('provider_ref', '=', d.provider_ref)
      .where('org_id', 'is not distinct from', d.org_id as any)
      .execute();
  }
  const early = await tx
    .selectFrom('delivery_events')
    .select(['kind', 'detail'])
    .where('delivery_id', '=', d.id)
    .where('plugin', '=', d.plugin)
    .where('at', '>=', new Date(stepStart))
    .where('kind', 'in', ['delivered', 'read', 'failed'])
    .orderBy('id')
    .execute();
  let row = d;
  let wake = false;
  for (const e of early) {
    const state = await applyEvent(tx, row, plugin?.capabilities, e.kind as 'delivered' | 'read' | 'failed', true, now, (e.detail as any)?.error);
    if (state === null) continue;
    if (state === 'pending') wake = true;
    row = (await lockById(tx, d.id))!;
  }
  return wake;
}
