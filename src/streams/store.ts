import { sql } from 'kysely';
import { beforeCommit, notifyAfterCommit, type Tx, type Queryable } from '../store/db.ts';

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

/** Events of transactions opened with `transaction()`, written just before their commit. */
const deferred = new WeakMap<object, NewEvent[]>();

/**
 * Appends events to their users' streams and, once committed, notifies listeners. In a
 * transaction opened with `transaction()` (src/store/db.ts) the events are written as its
 * last statement, just before COMMIT, so each user's stream counter is locked only across
 * the commit rather than the whole transaction (mail for one user no longer queues behind
 * every earlier writer's transaction); elsewhere they are written now.
 */
export async function appendEvents(tx: Tx, events: NewEvent[]): Promise<void> {
  if (events.length === 0) return;
  const pending = deferred.get(tx);
  if (pending) {
    pending.push(...events);
    return;
  }
  const list = [...events];
  const registered = beforeCommit(tx, async () => {
    deferred.delete(tx);
    await writeEvents(tx, list);
  });
  if (registered) deferred.set(tx, list);
  else await writeEvents(tx, list);
}

/**
 * Writes events in one statement: locks the users' rows in id order, advances each
 * `stream_seq` by the user's number of events and inserts the events with consecutive
 * numbers; then notifies (after commit). Returns the last number given to each user.
 */
async function writeEvents(tx: Tx, events: NewEvent[]): Promise<Map<number, number>> {
  const counts = new Map<number, number>();
  const ord: number[] = [];
  for (const e of events) {
    const n = (counts.get(e.userId) ?? 0) + 1;
    counts.set(e.userId, n);
    ord.push(n);
  }
  const ids = [...counts.keys()].sort((a, b) => a - b);
  const incs = ids.map((id) => counts.get(id)!);
  const rows = await sql<{ user_id: number; seq: number }>`
    with inc as (select * from unnest(${ids}::bigint[], ${incs}::int[]) as t(id, n)),
         locked as (select u.id from users u where u.id = any(${ids}::bigint[]) order by u.id for no key update),
         upd as (update users u set stream_seq = u.stream_seq + inc.n
                   from inc join locked on locked.id = inc.id
                  where u.id = inc.id
                 returning u.id, u.stream_seq, inc.n),
         ev as (select * from unnest(${events.map((e) => e.userId)}::bigint[], ${ord}::int[], ${events.map((e) => e.convId)}::bigint[],
                                     ${events.map((e) => e.kind)}::text[], ${events.map((e) => e.actionId ?? null)}::int[],
                                     ${events.map((e) => (e.payload === undefined ? null : JSON.stringify(e.payload)))}::jsonb[])
                  as e(user_id, ord, conv_id, kind, action_id, payload))
    insert into user_events (user_id, seq, conv_id, kind, action_id, payload)
    select e.user_id, upd.stream_seq - upd.n + e.ord, e.conv_id, e.kind, e.action_id, e.payload
      from ev e join upd on upd.id = e.user_id
    returning user_id, seq`.execute(tx);
  const last = new Map<number, number>();
  for (const r of rows.rows) if (r.seq > (last.get(r.user_id) ?? 0)) last.set(r.user_id, r.seq);
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
