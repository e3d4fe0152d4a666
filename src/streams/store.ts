import { sql } from 'kysely';
import { notifyAfterCommit, type Tx, type Queryable } from '../store/db.ts';

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
}

/** The realtime bus channel (PostgreSQL LISTEN/NOTIFY); payload documented in notifyUsers. */
export const EVENTS_CHANNEL = 'parley_events';

/**
 * Appends events to their users' streams and, on commit, notifies listeners.
 * Returns the last sequence number given to each user.
 */
export async function appendEvents(tx: Tx, events: NewEvent[]): Promise<Map<number, number>> {
  const last = new Map<number, number>();
  if (events.length === 0) return last;
  const counts = new Map<number, number>();
  for (const e of events) counts.set(e.userId, (counts.get(e.userId) ?? 0) + 1);
  const ids = [...counts.keys()].sort((a, b) => a - b);
  const incs = ids.map((id) => counts.get(id)!);
  const rows = await sql<{ id: number; stream_seq: number }>`
    with locked as (select id from users where id = any(${ids}::bigint[]) order by id for no key update),
         inc as (select * from unnest(${ids}::bigint[], ${incs}::int[]) as t(id, n))
    update users u set stream_seq = u.stream_seq + inc.n
      from locked join inc on inc.id = locked.id
     where u.id = locked.id
    returning u.id, u.stream_seq`.execute(tx);
  const next = new Map<number, number>();
  for (const r of rows.rows) {
    next.set(r.id, r.stream_seq - counts.get(r.id)! + 1);
    last.set(r.id, r.stream_seq);
  }
  const values = events.map((e) => {
    const seq = next.get(e.userId)!;
    next.set(e.userId, seq + 1);
    return {
      user_id: e.userId,
      seq,
      conv_id: e.convId,
      kind: e.kind,
      action_id: e.actionId ?? null,
      payload: e.payload === undefined ? null : JSON.stringify(e.payload),
    };
  });
  for (let i = 0; i < values.length; i += 1000) {
    await tx.insertInto('user_events').values(values.slice(i, i + 1000)).execute();
  }
  await notifyUsers(tx, last);
  return last;
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
