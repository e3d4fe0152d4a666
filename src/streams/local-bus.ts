import type { Db } from '../store/db.ts';
import type { StreamEvent } from './read.ts';

/**
 * In-process delivery of committed stream events (issue 2, "Live updates"; issue 3's
 * replicas stream what they apply the same way). A transaction that wrote stream events
 * knows, once committed, every event with its number, conversation key and action; it
 * hands them to the web process it runs in, whose websockets send them straight away
 * instead of reading them back from `user_events` — one query, and one JSON parse and
 * stringify of each action, fewer per frame. Other processes still learn of the events
 * through NOTIFY (src/streams/realtime.ts) and read them; a socket takes events from here
 * only when the first of them follows its cursor exactly, so a gap or a reordering falls
 * back to reading the stream.
 */
export type LocalEventsListener = (userId: number, events: StreamEvent[]) => void;

const listenersByDb = new WeakMap<Db, Set<LocalEventsListener>>();

/**
 * Calls `listener` with each user's events committed by this process on `db`, in stream
 * order (numbers consecutive within one call). Returns the unsubscribe function.
 */
export function onLocalEvents(db: Db, listener: LocalEventsListener): () => void {
  let set = listenersByDb.get(db);
  if (!set) listenersByDb.set(db, (set = new Set()));
  set.add(listener);
  return () => void set!.delete(listener);
}

/** Hands committed events (per user, in stream order) to the listeners of `db`; a listener's exception is its own. */
export function publishLocalEvents(db: Db, byUser: Map<number, StreamEvent[]>): void {
  const set = listenersByDb.get(db);
  if (!set || set.size === 0) return;
  for (const [userId, events] of byUser)
    for (const l of set) {
      try {
        l(userId, events);
      } catch {
        /* the socket falls back to reading its stream */
      }
    }
}
