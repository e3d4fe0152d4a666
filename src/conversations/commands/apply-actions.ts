import type { Action, ActionInput } from '../../core/actions.ts';
import { LIMITS } from '../../core/actions.ts';
import { badRequest, forbidden, notFound } from '../../platform/errors.ts';
import type { Deps } from '../../context.ts';
import type { Tx } from '../../store/db.ts';
import { appendActions } from '../append.ts';
import { type ConversationRow, lockConversation } from '../store.ts';

/** The acting user as the commands see them. */
export interface Actor {
  id: number;
  address: string;
}

/**
 * Authorises `user` to act on a locked conversation: 404 when they cannot see it at all
 * (never a participant, or someone else's draft), 403 `removed` after their removal.
 */
export async function authoriseActor(tx: Tx, row: ConversationRow, user: Actor): Promise<void> {
  const p = await tx
    .selectFrom('participants')
    .select(['removed_id', 'user_id'])
    .where('conv_id', '=', row.id)
    .where('address', '=', user.address)
    .executeTakeFirst();
  if (!p || p.user_id !== user.id || (!row.published && row.creator !== user.address)) throw notFound('conversation');
  if (p.removed_id !== null)
    throw forbidden('removed', `you were removed from this conversation at action ${p.removed_id}`, {
      removed_id: p.removed_id,
    });
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
  return deps.db.kysely.transaction().execute(async (tx) => {
    const row = await lockConversation(tx, key);
    if (!row) throw notFound('conversation');
    await authoriseActor(tx, row, user);
    const { actions } = await appendActions(tx, deps, row, user.address, inputs);
    return actions;
  });
}
