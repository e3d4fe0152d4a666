import pg from 'pg';
import type { Logger } from '../platform/logger.ts';
import type { Db } from './db.ts';

/**
 * One LISTEN connection per process (per {@link Db}) for every channel its parts wait on —
 * the websockets' stream events (src/streams/realtime.ts), the delivery worker's due rows
 * (src/delivery/worker.ts), the federation pusher's new actions (src/federation/pusher.ts).
 *
 * Why one: PostgreSQL signals *every* listening backend of a database at each NOTIFY commit,
 * whatever the channel (async.c SignalBackends), and each signalled backend wakes, reads the
 * notification queue and goes back to sleep. With a connection per part, every append woke
 * three backends of each process; now one (issue 2, Done means 7: the write path's CPU per
 * action; docs/benchmarks.md). It also means one connection of `max_connections` per process
 * instead of three, and every part gets the reconnect that only the websockets had.
 *
 * Delivery is at most once and may be lost (a dropped connection, a process that died between
 * a commit and its NOTIFY): every subscriber also polls, and is told through `onReconnect`
 * when the connection came back, so it can look for what it missed.
 */

/** A subscriber of one channel. */
interface Subscriber {
  /** Called with each notification's payload ('' when none), in the order PostgreSQL sent them. */
  onNotification(payload: string): void;
  /** Called after the connection was lost and made again (notifications may have been missed meanwhile). */
  onReconnect?(): void;
}

/** Reconnect delays after a lost connection, ms: doubled from the first up to the last. */
const RETRY_FIRST_MS = 100;
const RETRY_MAX_MS = 5000;

class ListenHub {
  private readonly channels = new Map<string, Set<Subscriber>>();
  private client: pg.Client | null = null;
  /** Channels the current connection LISTENs on. */
  private listening = new Set<string>();
  /** The connection being made, if any (subscribers wait for it). */
  private connecting: Promise<void> | null = null;
  private retryMs = RETRY_FIRST_MS;

  constructor(
    private readonly connectionString: string,
    private readonly log: Pick<Logger, 'warn'>,
    /** The process is stopping (Db.stopping): a lost connection is expected, not made again. */
    private readonly stopping: () => boolean,
  ) {}

  /** Adds `sub` to `channel`, LISTENing on it first if it is new. Resolves once the LISTEN is in place. */
  async subscribe(channel: string, sub: Subscriber): Promise<void> {
    let set = this.channels.get(channel);
    if (!set) this.channels.set(channel, (set = new Set()));
    set.add(sub);
    if (!this.client) await this.connect();
    const c = this.client;
    if (!c) throw new Error('the LISTEN connection was closed while being made');
    if (!this.listening.has(channel)) {
      await c.query(`LISTEN ${quoteChannel(channel)}`);
      this.listening.add(channel);
    }
  }

  /** Removes `sub`; UNLISTENs a channel left with no subscriber and closes the connection once none is left. */
  async unsubscribe(channel: string, sub: Subscriber): Promise<void> {
    const set = this.channels.get(channel);
    if (!set || !set.delete(sub) || set.size > 0) return;
    this.channels.delete(channel);
    const c = this.client;
    this.listening.delete(channel);
    if (this.channels.size === 0) {
      this.client = null;
      await c?.end().catch(() => {});
    } else await c?.query(`UNLISTEN ${quoteChannel(channel)}`).catch(() => {});
  }

  /** Makes the connection and LISTENs on every channel subscribed so far. */
  private connect(): Promise<void> {
    if (this.connecting) return this.connecting;
    const attempt = (async () => {
      const c = new pg.Client({ connectionString: this.connectionString });
      c.on('notification', (msg) => {
        for (const sub of this.channels.get(msg.channel) ?? []) {
          try {
            sub.onNotification(msg.payload ?? '');
          } catch (e) {
            this.log.warn({ err: e, channel: msg.channel }, 'notification handler failed');
          }
        }
      });
      c.on('error', (err) => this.lost(c, err));
      const listening = new Set<string>();
      try {
        await c.connect();
        for (const channel of this.channels.keys()) {
          await c.query(`LISTEN ${quoteChannel(channel)}`);
          listening.add(channel);
        }
      } catch (e) {
        await c.end().catch(() => {});
        throw e;
      }
      if (this.channels.size === 0) {
        // every subscriber left while it was being made
        await c.end().catch(() => {});
        return;
      }
      this.client = c;
      this.listening = listening;
      this.retryMs = RETRY_FIRST_MS;
    })();
    this.connecting = attempt;
    return attempt.finally(() => {
      this.connecting = null;
    });
  }

  /** The connection `c` failed: drop it and make a new one with backoff, then tell every subscriber. */
  private lost(c: pg.Client, err: unknown): void {
    if (this.client !== c) return;
    this.client = null;
    this.listening = new Set();
    c.end().catch(() => {});
    if (this.channels.size === 0 || this.stopping()) return;
    this.log.warn({ err }, 'LISTEN connection lost; reconnecting');
    const retry = () => {
      if (this.client || this.channels.size === 0) return;
      this.connect()
        .then(() => {
          for (const set of this.channels.values()) for (const sub of set) sub.onReconnect?.();
        })
        .catch((e) => {
          this.retryMs = Math.min(this.retryMs * 2, RETRY_MAX_MS);
          this.log.warn({ err: e, retryMs: this.retryMs }, 'LISTEN reconnect failed');
          setTimeout(retry, this.retryMs).unref();
        });
    };
    setTimeout(retry, this.retryMs).unref();
  }
}

/** A channel name as an SQL identifier (LISTEN takes no parameters). */
function quoteChannel(channel: string): string {
  return `"${channel.replaceAll('"', '""')}"`;
}

const hubs = new WeakMap<Db, ListenHub>();

/**
 * Calls `onNotification` with the payload of every NOTIFY on `channel` in `deps.db`'s
 * database, through the process's one LISTEN connection for that Db (made on first use,
 * remade with backoff when lost — then `onReconnect` is called; what happened is logged at
 * warn on `deps.log`). Resolves once the LISTEN is in place, so a NOTIFY committed after that
 * is heard, with the function that stops listening.
 * @throws the connection's error when the first connection cannot be made
 */
export async function listen(
  deps: { db: Db; log: Pick<Logger, 'warn'> },
  channel: string,
  onNotification: (payload: string) => void,
  onReconnect?: () => void,
): Promise<() => Promise<void>> {
  let hub = hubs.get(deps.db);
  if (!hub) {
    const connectionString = (deps.db.pool as unknown as { options: { connectionString: string } }).options.connectionString;
    const db = deps.db;
    hubs.set(db, (hub = new ListenHub(connectionString, deps.log, () => db.stopping)));
  }
  const sub: Subscriber = { onNotification, onReconnect };
  try {
    await hub.subscribe(channel, sub);
  } catch (e) {
    await hub.unsubscribe(channel, sub);
    throw e;
  }
  const h = hub;
  return () => h.unsubscribe(channel, sub);
}
