import { sql } from 'kysely';
import type { Action } from '../core/actions.ts';
import { FOLDERS, type Folder } from '../core/folders.ts';
import { replay } from '../core/reducer.ts';
import { badRequest, notFound } from '../platform/errors.ts';
import { type Deps, primaryDomain } from '../context.ts';
import type { Queryable } from '../store/db.ts';
import type { Actor } from './commands/apply-actions.ts';
import { findConversation, loadFullState, readActions } from './store.ts';
import { proposalsOf } from '../federation/proposals.ts';

/**
 * SQL of each folder, mirroring core/folders.ts `inFolder` (p = participants, c = conversations,
 * `me` = the user's address). Keep the two in step: a property test compares them.
 */
export function folderSql(folder: Folder, me: string) {
  const creator = sql`c.creator = ${me}`;
  switch (folder) {
    case 'inbox':
      return sql`(p.inbox and not p.deleted and not p.spam)`;
    case 'draft':
      return sql`(${creator} and not c.published and not p.deleted)`;
    case 'sent':
      return sql`(${creator} and c.published and not p.deleted)`;
    case 'archive':
      return sql`(not p.inbox and not p.spam and not p.deleted and c.creator <> ${me})`;
    case 'spam':
      return sql`(p.spam and not p.deleted)`;
    case 'deleted':
      return sql`p.deleted`;
  }
}

/** Conversations a user may see: theirs as a participant, drafts only for the creator. */
const visible = (userId: number, me: string) =>
  sql`p.user_id = ${userId} and (c.published or c.creator = ${me})`;

/** One row of the conversation list. */
export interface ConversationSummary {
  key: string;
  subject: string;
  creator: string;
  published: boolean;
  created_at: string;
  updated_at: string;
  last_action_id: number;
  message_count: number;
  unseen: boolean;
  muted: boolean;
  removed: boolean;
  flags: { inbox: boolean; deleted: boolean; spam: boolean };
  labels: number[];
}

/**
 * A list row (participants p joined with conversations c, plus `labels`) as the API shows
 * it; a removed participant sees the conversation as it was at the removal (p.snapshot).
 */
export function conversationSummary(r: any): ConversationSummary {
  const snap = r.removed_id !== null ? (r.snapshot ?? {}) : {};
  return {
    key: r.key,
    subject: snap.subject ?? r.subject,
    creator: r.creator,
    published: r.published,
    created_at: new Date(r.created_at).toISOString(),
    updated_at: new Date(snap.last_ts ?? r.last_ts ?? r.created_at).toISOString(),
    last_action_id: r.removed_id ?? r.last_id,
    message_count: snap.message_count ?? r.message_count,
    unseen: !r.seen,
    muted: r.muted,
    removed: r.removed_id !== null,
    flags: { inbox: r.inbox, deleted: r.deleted, spam: r.spam },
    labels: r.labels.map(Number),
  };
}

function encodeCursor(ts: Date | string, id: number): string {
  return Buffer.from(`${new Date(ts).toISOString()}|${id}`).toString('base64url');
}
function decodeCursor(c: string): { ts: string; id: number } {
  const [ts, id] = Buffer.from(c, 'base64url').toString().split('|');
  if (!ts || !id || Number.isNaN(Date.parse(ts)) || !/^\d+$/.test(id)) throw badRequest('invalid_cursor', 'cursor is not one this API returned');
  return { ts, id: Number(id) };
}

/**
 * `listConversations` — newest activity first, cursor-paged. Filter by `folder` or `label`
 * (a label id of the user's). For a removed participant the row shows the conversation as
 * it was at the removal.
 * @returns items and `next_cursor` (null on the last page)
 */
export async function listConversations(
  deps: Deps,
  user: Actor,
  opts: { folder?: Folder; label?: number; cursor?: string; limit: number; unseen?: boolean },
): Promise<{ items: ConversationSummary[]; next_cursor: string | null }> {
  const where = [visible(user.id, user.address)];
  if (opts.folder) where.push(folderSql(opts.folder, user.address));
  if (opts.label !== undefined)
    where.push(sql`exists (select 1 from conversation_labels cl where cl.conv_id = c.id and cl.label_id = ${opts.label} and cl.user_id = ${user.id})`);
  if (opts.unseen) where.push(sql`not p.seen`);
  if (opts.cursor) {
    const cur = decodeCursor(opts.cursor);
    where.push(sql`(p.last_event_ts, c.id) < (${cur.ts}::timestamptz, ${cur.id})`);
  }
  const rows = await sql<any>`
    select c.id, c.key, c.subject, c.creator, c.published, c.created_at, c.last_ts, c.last_id, c.message_count,
           p.seen, p.muted, p.inbox, p.deleted, p.spam, p.removed_id, p.snapshot, p.last_event_ts,
           coalesce((select array_agg(cl.label_id order by cl.label_id) from conversation_labels cl
                      where cl.conv_id = c.id and cl.user_id = ${user.id}), '{}') as labels
      from participants p join conversations c on c.id = p.conv_id
     where ${sql.join(where, sql` and `)}
     order by p.last_event_ts desc, c.id desc
     limit ${opts.limit + 1}`.execute(deps.db.kysely);
  const page = rows.rows.slice(0, opts.limit);
  const items = page.map(conversationSummary);
  const last = page[page.length - 1];
  return {
    items,
    next_cursor: rows.rows.length > opts.limit && last ? encodeCursor(last.last_event_ts, last.id) : null,
  };
}

/** Counts of one folder or label: all conversations and the unseen ones. */
export interface Count {
  total: number;
  unseen: number;
}

/**
 * `folderCounts` — exact counts per folder and per label, computed from the flags in one
 * query (never drifting counters).
 */
export async function folderCounts(
  deps: Deps,
  user: Actor,
): Promise<{ folders: Record<Folder, Count>; labels: Record<string, Count> }> {
  const cols = FOLDERS.map(
    (f) => sql`count(*) filter (where ${folderSql(f, user.address)}) as ${sql.ref(f)},
               count(*) filter (where ${folderSql(f, user.address)} and not p.seen) as ${sql.ref(`${f}_unseen`)}`,
  );
  const r = await sql<any>`
    select ${sql.join(cols, sql`, `)}
      from participants p join conversations c on c.id = p.conv_id
     where ${visible(user.id, user.address)}`.execute(deps.db.kysely);
  const row = r.rows[0];
  const folders = Object.fromEntries(FOLDERS.map((f) => [f, { total: Number(row[f]), unseen: Number(row[`${f}_unseen`]) }])) as Record<Folder, Count>;
  const lr = await sql<{ id: number; total: number; unseen: number }>`
    select l.id, count(p.conv_id) as total, count(p.conv_id) filter (where not p.seen) as unseen
      from labels l
      left join conversation_labels cl on cl.label_id = l.id
      left join participants p on p.conv_id = cl.conv_id and p.user_id = l.user_id
      left join conversations c on c.id = p.conv_id and (c.published or c.creator = ${user.address})
     where l.user_id = ${user.id} and (p.conv_id is null or c.id is not null)
     group by l.id`.execute(deps.db.kysely);
  const labels = Object.fromEntries(lr.rows.map((x) => [String(x.id), { total: Number(x.total), unseen: Number(x.unseen) }]));
  return { folders, labels };
}

/** The caller's participation in a conversation, or 404 when they may not see it. */
export async function visibleConversation(db: Queryable, user: Actor, key: string) {
  const row = await findConversation(db, key);
  if (!row) throw notFound('conversation');
  const p = await db
    .selectFrom('participants')
    .selectAll()
    .where('conv_id', '=', row.id)
    .where('address', '=', user.address)
    .where('user_id', '=', user.id)
    .executeTakeFirst();
  if (!p || (!row.published && row.creator !== user.address)) throw notFound('conversation');
  return { row, participation: p };
}

/**
 * `getConversation` — the state of a conversation as the caller may see it: everything for
 * an active participant; for a removed one, the state rebuilt from the log up to the removal.
 */
export async function getConversation(deps: Deps, user: Actor, key: string, withActions: boolean) {
  const db = deps.db.kysely;
  const { row, participation: p } = await visibleConversation(db, user, key);
  const upTo = p.removed_id ?? row.last_id;
  const state = p.removed_id !== null ? replay(await readActions(db, row.id, 1, upTo, upTo)) : await loadFullState(db, row);
  const h = state.header!;
  const labels = await db.selectFrom('conversation_labels').select('label_id').where('conv_id', '=', row.id).where('user_id', '=', user.id).execute();
  return {
    key: row.key,
    draft_key: row.draft_key,
    subject: h.subject,
    subject_head: h.subject_head,
    subject_lock: h.subject_lock,
    creator: h.creator,
    leader: row.leader,
    published: h.published,
    published_at: h.published_at,
    created_at: h.created_at,
    expiry: h.expiry,
    expiry_head: h.expiry_head,
    last_action_id: h.last_id,
    last_hash: h.last_hash,
    updated_at: h.last_ts,
    participants: [...state.participants.values()].map((x) => ({
      address: x.address,
      perms: x.perms,
      added_id: x.added_id,
      head: x.head,
      removed_id: x.removed_id,
      seen_id: x.seen_id,
    })),
    messages: [...state.messages.values()].sort((a, b) => a.id - b.id),
    flags: { inbox: p.inbox, deleted: p.deleted, spam: p.spam, seen: p.seen, muted: p.muted },
    removed_id: p.removed_id,
    labels: labels.map((l) => l.label_id),
    // The caller's actions waiting for (or refused by) the leader of a conversation led elsewhere (docs/federation.md, "Proposals").
    ...(row.leader !== primaryDomain(deps) ? { pending: await proposalsOf(deps, row.id, user.address) } : {}),
    ...(withActions ? { actions: await readActions(db, row.id, 1, upTo, 10_000) } : {}),
  };
}

/**
 * `actionsSince` — the actions after id `since` that the caller may see (up to their
 * removal), at most `limit`, oldest first.
 */
export async function actionsSince(deps: Deps, user: Actor, key: string, since: number, limit: number): Promise<{ actions: Action[]; last_action_id: number }> {
  const db = deps.db.kysely;
  const { row, participation: p } = await visibleConversation(db, user, key);
  const upTo = p.removed_id ?? row.last_id;
  return { actions: await readActions(db, row.id, since + 1, upTo, limit), last_action_id: upTo };
}
