import { sql } from 'kysely';
import type { Action, ActionInput } from '../../core/actions.ts';
import { LIMITS } from '../../core/actions.ts';
import { badRequest, forbidden, notFound } from '../../platform/errors.ts';
import type { Deps } from '../../context.ts';
import { transaction, type Tx } from '../../store/db.ts';
import { appendActions } from '../append.ts';
import type { ConversationRow } from '../store.ts';
import { settleProposal } from '../../federation/proposals.ts';

/** The acting user as the commands see them. */
export interface Actor {
  id: number;
  address: string;
}

/**
 * Locks the conversation `key` for this transaction and authorises `user` to act on it, in
 * one round trip: 404 when they cannot see it at all (never a participant, or someone
 * else's draft), 403 `removed` after their removal.
 */
export async function lockForActor(tx: Tx, key: string, user: Actor): Promise<ConversationRow> {
  const r = await sql<ConversationRow & { p_user_id: number | null; p_removed_id: number | null; p_found: boolean }>`
    select c.*, p.user_id as p_user_id, p.removed_id as p_removed_id, p.address is not null as p_found
      from conversations c
      left join participants p on p.conv_id = c.id and p.address = ${user.address}
     where c.key = ${key} or c.draft_key = ${key}
       for update of c`.execute(tx);
  const row = r.rows[0];
  if (!row || !row.p_found || row.p_user_id !== user.id || (!row.published && row.creator !== user.address)) throw notFound('conversation');
  if (row.p_removed_id !== null)
    throw forbidden('removed', `you were removed from this conversation at action ${row.p_removed_id}`, {
      removed_id: row.p_removed_id,
    });
  const { p_user_id: _u, p_removed_id: _r, p_found: _f, ...conv } = row;
  return conv as ConversationRow;
}

/** The answer of {@link applyActions}. */
export interface AppliedActions {
  /** The actions as numbered — provisionally while `pending`. */
  actions: Action[];
  /**
   * Set when the conversation's leader (another platform) could not be reached: the actions
   * wait in the proposals outbox, are retried, and are applied once the leader numbers them
   * (issue 3 §4; docs/federation.md, "Proposals").
   */
  pending?: { proposal: number; reason: string };
}

/**
 * `applyActions` — a user's batch of actions on a conversation they take part in
 * (client API `POST /api/conversations/{key}/actions`). All or nothing, in one transaction.
 * On a conversation led by another platform the actions are proposed to the leader and the
 * answer waited for (a few seconds at most): the numbered actions when it accepts them, its
 * refusal as the user's error, or `pending` when it cannot be reached now.
 * @returns the new actions with their ids and hashes
 * @throws AppError 400 (malformed, over limits), 403 (permissions, removed), 404, 409 (follows, locks)
 */
export async function applyActions(deps: Deps, user: Actor, key: string, inputs: ActionInput[]): Promise<AppliedActions> {
  if (inputs.length === 0) throw badRequest('empty_batch', 'actions must not be empty');
  if (inputs.length > LIMITS.batch) throw badRequest('batch_too_large', `at most ${LIMITS.batch} actions per request`);
  for (const i of inputs) {
    if (i.act === 'conv:create') throw badRequest('invalid_action', 'create conversations with POST /api/conversations');
    if (i.act === 'conv:publish') throw badRequest('invalid_action', 'publish with POST /api/conversations/{key}/publish');
    if (i.source !== undefined) throw badRequest('invalid_action', 'source is set by the platform');
  }
  const r = await transaction(deps.db, async (tx) => {
    const row = await lockForActor(tx, key, user);
    return appendActions(tx, deps, row, user.address, inputs);
  });
  if (r.proposal === undefined) return { actions: r.actions };
  const outcome = await settleProposal(deps, r.proposal);
  if (outcome.state === 'applied') return { actions: outcome.actions };
  if (outcome.state === 'failed') throw outcome.error;
  return { actions: outcome.actions, pending: { proposal: r.proposal, reason: outcome.error } };
}
