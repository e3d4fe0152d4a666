import type { Deps } from '../context.ts';
import type { Actor } from '../conversations/commands/apply-actions.ts';
import { visibleConversation } from '../conversations/queries.ts';

const iso = (v: Date | string | null) => (v === null ? null : new Date(v).toISOString());

/** One recipient's delivery of one action. */
export interface DeliveryStatus {
  id: number;
  action_id: number | null;
  plugin: string;
  recipient: string;
  state: string;
  attempts: number;
  last_error: string | null;
  next_attempt_at: string | null;
  updated_at: string;
  provider_ref: string | null;
  /** The servicechain (null for the email bridge's single-plugin rows) and the current step. */
  chain: string[] | null;
  chain_index: number;
  /** When the current step was accepted, delivered, read; when the recipient replied. */
  sent_at: string | null;
  delivered_at: string | null;
  read_at: string | null;
  replied_at: string | null;
}

/**
 * `deliveryStatus` — where are this conversation's outbound messages? One row per action
 * and recipient, newest first (client API `GET /api/conversations/{key}/deliveries`).
 * @throws AppError 404 when the caller cannot see the conversation
 */
export async function deliveryStatus(deps: Deps, user: Actor, key: string): Promise<{ deliveries: DeliveryStatus[] }> {
  const { row, participation } = await visibleConversation(deps.db.kysely, user, key);
  let q = deps.db.kysely
    .selectFrom('deliveries')
    .select(['id', 'action_id', 'plugin', 'destination', 'state', 'attempts', 'last_error', 'next_attempt_at', 'updated_at', 'provider_ref', 'chain', 'chain_index', 'sent_at', 'delivered_at', 'read_at', 'replied_at'])
    .where('conv_id', '=', row.id);
  if (participation.removed_id !== null) q = q.where('action_id', '<=', participation.removed_id);
  const rows = await q.orderBy('action_id', 'desc').orderBy('id').limit(1000).execute();
  return {
    deliveries: rows.map((r) => ({
      id: r.id,
      action_id: r.action_id,
      plugin: r.plugin,
      recipient: r.destination,
      state: r.state,
      attempts: r.attempts,
      last_error: r.last_error,
      next_attempt_at: ['pending', 'sending'].includes(r.state) ? new Date(r.next_attempt_at).toISOString() : null,
      updated_at: new Date(r.updated_at).toISOString(),
      provider_ref: r.provider_ref,
      chain: r.chain,
      chain_index: r.chain_index,
      sent_at: iso(r.sent_at),
      delivered_at: iso(r.delivered_at),
      read_at: iso(r.read_at),
      replied_at: iso(r.replied_at),
    })),
  };
}
