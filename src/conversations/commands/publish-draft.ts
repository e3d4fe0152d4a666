import type { Action } from '../../core/actions.ts';
import { publishedLog, specFromDraft } from '../../core/publish.ts';
import { applyAction, emptyState } from '../../core/reducer.ts';
import { isoTime } from '../../platform/clock.ts';
import { conflict, notFound } from '../../platform/errors.ts';
import type { Deps } from '../../context.ts';
import { isUniqueViolation, transaction } from '../../store/db.ts';
import { resolveLocalUsers } from '../append.ts';
import { recordEffects } from '../effects.ts';
import { loadFullState, lockConversation, persistState } from '../store.ts';
import type { Actor } from './apply-actions.ts';
import { signActions } from '../../federation/action-signatures.ts';
import { trackReplication } from '../../federation/outbox.ts';

/**
 * `publishDraft` — client API `POST /api/conversations/{key}/publish`. Replaces the draft's
 * log with the published log (core/publish.ts) under the derived key: live participants
 * and non-deleted messages only, so a deleted draft message never comes back.
 * @returns the new key and the published actions
 * @throws AppError 404 (not the creator's draft), 409 already published
 */
export async function publishDraft(deps: Deps, user: Actor, key: string): Promise<{ key: string; actions: Action[] }> {
  return transaction(deps.db, async (tx) => {
    const row = await lockConversation(tx, key);
    if (!row || row.creator !== user.address) throw notFound('conversation');
    if (row.published) throw conflict('already_published', 'the conversation is already published', { key: row.key });
    const draft = await loadFullState(tx, row);
    let ts = isoTime(deps.clock.now());
    if (draft.header!.last_ts && ts < draft.header!.last_ts) ts = draft.header!.last_ts;
    const log = publishedLog(specFromDraft(draft, ts));
    const state = emptyState();
    for (const a of log) applyAction(state, a);
    // The draft's rows give way to the published log.
    await tx.deleteFrom('actions').where('conv_id', '=', row.id).execute();
    await tx.deleteFrom('attachments').where('conv_id', '=', row.id).execute();
    await tx.deleteFrom('messages').where('conv_id', '=', row.id).execute();
    const creatorFlags = await tx
      .selectFrom('participants')
      .select(['inbox', 'deleted', 'spam', 'muted'])
      .where('conv_id', '=', row.id)
      .where('address', '=', row.creator)
      .executeTakeFirst();
    await tx.deleteFrom('participants').where('conv_id', '=', row.id).execute();
    await tx.deleteFrom('user_events').where('conv_id', '=', row.id).where('kind', '=', 'action').execute();
    const userIds = await resolveLocalUsers(tx, deps, [...state.participants.keys()]);
    try {
      await tx.updateTable('conversations').set({ key: state.header!.key, draft_key: row.key }).where('id', '=', row.id).execute();
    } catch (e) {
      if (isUniqueViolation(e)) throw conflict('key_taken', 'a conversation with the same key exists; retry');
      throw e;
    }
    await signActions(deps, log, tx);
    await persistState(tx, row.id, state, log, userIds);
    if (creatorFlags) {
      await tx.updateTable('participants').set(creatorFlags).where('conv_id', '=', row.id).where('address', '=', row.creator).execute();
    }
    await trackReplication(tx, deps, row.id, state, log); // before the effects, which must not email remote participants
    await recordEffects(tx, deps, row.id, state, log, false);
    return { key: state.header!.key, actions: log };
  });
}
