import { sql } from 'kysely';
import type { Action, ActionInput } from '../../core/actions.ts';
import { LIMITS } from '../../core/actions.ts';
import { badRequest, forbidden, notFound } from '../../platform/errors.ts';
import type { Deps } from '../../context.ts';
import { transaction, type Tx } from '../../store/db.ts';
import { appendActions } from '../append.ts';
import type { ConversationRow } from '../store.ts';

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

/**
 * `applyActions` — a user's batch of actions on a conversation they take part in
 * (client API `POST /api/conversations/{key}/actions`). All or nothing, in one transaction.
 * @returns the new actions with their ids and hashes
 * @throws AppError 400 (malformed, over limits), 403 (permissions, removed), 404, 409 (follows, locks)
 */
export async function applyActions(deps: Deps, user: Actor, key: string, inputs: ActionInput[]): Promise<Action[]> {
  if (inputs.length === 0) throw badRequest('empty_batch', 'actions must not be empty');
  if (inputs.length > LIMITS.batch) throw badRequest('batch_too_large', `at most ${LIMITS.batch} actions per request`);
  for (const i of inputs) {
    if (i.act === 'conv:create') throw badRequest('invalid_action', 'create conversations with POST /api/conversations');
    if (i.act === 'conv:publish') throw badRequest('invalid_action', 'publish with POST /api/conversations/{key}/publish');
    if (i.source !== undefined) throw badRequest('invalid_action', 'source is set by the platform');
  }
  return transaction(deps.db, async (tx) => {
    const row = await lockForActor(tx, key, user);
    const { actions } = await appendActions(tx, deps, row, user.address, inputs);
    return actions;
  });
}
