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
 * (apply-actions.ts lockForActor), to the next {@link loadState} of that row, which then
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

const actionsWriter: RowWriter<ActionRow> = {
  name: 'insert actions',
  write: async (tx, rows) => {
    await sql`
      insert into actions (conv_id, id, act, actor, ts, component, hash, body)
      select r.conv_id, r.id, r.act, r.actor, r.ts, r.component, r.hash, r.body
        from jsonb_to_recordset(${JSON.stringify(rows)}::jsonb)
          as r(conv_id bigint, id integer, act text, actor text, ts timestamptz, component text, hash text, body jsonb)`.execute(tx);
  },
};

/** A row of `messages` (with the file names its search vector indexes). */
interface MessageRow {
  conv_id: number;
  id: number;
  author: string;
  body: string;
  format: string;
  parent: number | null;
  files: FileRef[];
  file_names: string[];
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
  name: 'upsert messages',
  write: async (tx, rows) => {
    // Search tokens: src/store/migrations/002_search.sql (body, author address, file names).
    await sql`
      insert into messages (conv_id, id, author, body, format, parent, files, created_ts, updated_ts, deleted, head, lock_by, lock_at, lock_id, source, search)
      select r.conv_id, r.id, r.author, r.body, r.format, r.parent, r.files, r.created_ts, r.updated_ts, r.deleted, r.head,
             r.lock_by, r.lock_at, r.lock_id, r.source, parley_message_search(r.author, left(r.body, 200000), r.file_names)
        from jsonb_to_recordset(${JSON.stringify(rows)}::jsonb)
          as r(conv_id bigint, id integer, author text, body text, format text, parent integer, files jsonb, file_names text[],
               created_ts timestamptz, updated_ts timestamptz, deleted boolean, head integer, lock_by text, lock_at timestamptz,
               lock_id integer, source jsonb)
      on conflict (conv_id, id) do update set
        body = excluded.body, format = excluded.format, files = excluded.files, updated_ts = excluded.updated_ts,
        deleted = excluded.deleted, head = excluded.head, lock_by = excluded.lock_by, lock_at = excluded.lock_at,
        lock_id = excluded.lock_id, search = excluded.search`.execute(tx);
  },
};

/** A row of `attachments`: one file of a message, in some version of it (migration 031). */
type AttachmentRow = AttachmentsTable;

const attachmentsWriter: RowWriter<AttachmentRow> = {
  name: 'insert attachments',
  write: async (tx, rows) => {
    await sql`
      insert into attachments (conv_id, message_id, ordinal, sha256, name, content_type, size, content_id, inline)
      select r.conv_id, r.message_id, r.ordinal, r.sha256, r.name, r.content_type, r.size, r.content_id, r.inline
        from jsonb_to_recordset(${JSON.stringify(rows)}::jsonb)
          as r(conv_id bigint, message_id integer, ordinal integer, sha256 text, name text, content_type text, size bigint,
               content_id text, inline boolean)
      on conflict (conv_id, message_id, ordinal, sha256) do nothing`.execute(tx);
  },
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
  name: 'upsert participants',
  write: async (tx, rows) => {
    await sql`
      insert into participants (conv_id, address, user_id, perms, added_id, head, removed_id, seen_id, last_event_ts)
      select r.conv_id, r.address, r.user_id, r.perms, r.added_id, r.head, r.removed_id, r.seen_id, r.last_event_ts
        from jsonb_to_recordset(${JSON.stringify(rows)}::jsonb)
          as r(conv_id bigint, address text, user_id bigint, perms text, added_id integer, head integer, removed_id integer,
               seen_id integer, last_event_ts timestamptz)
      on conflict (conv_id, address) do update set
        perms = excluded.perms, head = excluded.head, removed_id = excluded.removed_id, seen_id = excluded.seen_id`.execute(tx);
  },
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
  name: 'update conversations',
  write: async (tx, rows) => {
    // Search header: subject and every participant's address (src/store/migrations/002_search.sql).
    await sql`
      update conversations c set
        key = r.key, creator = r.creator, published = r.published, published_at = r.published_at, subject = r.subject,
        subject_head = r.subject_head, subject_lock_by = r.subject_lock_by, subject_lock_at = r.subject_lock_at,
        subject_lock_id = r.subject_lock_id, expiry = r.expiry, expiry_head = r.expiry_head, last_id = r.last_id,
        last_hash = r.last_hash, last_ts = r.last_ts, message_count = r.message_count,
        search_header = case when r.search_addresses is null then c.search_header
                             else parley_search_header(r.subject, r.search_addresses) end
        from jsonb_to_recordset(${JSON.stringify(rows)}::jsonb)
          as r(id bigint, key text, creator text, published boolean, published_at timestamptz, subject text, subject_head integer,
               subject_lock_by text, subject_lock_at timestamptz, subject_lock_id integer, expiry timestamptz,
               expiry_head integer, last_id integer, last_hash text, last_ts timestamptz, message_count integer,
               search_addresses text[])
       where c.id = r.id`.execute(tx);
  },
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
      file_names: m.files.map((f) => f.name),
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
