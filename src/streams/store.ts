import type { Action } from '../core/actions.ts';
import { afterCommit, beforeCommit, notifyAfterCommit, type Tx, type Queryable } from '../store/db.ts';
import { defersWrites, type RowWriter, writeRows } from '../store/group-commit.ts';
import { publishLocalEvents } from './local-bus.ts';
import type { StreamEvent } from './read.ts';

/**
 * Per-user event streams (PRODUCT.md §5; the device-sync seed 003): every event that
 * concerns a user gets the next number of that user's stream, inside the writing
 * transaction. Numbers are gapless and in commit order per user, because the user row
 * is locked while they are assigned; locks are taken in user-id order (no deadlocks). The
 * lock is FOR NO KEY UPDATE: a FOR UPDATE lock would conflict with the KEY SHARE lock that
 * inserting a row referencing the user (participants, user_events) takes, and two
 * concurrent writers for the same user would deadlock.
 */

export interface NewEvent {
  userId: number;
  convId: number;
  kind: 'action' | 'flags' | 'labels';
  actionId?: number | null;
  payload?: unknown;
  /**
   * The conversation's key and the action itself, as `user_events` joined to them will read
   * once committed: with them the event is also handed to this process's websockets
   * directly (src/streams/local-bus.ts). Events without them are only read back.
   */
  local?: { conv: string; action?: Action };
}

/** The realtime bus channel (PostgreSQL LISTEN/NOTIFY); payload documented in notifyUsers. */
export const EVENTS_CHANNEL = 'parley_events';

/** Events of transactions opened with `transaction()`, written just before their commit. */
const deferred = new WeakMap<object, NewEvent[]>();

/** An event row as the stream writer buffers it; a user's events are numbered in the order written. */
interface EventRow {
  user_id: number;
  conv_id: number;
  kind: NewEvent['kind'];
  action_id: number | null;
  payload: unknown;
  /** NewEvent.local (not written). */
  local: NewEvent['local'] | null;
}

/**
 * Stream events, written by parley_write_rows in one statement after every other row of
 * the transaction: it locks the users' `user_streams` rows (migration 039) in id order, advances each `seq` by the
 * user's number of events and inserts the events with consecutive numbers, returning the
 * last number given to each user, which listeners are then notified of (after commit).
 * Each row goes as `[user_id, ord, conv_id, kind, action_id, payload]` (migration
 * 034_write_rows_positional.sql), `ord` numbering the user's events of the transaction
 * 1, 2, … in the order they were appended.
 */
const eventsWriter: RowWriter<EventRow> = {
  kind: 'events',
  last: true,
  encode: (rows) => {
    const count = new Map<number, number>();
    return rows.map((e) => {
      const ord = (count.get(e.user_id) ?? 0) + 1;
      count.set(e.user_id, ord);
      return [e.user_id, ord, e.conv_id, e.kind, e.action_id, e.payload];
    });
  },
  written: async (tx, result, rows) => {
    const last = new Map(result as [number, number][]);
    announceLocally(tx, last, rows);
    await notifyUsers(tx, last);
  },
};

/**
 * Once `tx` commits, hands the events just written to this process's websockets
 * (local-bus.ts) — per user, numbered as parley_write_rows numbered them: a user's n events
 * of the statement, in order, end at the user's `last` number. A user any of whose events
 * lacks `local` is left to the stream read.
 */
function announceLocally(tx: Tx, last: Map<number, number>, rows: EventRow[]): void {
  const byUser = new Map<number, EventRow[]>();
  for (const r of rows) {
    const list = byUser.get(r.user_id);
    if (list) list.push(r);
    else byUser.set(r.user_id, [r]);
  }
  const out = new Map<number, StreamEvent[]>();
  for (const [userId, list] of byUser) {
    const end = last.get(userId);
    if (end === undefined || list.some((r) => !r.local)) continue;
    out.set(
      userId,
      list.map((r, i) => ({
        seq: end - list.length + 1 + i,
        kind: r.kind,
        conv: r.local!.conv,
        ...(r.local!.action ? { action: r.local!.action } : {}),
        ...(r.payload != null ? { payload: r.payload } : {}),
      })),
    );
  }
  if (out.size > 0) afterCommit(tx, (db) => publishLocalEvents(db, out));
}

/**
 * Appends events to their users' streams and, once committed, notifies listeners. In a
 * transaction opened with `transaction()` (src/store/db.ts) the events are written as its
 * last statement, just before COMMIT, so each user's stream counter is locked only across
 * the commit rather than the whole transaction (mail for one user no longer queues behind
 * every earlier writer's transaction); in a group transaction (src/store/group-commit.ts)
 * they are part of its one batch of writes, after every other row; elsewhere they are
 * written now.
 */
export async function appendEvents(tx: Tx, events: NewEvent[]): Promise<void> {
  if (events.length === 0) return;
  if (defersWrites(tx)) return writeRows(tx, eventsWriter, events.map(eventRow));
  const pending = deferred.get(tx);
  if (pending) {
    pending.push(...events);
    return;
  }
  const list = [...events];
  const registered = beforeCommit(tx, async () => {
    deferred.delete(tx);
    await writeRows(tx, eventsWriter, list.map(eventRow));
  });
  if (registered) deferred.set(tx, list);
  else await writeRows(tx, eventsWriter, list.map(eventRow));
}

function eventRow(e: NewEvent): EventRow {
  return { user_id: e.userId, conv_id: e.convId, kind: e.kind, action_id: e.actionId ?? null, payload: e.payload ?? null, local: e.local ?? null };
}

/**
 * NOTIFY parley_events with `{"u":[[userId, lastSeq], …]}` (chunked under PostgreSQL's
 * 8000-byte payload limit), once the transaction has committed (store/db.ts notifyAfterCommit).
 */
export async function notifyUsers(db: Queryable, last: Map<number, number>): Promise<void> {
  const pairs = [...last.entries()];
  for (let i = 0; i < pairs.length; i += 300) {
    const payload = JSON.stringify({ u: pairs.slice(i, i + 300) });
    await notifyAfterCommit(db, EVENTS_CHANNEL, payload);
  }
}
