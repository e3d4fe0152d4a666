import type { Action } from '../core/actions.ts';
import { flagsAfterAction, type UserFlags } from '../core/folders.ts';
import type { ConversationState } from '../core/reducer.ts';
import type { Deps } from '../context.ts';
import type { Tx } from '../store/db.ts';
import { appendEvents, type NewEvent } from '../streams/store.ts';
import { type RowWriter, writeRows } from '../store/group-commit.ts';
import { enqueueEmails } from '../mail/outbound/enqueue.ts';

interface LocalParticipant extends UserFlags {
  address: string;
  user_id: number;
  added_id: number;
  removed_id: number | null;
}

/**
 * The participants' rows as loaded before the actions (with user ids and flags) and the user
 * ids of participants the actions added: lets the write path skip re-reading participants.
 */
export interface KnownParticipants {
  rows: Map<string, { user_id: number | null } & UserFlags>;
  newUserIds: Map<string, number>;
}

/** Flags of one participant that actions changed (null: unchanged). */
interface FlagsRow {
  conv_id: number;
  address: string;
  inbox: boolean | null;
  seen: boolean | null;
  last_event_ts: string | null;
}

// Positional rows of parley_write_rows (src/store/migrations/034_write_rows_positional.sql).
const flagsWriter: RowWriter<FlagsRow> = {
  kind: 'flags',
  encode: (rows) => rows.map((f) => [f.conv_id, f.address, f.inbox, f.seen, f.last_event_ts]),
};

const snapshotsWriter: RowWriter<{ conv_id: number; address: string; snapshot: unknown }> = {
  kind: 'snapshots',
  encode: (rows) => rows.map((r) => [r.conv_id, r.address, r.snapshot]),
};

/**
 * Who of the local participants may see action `a`: a participant sees the actions from
 * the one that added them up to the one that removed them (PRODUCT.md §1: removed
 * participants keep read access up to the removal and get nothing after). A draft is
 * seen by its creator alone.
 */
export function seesAction(p: { address: string; added_id: number; removed_id: number | null }, a: Action, published: boolean, creator: string): boolean {
  if (!published && a.act !== 'conv:publish') return p.address === creator;
  return a.id >= p.added_id && (p.removed_id === null || a.id <= p.removed_id);
}

/**
 * The consequences of newly appended actions, in the same transaction (ARCHITECTURE.md,
 * "Writes", step 2): local participants' flags, their stream events (and so the websocket
 * frames after commit), and the outbound emails for email participants.
 * @param wasPublished whether the conversation was published before these actions
 * @param known participants as loaded by the write path (else they are read here)
 */
export async function recordEffects(
  tx: Tx,
  deps: Deps,
  convId: number,
  s: ConversationState,
  actions: Action[],
  wasPublished: boolean,
  known?: KnownParticipants,
): Promise<void> {
  const h = s.header!;
  const locals: LocalParticipant[] = known
    ? [...s.participants.values()].flatMap((p) => {
        const row = known.rows.get(p.address);
        const userId = row?.user_id ?? known.newUserIds.get(p.address);
        if (userId == null) return [];
        const flags = row ?? { inbox: false, deleted: false, spam: false, seen: true, muted: false };
        return [{ address: p.address, user_id: userId, added_id: p.added_id, removed_id: p.removed_id, inbox: flags.inbox, deleted: flags.deleted, spam: flags.spam, seen: flags.seen, muted: flags.muted }];
      })
    : ((await tx
        .selectFrom('participants')
        .select(['address', 'user_id', 'added_id', 'removed_id', 'inbox', 'deleted', 'spam', 'seen', 'muted'])
        .where('conv_id', '=', convId)
        .where('user_id', 'is not', null)
        .execute()) as LocalParticipant[]);

  const events: NewEvent[] = [];
  /** Per participant who saw an action: the flag values the actions set (null: unchanged). */
  const changed = new Map<string, { inbox: boolean | null; seen: boolean | null }>();
  let published = wasPublished;
  for (const a of actions) {
    if (a.act === 'conv:publish') published = true;
    for (const p of locals) {
      if (!seesAction(p, a, published, h.creator)) continue;
      events.push({ userId: p.user_id, convId, kind: 'action', actionId: a.id, local: { conv: h.key, action: a } });
      const next = flagsAfterAction(p, a, p.address, published);
      const delta = changed.get(p.address) ?? { inbox: null, seen: null };
      if (next.inbox !== p.inbox) delta.inbox = next.inbox;
      if (next.seen !== p.seen) delta.seen = next.seen;
      Object.assign(p, next);
      changed.set(p.address, delta);
    }
  }
  // Only the flags these actions changed are written (coalesce keeps the rest), so a
  // concurrent archive or mute by the user is never overwritten with a stale value.
  await writeRows(
    tx,
    flagsWriter,
    [...changed].map(([address, d]) => ({ conv_id: convId, address, inbox: d.inbox, seen: d.seen, last_event_ts: h.last_ts })),
  );
  const removedLocals = actions
    .filter((a) => a.act === 'participant:remove' && locals.some((p) => p.address === a.participant))
    .map((a) => a.participant!);
  // What a removed participant's list shows from now on: the conversation as at the removal.
  const snapshot = { subject: h.subject, last_ts: h.last_ts, message_count: h.message_count };
  await writeRows(
    tx,
    snapshotsWriter,
    removedLocals.map((address) => ({ conv_id: convId, address, snapshot })),
  );
  await appendEvents(tx, events);
  await enqueueEmails(tx, deps, convId, s, actions, wasPublished);
}
