import { applyFlagOp, type FlagOp, type UserFlags } from '../core/folders.ts';
import { transaction } from '../store/db.ts';
import type { Deps } from '../context.ts';
import { appendEvents } from '../streams/store.ts';
import type { Actor } from './commands/apply-actions.ts';
import { visibleConversation } from './queries.ts';

/**
 * `changeFlags` — a user's folder operations on one conversation (archive, inbox, delete,
 * restore, spam, ham, mute, unmute, seen, unseen), applied in order. The change is an
 * event of the user's stream (kind `flags`), so their other devices follow.
 * @returns the flags after the operations
 * @throws AppError 404 when the user cannot see the conversation
 */
export async function changeFlags(deps: Deps, user: Actor, key: string, ops: FlagOp[]): Promise<UserFlags> {
  return transaction(deps.db, async (tx) => {
    const { row } = await visibleConversation(tx, user, key);
    const p = await tx
      .selectFrom('participants')
      .select(['inbox', 'deleted', 'spam', 'seen', 'muted'])
      .where('conv_id', '=', row.id)
      .where('address', '=', user.address)
      .forUpdate()
      .executeTakeFirstOrThrow();
    let f: UserFlags = p;
    for (const op of ops) f = applyFlagOp(f, op);
    await tx.updateTable('participants').set(f).where('conv_id', '=', row.id).where('address', '=', user.address).execute();
    await appendEvents(tx, [{ userId: user.id, convId: row.id, kind: 'flags', payload: f }]);
    return f;
  });
}
