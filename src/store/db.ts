import { createHash } from 'node:crypto';
import pg from 'pg';
import { Kysely, PostgresDialect, sql, type Transaction } from 'kysely';
import type { Database } from './schema.ts';

// int8 (bigserial ids, count(*)) as JS numbers: every id and count here stays below 2^53.
pg.types.setTypeParser(20, (v) => Number(v));

/** The query layer: Kysely over a pg Pool. `pool` is exposed for LISTEN/NOTIFY and migrations. */
export interface Db {
  kysely: Kysely<Database>;
  pool: pg.Pool;
  /**
   * Set when the process begins to stop (`parley start` on SIGINT/SIGTERM, before anything
   * else) and by {@link Db.close}: connections lost from then on are expected — a Ctrl-C in
   * a terminal reaches the embedded PostgreSQL too, which closes every connection at once —
   * so the long-lived connections (LISTEN, the delivery worker's own) neither warn nor
   * reconnect.
   */
  stopping: boolean;
  close(): Promise<void>;
}

export type Tx = Transaction<Database>;
export type Queryable = Kysely<Database> | Tx;

/**
 * Opens a pool on `url`.
 * @param max pool size (connections); default 10
 */
export function openDb(url: string, max = 10): Db {
  const pool = new pg.Pool({ connectionString: url, max });
  // An idle client that loses its connection must not crash the process.
  pool.on('error', () => {});
  const kysely = new Kysely<Database>({
    dialect: new PostgresDialect({
      pool: { connect: async () => preparingClient(await pool.connect()), end: () => pool.end() } as unknown as pg.Pool,
    }),
  });
  const db: Db = {
    kysely,
    pool,
    stopping: false,
    close: async () => {
      db.stopping = true;
      await kysely.destroy();
      // Kysely ends the pool only if it ever used it; a CLI that only migrated would wait for the idle timeout.
      if (!pool.ended) await pool.end();
    },
  };
  return db;
}

/** Statements a connection keeps prepared at most; past that, queries go unnamed (planned each time). */
const MAX_PREPARED_PER_CONNECTION = 500;
/** SQL text → statement name (a hash of the text), shared by all connections. */
const statementNames = new Map<string, string>();
/** Names each pooled connection has prepared. */
const preparedOn = new WeakMap<pg.PoolClient, Set<string>>();
const PREPARABLE = /^\s*(select|insert|update|delete|with)\b/i;

/**
 * Wraps a pooled client so that every single-statement query Kysely sends runs as a named
 * prepared statement (name = a hash of its text). PostgreSQL then parses and plans it once
 * per connection instead of on every call: on this project's write path planning cost more
 * CPU than execution (docs/benchmarks.md, "Where the time goes"). Statement texts whose
 * parameter count varies (`in ($1, $2, …)`) would each get a name, so a connection prepares
 * at most {@link MAX_PREPARED_PER_CONNECTION} and sends the rest unnamed.
 */
function preparingClient(client: pg.PoolClient): pg.PoolClient {
  let names = preparedOn.get(client);
  if (!names) preparedOn.set(client, (names = new Set()));
  const prepared = names;
  const query = client.query.bind(client) as (...args: unknown[]) => unknown;
  return new Proxy(client, {
    get(target, prop, receiver) {
      if (prop !== 'query') return Reflect.get(target, prop, receiver) as unknown;
      return (text: unknown, values?: unknown[]) => {
        if (typeof text === 'string' && isPipelined(text)) return (query(text, values) as Promise<pg.QueryResult | pg.QueryResult[]>).then(selectResult);
        if (typeof text !== 'string' || !PREPARABLE.test(text)) return query(text, values);
        let name = statementNames.get(text);
        if (!name) {
          name = 'p' + createHash('sha1').update(text).digest('base64url');
          if (statementNames.size > 20_000) statementNames.clear();
          statementNames.set(text, name);
        }
        if (!prepared.has(name)) {
          if (prepared.size >= MAX_PREPARED_PER_CONNECTION) return query(text, values);
          prepared.add(name);
        }
        return query({ name, text, values });
      };
    },
  });
}

/**
 * The statements {@link pipelinedTransaction} sends as one simple-protocol query: BEGIN with
 * its first statement, its last statement with COMMIT. Never prepared (a prepared statement
 * holds one command); answered with the result of their SELECT ({@link selectResult}).
 */
const BEGIN_WITH = 'begin;\n';
const WITH_COMMIT = ';\ncommit';
function isPipelined(text: string): boolean {
  return text.startsWith(BEGIN_WITH) || text.endsWith(WITH_COMMIT);
}

/** The result of the SELECT among the results of a multi-statement query (node-postgres gives an array). */
function selectResult(r: pg.QueryResult | pg.QueryResult[]): pg.QueryResult {
  return Array.isArray(r) ? (r.find((x) => x.command === 'SELECT') ?? r[r.length - 1]) : r;
}

/**
 * `text` as a string literal of SQL, dollar-quoted: no character of it needs escaping, so a
 * long JSON batch costs one search for the quote's tag, not a pass over every character.
 */
export function dollarQuoted(text: string): string {
  let tag = 'parley';
  while (text.includes(`$${tag}$`)) tag = `parley${Math.random().toString(36).slice(2, 10)}`;
  return `$${tag}$${text}$${tag}$`;
}

/** What a {@link pipelinedTransaction} sends with its COMMIT, and who gets its rows. */
const withCommit = new WeakMap<object, { select: string; rows: (rows: unknown[]) => Promise<void> }>();

/**
 * Sends `select` (one SELECT statement with its values written in: {@link dollarQuoted}) in
 * the same round trip as the COMMIT of the {@link pipelinedTransaction} `tx`, after every
 * `beforeCommit` hook; `rows` gets its rows once the transaction has committed — it may
 * notify (notifyAfterCommit) but must not query. Returns false, sending nothing, when `tx`
 * is not such a transaction (the caller then runs the statement itself).
 */
export function sendWithCommit(tx: Queryable, select: string, rows: (rows: unknown[]) => Promise<void>): boolean {
  if (!pipelined.has(tx) || withCommit.has(tx)) return false;
  withCommit.set(tx, { select, rows });
  return true;
}

/** Transactions opened by {@link pipelinedTransaction}. */
const pipelined = new WeakSet<object>();

/**
 * {@link transaction} in two round trips fewer, for the group commit of the write path
 * (src/store/group-commit.ts; issue 2, Done means 7): BEGIN goes to PostgreSQL in one
 * simple-protocol query with `first` — a SELECT, its values written in, whose rows `fn`
 * receives — and COMMIT with the statement given to {@link sendWithCommit}, if any. Each
 * round trip saved is a write, a read and two wake-ups on both sides (≈ 0.1 ms of CPU) and,
 * for BEGIN, one less wait in the group's serial phase. Same guarantees as
 * {@link transaction}: `fn`'s result is returned only once COMMIT succeeded, notifications
 * are sent after it, and any error rolls the transaction back.
 * @param first a single SELECT (PL/pgSQL function calls keep their plans cached; a plain
 *   statement with values written in is planned on every call), or null for a plain BEGIN
 * @throws whatever `fn`, `first`, the hooks or COMMIT throw (rolled back)
 */
export async function pipelinedTransaction<T>(db: Db, first: string | null, fn: (tx: Tx, firstRows: unknown[]) => Promise<T>): Promise<T> {
  let state!: TxState;
  const result = await db.kysely.connection().execute(async (conn) => {
    const tx = conn as unknown as Tx;
    pipelined.add(tx);
    state = openTxState(tx);
    const hooks = state.beforeCommit;
    let open = true;
    try {
      const r0 = first === null ? await sql.raw('begin').execute(conn) : await sql.raw(`${BEGIN_WITH}${first}`).execute(conn);
      const r = await fn(tx, first === null ? [] : r0.rows);
      for (let i = 0; i < hooks.length; i++) await hooks[i]();
      const last = withCommit.get(tx);
      if (last) {
        const rows = (await sql.raw(`${last.select}${WITH_COMMIT}`).execute(conn)).rows;
        open = false;
        // Committed: nothing may fail the transaction now (its units would be run again).
        // What `rows` does is announce what was written; a notification lost costs latency
        // only — listeners poll as well (src/streams/realtime.ts).
        await last.rows(rows).catch(() => {});
      } else {
        await sql.raw('commit').execute(conn);
        open = false;
      }
      return r;
    } catch (e) {
      if (open) await sql.raw('rollback').execute(conn).catch(() => {});
      throw e;
    }
  });
  committedTx(db, state);
  return result;
}

/** What a transaction opened with {@link transaction} or {@link pipelinedTransaction} does around its COMMIT. */
interface TxState {
  /** Notifications sent once it has committed ({@link notifyAfterCommit}). */
  notices: { channel: string; payload: string }[];
  /** Hooks run once it has committed ({@link afterCommit}). */
  afterCommit: ((db: Db) => void)[];
  /** Its last work before COMMIT ({@link beforeCommit}). */
  beforeCommit: (() => Promise<void>)[];
}

/** Registers a new transaction's {@link TxState} under `tx`. */
function openTxState(tx: object): TxState {
  const state: TxState = { notices: [], afterCommit: [], beforeCommit: [] };
  pendingNotices.set(tx, state.notices);
  afterCommitHooks.set(tx, state.afterCommit);
  beforeCommitHooks.set(tx, state.beforeCommit);
  return state;
}

/** What follows a committed transaction: its notifications, then its after-commit hooks. */
function committedTx(db: Db, state: TxState): void {
  if (state.notices.length > 0) notifierOf(db).send(state.notices);
  runAfterCommit(db, state.afterCommit);
}

/** Notifications a transaction opened with {@link transaction} sends once it has committed. */
const pendingNotices = new WeakMap<object, { channel: string; payload: string }[]>();
/** Work a transaction opened with {@link transaction} runs once it has committed. */
const afterCommitHooks = new WeakMap<object, ((db: Db) => void)[]>();

/**
 * Runs `hook` (synchronous, given the transaction's Db) once `tx` — opened with
 * {@link transaction} or {@link pipelinedTransaction} — has committed, never if it rolls
 * back. For in-process announcements of what the transaction wrote (src/streams/
 * local-bus.ts); a hook's exception is ignored. Returns false, registering nothing, when
 * `tx` is not such a transaction.
 */
export function afterCommit(tx: Queryable, hook: (db: Db) => void): boolean {
  const hooks = afterCommitHooks.get(tx);
  if (!hooks) return false;
  hooks.push(hook);
  return true;
}

function runAfterCommit(db: Db, hooks: ((db: Db) => void)[]): void {
  for (const h of hooks) {
    try {
      h(db);
    } catch {
      /* announcements only: what they announce is committed and can be read */
    }
  }
}
/** Work a transaction opened with {@link transaction} runs as its last statements, just before COMMIT. */
const beforeCommitHooks = new WeakMap<object, (() => Promise<void>)[]>();

/**
 * Runs `hook` as the last work of `tx`, just before it commits — so row locks taken there
 * (the users' stream counters) are held only across the commit. Returns false, running
 * nothing, when `tx` was not opened with {@link transaction}: the caller then does the work now.
 */
export function beforeCommit(tx: Queryable, hook: () => Promise<void>): boolean {
  const hooks = beforeCommitHooks.get(tx);
  if (!hooks) return false;
  hooks.push(hook);
  return true;
}

/**
 * Runs `fn` in a transaction and, once it has committed, sends the notifications it asked
 * for with {@link notifyAfterCommit}. PostgreSQL serialises the commits of transactions that
 * executed NOTIFY behind one global lock held across the WAL flush, which capped the write
 * path at one commit per disk flush; notifying just after the commit keeps commits
 * concurrent. A notification lost to a crash between the two costs latency only: listeners
 * also poll (src/streams/realtime.ts, src/delivery/worker.ts).
 */
export async function transaction<T>(db: Db, fn: (tx: Tx) => Promise<T>): Promise<T> {
  let state!: TxState;
  const result = await db.kysely.transaction().execute(async (tx) => {
    state = openTxState(tx);
    const r = await fn(tx);
    for (let i = 0; i < state.beforeCommit.length; i++) await state.beforeCommit[i]();
    return r;
  });
  committedTx(db, state);
  return result;
}

/**
 * Sends the notifications of committed transactions, one statement at a time per pool:
 * those that come while one is on its way go together in the next (duplicates once), so
 * under load a notification costs a fraction of a round trip. The statement is its own
 * transaction with `synchronous_commit` off: it writes no data and acknowledges nothing to
 * anyone (the writes it announces are already durable), so it need not wait for a WAL
 * flush of its own — it used to, holding a pool connection and PostgreSQL's global NOTIFY
 * lock across each flush.
 */
class Notifier {
  private queue: { channel: string; payload: string }[] = [];
  private sending = false;

  constructor(private readonly pool: pg.Pool) {}

  send(notices: { channel: string; payload: string }[]): void {
    this.queue.push(...notices);
    if (!this.sending) void this.flush();
  }

  private async flush(): Promise<void> {
    this.sending = true;
    while (this.queue.length > 0) {
      const seen = new Set<string>();
      const batch = this.queue.filter((n) => {
        const k = `${n.channel}\u0000${n.payload}`;
        if (seen.has(k)) return false;
        seen.add(k);
        return true;
      });
      this.queue = [];
      await this.pool
        .query({
          name: 'parley_notify',
          text: "select set_config('synchronous_commit', 'off', true), pg_notify(c, p) from unnest($1::text[], $2::text[]) as t(c, p)",
          values: [batch.map((n) => n.channel), batch.map((n) => n.payload)],
        })
        .catch(() => {
          /* listeners poll as well */
        });
    }
    this.sending = false;
  }
}

const notifiers = new WeakMap<Db, Notifier>();

function notifierOf(db: Db): Notifier {
  let n = notifiers.get(db);
  if (!n) notifiers.set(db, (n = new Notifier(db.pool)));
  return n;
}

/**
 * NOTIFY `channel` with `payload` when `tx` commits: after the commit for transactions
 * opened with {@link transaction}, inside the transaction (delivered at commit) otherwise.
 */
export async function notifyAfterCommit(tx: Queryable, channel: string, payload: string): Promise<void> {
  const pending = pendingNotices.get(tx);
  if (pending) {
    if (!pending.some((n) => n.channel === channel && n.payload === payload)) pending.push({ channel, payload });
    return;
  }
  await sql`select pg_notify(${channel}, ${payload})`.execute(tx);
}

/** True when `e` is a PostgreSQL unique violation (SQLSTATE 23505), optionally on `constraint`. */
export function isUniqueViolation(e: unknown, constraint?: string): boolean {
  const err = e as { code?: string; constraint?: string };
  return err?.code === '23505' && (constraint === undefined || err.constraint === constraint);
}
