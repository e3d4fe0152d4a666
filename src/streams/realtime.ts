import type { Deps } from '../context.ts';
import { listen } from '../store/listen.ts';
import { onLocalEvents } from './local-bus.ts';
import type { StreamEvent } from './read.ts';
import { EVENTS_CHANNEL } from './store.ts';

/**
 * Why a subscriber is woken: `events` — the user's events committed by this process, in
 * stream order (src/streams/local-bus.ts); `upTo` — the user's stream reaches at least this
 * number (a notification or the safety poll); neither — it may have grown (reconnect).
 */
export interface Wake {
  events?: StreamEvent[];
  upTo?: number;
}

/**
 * The realtime bus of a web process: LISTENing on `parley_events` through the process's one
 * LISTEN connection (src/store/listen.ts; ARCHITECTURE.md: "realtime events cross processes
 * through LISTEN/NOTIFY").
 * Subscribers are told a user's stream grew; they read the stream from their cursor, so a
 * lost notification costs latency, never an event. Events committed by this very process
 * come with the wake-up itself (local-bus.ts), so a subscriber need not read them. After a reconnect every subscriber is
 * woken, to re-read what it may have missed; and every {@link SAFETY_POLL_MS} the stream
 * heads of subscribed users are read, waking those whose stream grew without a
 * notification (one sent after commit by a process that died right then).
 */
export interface Realtime {
  /** Calls `listener` whenever `userId`'s stream may have grown (see {@link Wake}). Returns the unsubscribe function. */
  subscribe(userId: number, listener: (wake: Wake) => void): () => void;
  stop(): Promise<void>;
}

/** How often the stream heads of subscribed users are polled as a safety net, ms. */
export const SAFETY_POLL_MS = 1000;

export async function startRealtime(deps: Deps): Promise<Realtime> {
  const listeners = new Map<number, Set<(wake: Wake) => void>>();
  /** Highest stream position known per subscribed user (from notifications or polling). */
  const known = new Map<number, number>();
  const wakeAll = () => {
    for (const set of listeners.values()) for (const l of set) l({});
  };
  const stopLocal = onLocalEvents(deps.db, (userId, events) => {
    const set = listeners.get(userId);
    if (!set || events.length === 0) return;
    const seq = events[events.length - 1].seq;
    if (seq > (known.get(userId) ?? 0)) known.set(userId, seq);
    for (const l of set) l({ events });
  });
  const onNotification = (payload: string) => {
    if (!payload) return;
    try {
      const { u } = JSON.parse(payload) as { u: [number, number][] };
      for (const [userId, seq] of u) {
        if (!listeners.has(userId)) continue;
        if (seq > (known.get(userId) ?? 0)) known.set(userId, seq);
        for (const l of listeners.get(userId) ?? []) l({ upTo: seq });
      }
    } catch (e) {
      deps.log.warn({ err: e }, 'malformed realtime notification');
    }
  };
  const unlisten = await listen(deps, EVENTS_CHANNEL, onNotification, wakeAll);
  let polling = false;
  const safetyPoll = setInterval(() => {
    if (polling || listeners.size === 0) return;
    polling = true;
    deps.db.pool
      .query('select user_id, seq from user_streams where user_id = any($1::bigint[])', [[...listeners.keys()]])
      .then((r) => {
        for (const { user_id: userId, seq } of r.rows as { user_id: number; seq: number }[]) {
          const before = known.get(userId);
          known.set(userId, seq);
          if (before !== undefined && seq > before) for (const l of listeners.get(userId) ?? []) l({ upTo: seq });
        }
      })
      .catch(() => {})
      .finally(() => {
        polling = false;
      });
  }, SAFETY_POLL_MS);
  safetyPoll.unref();
  return {
    subscribe(userId, listener) {
      let set = listeners.get(userId);
      if (!set) listeners.set(userId, (set = new Set()));
      set.add(listener);
      return () => {
        set!.delete(listener);
        if (set!.size === 0) {
          listeners.delete(userId);
          known.delete(userId);
        }
      };
    },
    async stop() {
      stopLocal();
      clearInterval(safetyPoll);
      await unlisten();
    },
  };
}
