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
import { type RowWriter, writeRows } from '../store/group-commit.ts';
import type { AttachmentsTable, ConversationsTable, ParticipantsTable } from '../store/schema.ts';
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

/** Participant rows read together with a conversation's lock (see {@link preloadParticipants}). */
const preloaded = new WeakMap<ConversationRow, Selectable<ParticipantsTable>[]>();

/**
 * Hands the participant rows of `row`, read under its row lock in the same transaction
 * (apply-actions.ts lockConversationsForActors), to the next {@link loadState} of that row, which then
 * does not read them again. Timestamps may arrive as ISO strings (JSON).
 */
export function preloadParticipants(row: ConversationRow, parts: Selectable<ParticipantsTable>[]): void {
  preloaded.set(row, parts);
}

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
  const parts = preloaded.get(row) ?? (await db.selectFrom('participants').selectAll().where('conv_id', '=', row.id).execute());
  preloaded.delete(row);
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

/** A row of `actions` as {@link persistState} writes it. */
interface ActionRow {
  conv_id: number;
  id: number;
  act: string;
  actor: string;
  ts: string;
  component: string | null;
  hash: string;
  body: Action;
}

// The rows below are written by parley_write_rows (src/store/migrations/034_write_rows_positional.sql),
// one set-based statement per kind, each row encoded as the positional array that migration
// documents; message search vectors as in 002_search.sql.
const actionsWriter: RowWriter<ActionRow> = {
  kind: 'actions',
  encode: (rows) => rows.map((r) => [r.conv_id, r.id, r.act, r.actor, r.ts, r.component, r.hash, r.body]),
};

/** A row of `messages` (its search vector is computed by parley_write_rows). */
interface MessageRow {
  conv_id: number;
  id: number;
  author: string;
  body: string;
  format: string;
  parent: number | null;
  files: FileRef[];
  created_ts: string;
  updated_ts: string | null;
  deleted: boolean;
  head: number;
  lock_by: string | null;
  lock_at: string | null;
  lock_id: number | null;
  source: unknown;
}

const messagesWriter: RowWriter<MessageRow> = {
  kind: 'messages',
  encode: (rows) =>
    rows.map((m) => [
      m.conv_id, m.id, m.author, m.body, m.format, m.parent, m.files, m.created_ts, m.updated_ts,
      m.deleted, m.head, m.lock_by, m.lock_at, m.lock_id, m.source,
    ]),
};

/** A row of `attachments`: one file of a message, in some version of it (migration 031). */
type AttachmentRow = AttachmentsTable;

const attachmentsWriter: RowWriter<AttachmentRow> = {
  kind: 'attachments',
  encode: (rows) => rows.map((a) => [a.conv_id, a.message_id, a.ordinal, a.sha256, a.name, a.content_type, a.size, a.content_id, a.inline]),
};

/** A row of `participants` as the log defines it (the user's flags are effects.ts's). */
interface ParticipantRow {
  conv_id: number;
  address: string;
  user_id: number | null;
  perms: string;
  added_id: number;
  head: number;
  removed_id: number | null;
  seen_id: number;
  last_event_ts: string | null;
}

const participantsWriter: RowWriter<ParticipantRow> = {
  kind: 'participants',
  encode: (rows) => rows.map((p) => [p.conv_id, p.address, p.user_id, p.perms, p.added_id, p.head, p.removed_id, p.seen_id, p.last_event_ts]),
};

/** The header columns of `conversations` after a batch, and whether its search header changes. */
type ConversationUpdate = Omit<ConversationHeader, 'created_at' | 'subject_lock'> & {
  id: number;
  subject_lock_by: string | null;
  subject_lock_at: string | null;
  subject_lock_id: number | null;
  /** Every participant's address when the search header must be rebuilt, else null. */
  search_addresses: string[] | null;
};

const conversationsWriter: RowWriter<ConversationUpdate> = {
  kind: 'conversations',
  encode: (rows) =>
    rows.map((c) => [
      c.id, c.key, c.creator, c.published, c.published_at, c.subject, c.subject_head, c.subject_lock_by, c.subject_lock_at,
      c.subject_lock_id, c.expiry, c.expiry_head, c.last_id, c.last_hash, c.last_ts, c.message_count, c.search_addresses,
    ]),
};

/**
 * Persists new actions and everything the reducer touched: the actions rows, messages
 * (with their search vectors and attachments), participants, and the header — one
 * set-based statement per table, written now or, in a group transaction
 * (src/store/group-commit.ts), together with the other units' rows just before COMMIT.
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
  await writeRows(
    tx,
    actionsWriter,
    actions.map((a) => ({
      conv_id: convId,
      id: a.id,
      act: a.act,
      actor: a.actor,
      ts: a.ts,
      component: componentOf(a, s),
      hash: a.hash,
      body: a,
    })),
  );
  const msgs = [...s.touched.messages].map((id) => s.messages.get(id)!);
  await writeRows(
    tx,
    messagesWriter,
    msgs.map((m) => ({
      conv_id: convId,
      id: m.id,
      author: m.author,
      body: m.body,
      format: m.format,
      parent: m.parent,
      files: m.files,
      created_ts: m.created_ts,
      updated_ts: m.updated_ts,
      deleted: m.deleted,
      head: m.head,
      lock_by: m.lock?.by ?? null,
      lock_at: m.lock?.at ?? null,
      lock_id: m.lock?.id ?? null,
      source: m.source ?? null,
    })),
  );
  await writeRows(
    tx,
    attachmentsWriter,
    msgs.flatMap((m) =>
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
    ),
  );
  const parts = [...s.touched.participants].map((a) => s.participants.get(a)!);
  await writeRows(
    tx,
    participantsWriter,
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
  );
  const searchChanged = parts.length > 0 || actions.some((a) => a.act === 'subject:modify' || a.act === 'conv:create');
  const { created_at: _created, subject_lock: lock, ...header } = h;
  await writeRows(tx, conversationsWriter, [
    {
      id: convId,
      ...header,
      subject_lock_by: lock?.by ?? null,
      subject_lock_at: lock?.at ?? null,
      subject_lock_id: lock?.id ?? null,
      search_addresses: searchChanged ? [...s.participants.keys()] : null,
    },
  ]);
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
