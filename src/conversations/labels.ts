import { sql } from 'kysely';
import { badRequest, conflict, notFound } from '../platform/errors.ts';
import type { Deps } from '../context.ts';
import { isUniqueViolation, type Tx, transaction } from '../store/db.ts';
import { appendEvents } from '../streams/store.ts';
import type { Actor } from './commands/apply-actions.ts';
import { visibleConversation } from './queries.ts';

/** A user's label (em2 seed 000, "Labels"). */
export interface Label {
  id: number;
  name: string;
  color: string;
  ordering: number;
  description: string;
}

const COLOR = /^#[0-9a-fA-F]{6}$/;

function checkLabel(input: Partial<Omit<Label, 'id'>>): void {
  if (input.name !== undefined && (input.name.trim() === '' || input.name.length > 100))
    throw badRequest('invalid_label', 'label name must be 1-100 characters');
  if (input.color !== undefined && !COLOR.test(input.color)) throw badRequest('invalid_label', 'color must be #rrggbb');
  if (input.description !== undefined && input.description.length > 1000)
    throw badRequest('invalid_label', 'description must be at most 1000 characters');
}

/** The user's labels in their display order. */
export async function listLabels(deps: Deps, user: Actor): Promise<Label[]> {
  return deps.db.kysely
    .selectFrom('labels')
    .select(['id', 'name', 'color', 'ordering', 'description'])
    .where('user_id', '=', user.id)
    .orderBy('ordering')
    .orderBy('id')
    .execute();
}

/** Creates a label. @throws AppError 400 invalid, 409 name taken */
export async function createLabel(deps: Deps, user: Actor, input: { name: string; color?: string; ordering?: number; description?: string }): Promise<Label> {
  checkLabel(input);
  try {
    return await deps.db.kysely
      .insertInto('labels')
      .values({ user_id: user.id, name: input.name.trim(), color: input.color, ordering: input.ordering, description: input.description })
      .returning(['id', 'name', 'color', 'ordering', 'description'])
      .executeTakeFirstOrThrow();
  } catch (e) {
    if (isUniqueViolation(e)) throw conflict('label_exists', `a label named "${input.name}" exists`);
    throw e;
  }
}

/** Renames, recolours, reorders or re-describes a label. @throws AppError 404, 400, 409 */
export async function updateLabel(deps: Deps, user: Actor, id: number, input: Partial<Omit<Label, 'id'>>): Promise<Label> {
  checkLabel(input);
  if (Object.keys(input).length === 0) throw badRequest('empty_update', 'nothing to change');
  try {
    const r = await deps.db.kysely
      .updateTable('labels')
      .set({ ...input, ...(input.name ? { name: input.name.trim() } : {}) })
      .where('id', '=', id)
      .where('user_id', '=', user.id)
      .returning(['id', 'name', 'color', 'ordering', 'description'])
      .executeTakeFirst();
    if (!r) throw notFound('label');
    return r;
  } catch (e) {
    if (isUniqueViolation(e)) throw conflict('label_exists', `a label named "${input.name}" exists`);
    throw e;
  }
}

/** Deletes a label and removes it from every conversation. @throws AppError 404 */
export async function deleteLabel(deps: Deps, user: Actor, id: number): Promise<void> {
  const r = await deps.db.kysely.deleteFrom('labels').where('id', '=', id).where('user_id', '=', user.id).executeTakeFirst();
  if (Number(r.numDeletedRows) === 0) throw notFound('label');
}

async function ownLabels(tx: Tx, user: Actor, ids: number[]): Promise<void> {
  if (ids.length === 0) return;
  const rows = await tx.selectFrom('labels').select('id').where('user_id', '=', user.id).where('id', 'in', ids).execute();
  const have = new Set(rows.map((r) => r.id));
  const missing = ids.filter((i) => !have.has(i));
  if (missing.length) throw notFound('label', { labels: missing });
}

/**
 * Applies and removes labels on a conversation the user sees; an event of kind `labels`
 * carries the resulting label ids to the user's devices.
 * @throws AppError 404 unknown conversation or label
 */
export async function setConversationLabels(deps: Deps, user: Actor, key: string, add: number[], remove: number[]): Promise<number[]> {
  return transaction(deps.db, async (tx) => {
    const { row } = await visibleConversation(tx, user, key);
    await ownLabels(tx, user, [...add, ...remove]);
    if (add.length)
      await tx
        .insertInto('conversation_labels')
        .values(add.map((label_id) => ({ label_id, conv_id: row.id, user_id: user.id })))
        .onConflict((oc) => oc.doNothing())
        .execute();
    if (remove.length)
      await tx.deleteFrom('conversation_labels').where('conv_id', '=', row.id).where('label_id', 'in', remove).execute();
    const now = await sql<{ label_id: number }>`select label_id from conversation_labels where conv_id = ${row.id} and user_id = ${user.id} order by label_id`.execute(tx);
    const labels = now.rows.map((r) => Number(r.label_id));
    await appendEvents(tx, [{ userId: user.id, convId: row.id, kind: 'labels', payload: { labels } }]);
    return labels;
  });
}
