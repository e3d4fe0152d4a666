import { sql } from 'kysely';
import type { Action, FileRef } from '../core/actions.ts';
import {
  type ConversationHeader,
  type ConversationState,
  type Lock,
  type MessageState,
  type ParticipantState,
  emptyState,
} from '../core/reducer.ts';
import type { Queryable, Tx } from '../store/db.ts';
import type { ConversationsTable, ParticipantsTable } from '../store/schema.ts';
import type { Selectable } from 'kysely';

/**
 * SQL side of conversations: locking a conversation, loading the (partial) state the
 * reducer needs, and persisting what the reducer touched together with the new actions.
 */

export type ConversationRow = Selectable<ConversationsTable>;

const iso = (d: Date | string | null): string | null => (d === null ? null : new Date(d).toISOString());

function lockOf(by: string | null, at: Date | string | null, id: number | null): Lock | null {
  return by && at && id ? { by, at: iso(at)!, id } : null;
}

/** Finds a conversation by its key or its former draft key. */
export async function findConversation(db: Queryable, key: string): Promise<ConversationRow | undefined> {
  return db
    .selectFrom('conversations')
    .selectAll()
    .where((eb) => eb.or([eb('key', '=', key), eb('draft_key', '=', key)]))
    .executeTakeFirst();
}

/** Locks a conversation row for the rest of the transaction (the single writer per conversation). */
export async function lockConversation(tx: Tx, key: string): Promise<ConversationRow | undefined> {
  return tx
    .selectFrom('conversations')
    .selectAll()
    .where((eb) => eb.or([eb('key', '=', key), eb('draft_key', '=', key)]))
    .forUpdate()
    .executeTakeFirst();
}

export function headerOf(row: ConversationRow): ConversationHeader {
  return {
    key: row.key,
    creator: row.creator,
    created_at: iso(row.created_at)!,
    published: row.published,
    published_at: iso(row.published_at),
    subject: row.subject,
    subject_head: row.subject_head,
    subject_lock: lockOf(row.subject_lock_by, row.subject_lock_at, row.subject_lock_id),
    expiry: iso(row.expiry),
    expiry_head: row.expiry_head,
    last_id: row.last_id,
    last_hash: row.last_hash,
    last_ts: iso(row.last_ts),
    message_count: row.message_count,
  };
}

function messageFromRow(r: any): MessageState {
  return {
    id: r.id,
    author: r.author,
    body: r.body,
    format: r.format,
    parent: r.parent,
    files: r.files as FileRef[],
    created_ts: iso(r.created_ts)!,
    updated_ts: iso(r.updated_ts),
    deleted: r.deleted,
    head: r.head,
    lock: lockOf(r.lock_by, r.lock_at, r.lock_id),
    source: r.source ?? null,
  };
}

/** The participant rows (user ids, flags) behind a state loaded by {@link loadState}. */
export const loadedParticipantRows = new WeakMap<ConversationState, Map<string, Selectable<ParticipantsTable>>>();

/**
 * Loads the state the reducer needs for a batch: header, every participant, the messages
 * named as parents, and the messages whose chains contain the `follows` ids.
 */
export async function loadState(
  db: Queryable,
  row: ConversationRow,
  refs: { follows: number[]; parents: number[] },
): Promise<ConversationState> {
  const s = emptyState();
  s.header = headerOf(row);
  const parts = await db.selectFrom('participants').selectAll().where('conv_id', '=', row.id).execute();
  loadedParticipantRows.set(s, new Map(parts.map((p) => [p.address, p])));
  for (const p of parts) {
    s.participants.set(p.address, {
      address: p.address,
      perms: p.perms,
      added_id: p.added_id,
      head: p.head,
      removed_id: p.removed_id,
      seen_id: p.seen_id,
    });
  }
  if (refs.follows.length > 0) {
    const comps = await db
      .selectFrom('actions')
      .select(['id', 'component'])
      .where('conv_id', '=', row.id)
      .where('id', 'in', refs.follows)
      .execute();
    for (const c of comps) {
      if (c.component?.startsWith('msg:')) s.messageOf.set(c.id, Number(c.component.slice(4)));
    }
  }
  const wanted = new Set<number>([...refs.parents, ...s.messageOf.values()]);
  if (wanted.size > 0) {
    const msgs = await db
      .selectFrom('messages')
      .selectAll()
      .where('conv_id', '=', row.id)
      .where('id', 'in', [...wanted])
      .execute();
    for (const m of msgs) {
      s.messages.set(m.id, messageFromRow(m));
      s.messageOf.set(m.id, m.id);
    }
  }
  return s;
}

/** Loads the complete state of a conversation (every message). */
export async function loadFullState(db: Queryable, row: ConversationRow): Promise<ConversationState> {
  const s = await loadState(db, row, { follows: [], parents: [] });
  const msgs = await db.selectFrom('messages').selectAll().where('conv_id', '=', row.id).orderBy('id').execute();
  for (const m of msgs) s.messages.set(m.id, messageFromRow(m));
  return s;
}

/** The component an action changes, stored with it: 'subject', 'expiry', 'msg:<id>', 'prt:<address>'. */
export function componentOf(a: Action, s: ConversationState): string | null {
  if (a.act.startsWith('subject:')) return 'subject';
  if (a.act === 'expiry:modify') return 'expiry';
  if (a.act.startsWith('message:')) return `msg:${s.messageOf.get(a.id) ?? a.id}`;
  if (a.act.startsWith('participant:')) return `prt:${a.participant}`;
  return null;
}

/** Inserts a conversation row from a fresh state (after conv:create); returns its id. */
export async function insertConversation(
  tx: Tx,
  h: ConversationHeader,
  leader: string,
  draftKey: string | null,
): Promise<number> {
  const r = await tx
    .insertInto('conversations')
    .values({
      key: h.key,
      draft_key: draftKey,
      creator: h.creator,
      leader,
      published: h.published,
      published_at: h.published_at,
      created_at: h.created_at,
      subject: h.subject,
      subject_head: h.subject_head,
      expiry: h.expiry,
      expiry_head: h.expiry_head,
      last_id: 0,
      last_hash: null,
      last_ts: null,
      message_count: 0,
      subject_lock_by: null,
      subject_lock_at: null,
      subject_lock_id: null,
      search_header: null,
    })
    .returning('id')
    .executeTakeFirstOrThrow();
  return r.id;
}

/**
 * Persists new actions and everything the reducer touched: the actions rows, messages
 * (with their search vectors and attachments), participants, and the header.
 * `userIds` maps local participant addresses to user ids (set on new participant rows).
 */
export async function persistState(
  tx: Tx,
  convId: number,
  s: ConversationState,
  actions: Action[],
  userIds: Map<string, number>,
): Promise<void> {
  const h = s.header!;
  if (actions.length > 0) {
    await tx
      .insertInto('actions')
      .values(
        actions.map((a) => ({
          conv_id: convId,
          id: a.id,
          act: a.act,
          actor: a.actor,
          ts: a.ts,
          component: componentOf(a, s),
          hash: a.hash,
          body: JSON.stringify(a),
        })),
      )
      .execute();
  }
  const msgs = [...s.touched.messages].map((id) => s.messages.get(id)!);
  if (msgs.length > 0) {
    await tx
      .insertInto('messages')
      .values(
        msgs.map((m) => ({
          conv_id: convId,
          id: m.id,
          author: m.author,
          body: m.body,
          format: m.format,
          parent: m.parent,
          files: JSON.stringify(m.files),
          created_ts: m.created_ts,
          updated_ts: m.updated_ts,
          deleted: m.deleted,
          head: m.head,
          lock_by: m.lock?.by ?? null,
          lock_at: m.lock?.at ?? null,
          lock_id: m.lock?.id ?? null,
          source: m.source ? JSON.stringify(m.source) : null,
          // Tokens: src/store/migrations/002_search.sql (body, author address, file names).
          search: sql`parley_message_search(${m.author}, ${m.body.slice(0, 200_000)}, ${m.files.map((f) => f.name)}::text[])`,
        })),
      )
      .onConflict((oc) =>
        oc.columns(['conv_id', 'id']).doUpdateSet((eb) => ({
          body: eb.ref('excluded.body'),
          format: eb.ref('excluded.format'),
          files: eb.ref('excluded.files'),
          updated_ts: eb.ref('excluded.updated_ts'),
          deleted: eb.ref('excluded.deleted'),
          head: eb.ref('excluded.head'),
          lock_by: eb.ref('excluded.lock_by'),
          lock_at: eb.ref('excluded.lock_at'),
          lock_id: eb.ref('excluded.lock_id'),
          search: eb.ref('excluded.search'),
        })),
      )
      .execute();
    const files = msgs.flatMap((m) =>
      m.files.map((f, i) => ({
        conv_id: convId,
        message_id: m.id,
        ordinal: i,
        sha256: f.sha256,
        name: f.name,
        content_type: f.content_type,
        size: f.size,
        content_id: f.content_id ?? null,
        inline: f.inline ?? false,
      })),
    );
    if (files.length > 0) {
      await tx.insertInto('attachments').values(files).onConflict((oc) => oc.doNothing()).execute();
    }
  }
  const parts = [...s.touched.participants].map((a) => s.participants.get(a)!);
  if (parts.length > 0) {
    await tx
      .insertInto('participants')
      .values(
        parts.map((p: ParticipantState) => ({
          conv_id: convId,
          address: p.address,
          user_id: userIds.get(p.address) ?? null,
          perms: p.perms,
          added_id: p.added_id,
          head: p.head,
          removed_id: p.removed_id,
          seen_id: p.seen_id,
          last_event_ts: h.last_ts,
        })),
      )
      .onConflict((oc) =>
        oc.columns(['conv_id', 'address']).doUpdateSet((eb) => ({
          perms: eb.ref('excluded.perms'),
          head: eb.ref('excluded.head'),
          removed_id: eb.ref('excluded.removed_id'),
          seen_id: eb.ref('excluded.seen_id'),
        })),
      )
      .execute();
  }
  const participantsChanged = parts.length > 0;
  await tx
    .updateTable('conversations')
    .set({
      key: h.key,
      creator: h.creator,
      published: h.published,
      published_at: h.published_at,
      subject: h.subject,
      subject_head: h.subject_head,
      subject_lock_by: h.subject_lock?.by ?? null,
      subject_lock_at: h.subject_lock?.at ?? null,
      subject_lock_id: h.subject_lock?.id ?? null,
      expiry: h.expiry,
      expiry_head: h.expiry_head,
      last_id: h.last_id,
      last_hash: h.last_hash,
      last_ts: h.last_ts,
      message_count: h.message_count,
      ...(participantsChanged || actions.some((a) => a.act === 'subject:modify' || a.act === 'conv:create')
        ? {
            // Subject and every participant's address (src/store/migrations/002_search.sql).
            search_header: sql`parley_search_header(${h.subject}, ${[...s.participants.keys()]}::text[])`,
          }
        : {}),
    })
    .where('id', '=', convId)
    .execute();
}

/** Actions of a conversation with ids in [from, to], in order. */
export async function readActions(db: Queryable, convId: number, from: number, to: number, limit = 1000): Promise<Action[]> {
  const rows = await db
    .selectFrom('actions')
    .select('body')
    .where('conv_id', '=', convId)
    .where('id', '>=', from)
    .where('id', '<=', to)
    .orderBy('id')
    .limit(limit)
    .execute();
  return rows.map((r) => r.body as Action);
}
