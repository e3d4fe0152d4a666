/**
 * Group commit for the write path (issue 2, Done means 7: append throughput on two cores).
 *
 * Every SQL round trip costs this platform far more CPU than the work it carries (syscalls
 * and wake-ups on both sides: docs/benchmarks.md, "Where the time goes"), and every commit
 * waits for one WAL flush. So concurrent writers that touch different conversations share
 * one transaction: each runs its own logic (its reads, the core rules) in turn inside it, the
 * rows they write are buffered ({@link writeRows}) and written in the same round trip as the
 * single COMMIT (`parley_write_rows`, migrations 033 and 034: one set-based statement per
 * kind of row inside it). Ten concurrent appends then cost two round trips between them —
 * BEGIN with the shared read that locks their conversations, then the write with COMMIT —
 * and one flush, instead of ten of each.
 *
 * Shared transactions overlap: one runs its units (JavaScript, one at a time) while the
 * ones before it write and commit. The next starts as soon as the units of the one before
 * have run — on the next turn of the event loop, so that every request that arrived
 * meanwhile joins it (issue 2, Done means 7; docs/benchmarks.md, session 9). Their writes do
 * not wait for one another: the rows of a unit are its conversation's (the log, messages,
 * participants and their flags, the header), and the one kind of row units of different
 * conversations share — a user's stream position, advanced by stream events — is locked in
 * user-id order by one statement, so concurrent writes wait for each other's commit at
 * worst, never deadlock.
 *
 * Semantics, for the callers of {@link groupTransaction}:
 * - a unit of work runs in a transaction opened with `transaction()` (src/store/db.ts), so
 *   `notifyAfterCommit` and `beforeCommit` work as usual; its promise settles only after the
 *   shared transaction committed (nothing is acknowledged before it is durable);
 * - units with the same `key` (a conversation) never share a transaction nor run at once:
 *   a unit sees everything committed by the units of its key before it;
 * - when a unit throws, the shared transaction rolls back, that unit gets its error and the
 *   other units are run again in a new transaction — so a unit may run more than once and
 *   must have no effects outside the database (no HTTP, no mail, no in-memory state kept);
 * - rows written with {@link writeRows} are not visible to later reads of the same
 *   transaction (they are written just before COMMIT): a unit must not read back its own
 *   rows. Units of different keys must not write the same rows.
 */
import { sql } from 'kysely';
import { beforeCommit, type Db, dollarQuoted, pipelinedTransaction, sendWithCommit, type Tx } from './db.ts';

/**
 * A kind of row written set-based. Writers of the write path name a `kind` of
 * `parley_write_rows` (migrations 033_write_rows.sql, 034_write_rows_positional.sql): the
 * rows of all such writers of a transaction go to PostgreSQL together, in ONE call, which
 * writes each kind with its own statement in the order given. Other writers give `write`:
 * their own statement.
 */
export interface RowWriter<R> {
  /** The kind `parley_write_rows` knows these rows by (e.g. 'actions', 'events'); or else `write`. */
  readonly kind?: string;
  /**
   * Turns all the buffered rows of this kind into what `parley_write_rows` takes for it:
   * one positional array per row (migration 034_write_rows_positional.sql gives each
   * kind's layout; arrays cost PostgreSQL far less to parse than objects). Given the whole
   * transaction's rows at once, so it may number them (stream events). Required with `kind`.
   */
  encode?(rows: R[]): unknown[];
  /** For rows `parley_write_rows` does not know: writes `rows` (never empty) in `tx` with a statement of its own. */
  write?(tx: Tx, rows: R[]): Promise<void>;
  /**
   * Written after the rows of every other writer of the transaction, just before COMMIT
   * (stream events: the stream positions they lock, `user_streams` rows, are then held only across the commit).
   */
  readonly last?: boolean;
  /** Receives what `parley_write_rows` returned for this kind once `rows` are written (stream positions), with those rows as given to `encode`. */
  written?(tx: Tx, result: unknown, rows: R[]): Promise<void>;
}

/** Buffered rows per transaction that defers its writes, per writer in first-use order. */
const buffers = new WeakMap<object, Map<RowWriter<unknown>, unknown[]>>();

/**
 * Writes the rows of several writers, in the order given: the consecutive ones that name a
 * `kind` in one statement (`select parley_write_rows($1)`, one round trip), handing each
 * what the function returned for its kind; the others with their own `write`.
 */
async function writeBatch(tx: Tx, items: [RowWriter<unknown>, unknown[]][], withCommit = false): Promise<void> {
  for (let i = 0; i < items.length; ) {
    const [first, firstRows] = items[i];
    if (first.kind === undefined) {
      await first.write!(tx, firstRows);
      i++;
      continue;
    }
    let j = i;
    while (j < items.length && items[j][0].kind !== undefined) j++;
    const run = items.slice(i, j);
    i = j;
    const batch = JSON.stringify(run.map(([w, rows]) => [w.kind, w.encode ? w.encode(rows) : rows]));
    const handOut = async (rows: unknown[]) => {
      const out = (rows[0] as { r?: Record<string, unknown> } | undefined)?.r ?? {};
      for (const [w, rows] of run) if (w.written && out[w.kind!] !== undefined) await w.written(tx, out[w.kind!], rows);
    };
    // The transaction's last statement travels with its COMMIT (db.ts pipelinedTransaction).
    if (withCommit && i === items.length && sendWithCommit(tx, `select parley_write_rows(${dollarQuoted(batch)}::jsonb) as r`, handOut)) return;
    const r = await sql<{ r: Record<string, unknown> }>`select parley_write_rows(${batch}::jsonb) as r`.execute(tx);
    await handOut(r.rows);
  }
}

/**
 * Writes `rows` with `writer`: now, or — in a group transaction — buffered and written with
 * the rows of every other unit just before COMMIT, in one statement, writers in the order
 * they were first used (so a unit that upserts participants before updating their flags
 * keeps that order) except those marked `last`, which come after all others.
 */
export async function writeRows<R>(tx: Tx, writer: RowWriter<R>, rows: R[]): Promise<void> {
  if (rows.length === 0) return;
  const buffer = buffers.get(tx);
  if (!buffer) return writeBatch(tx, [[writer as RowWriter<unknown>, rows]]);
  const list = buffer.get(writer as RowWriter<unknown>);
  if (list) list.push(...rows);
  else buffer.set(writer as RowWriter<unknown>, [...rows]);
}

/** True when `tx` buffers the rows given to {@link writeRows} until just before its COMMIT (a group transaction). */
export function defersWrites(tx: Tx): boolean {
  return buffers.has(tx);
}

/**
 * Makes a plain transaction buffer the rows given to {@link writeRows} as a group
 * transaction does (written just before its COMMIT), so that a caller writing several
 * appends in turn (inbound mail: ingest-email.ts) can send them with {@link flushWrites}
 * in one statement instead of one per writer. The caller must flush before it reads back
 * rows it wrote.
 */
export function bufferWrites(tx: Tx): void {
  if (!buffers.has(tx)) deferWrites(tx);
}

/**
 * Writes the rows buffered in `tx` now, in one statement — except those of `last` writers
 * (stream events), which stay buffered until just before COMMIT unless `last` is true (the
 * caller's final write before COMMIT: they then come after all others in the same statement).
 */
export async function flushWrites(tx: Tx, last = false): Promise<void> {
  const buffer = buffers.get(tx);
  if (!buffer) return;
  const items = [...buffer.entries()].filter(([w]) => !w.last);
  if (last) items.push(...[...buffer.entries()].filter(([w]) => w.last));
  for (const [w] of items) buffer.delete(w);
  if (items.length > 0) await writeBatch(tx, items);
}

/**
 * Makes `tx` buffer the rows given to {@link writeRows} until just before its COMMIT, where
 * they are written — the `last` writers' after all others — in the COMMIT's round trip.
 */
function deferWrites(tx: Tx): void {
  const buffer = new Map<RowWriter<unknown>, unknown[]>();
  buffers.set(tx, buffer);
  beforeCommit(tx, async () => {
    buffers.delete(tx);
    const items = [...buffer];
    const ordered = [...items.filter(([w]) => !w.last), ...items.filter(([w]) => w.last)];
    if (ordered.length > 0) await writeBatch(tx, ordered, true);
  });
}

/**
 * A read that many units of a shared transaction need, done for all of them in one
 * statement before any runs (e.g. locking their conversations: apply-actions.ts). `read`
 * returns one result per argument, in order; a unit-specific failure (404, 403) belongs in
 * the result, for the unit to throw, not thrown by `read`.
 */
export interface BatchRead<A, R> {
  readonly name: string;
  read(tx: Tx, args: A[]): Promise<R[]>;
  /**
   * The same read as one SELECT with its values written in, which the shared transaction
   * sends in the same round trip as its BEGIN (db.ts pipelinedTransaction), and what to make
   * of its rows (as `read` returns). Only the first read of a transaction is sent so.
   */
  statement?(args: A[]): { select: string; results(tx: Tx, rows: unknown[]): R[] };
}

interface Unit {
  key: string;
  fn: (tx: Tx, prefetched: unknown) => Promise<unknown>;
  prefetch?: { read: BatchRead<unknown, unknown>; arg: unknown };
  resolve: (v: unknown) => void;
  reject: (e: unknown) => void;
  /** Run alone (after a failure that could not be attributed to one unit). */
  alone: boolean;
}

/** The unit that threw inside a shared transaction, with its error. */
class UnitFailed extends Error {
  constructor(
    readonly unit: Unit,
    readonly error: unknown,
  ) {
    super('unit failed');
  }
}

/** Tuning of the group committer (defaults measured on the project machine, docs/benchmarks.md). */
export interface GroupCommitOptions {
  /** Units per transaction at most. Default 32. */
  maxUnits?: number;
  /** Shared transactions in progress at once (committing ones included). Default 3. */
  maxTransactions?: number;
  /** Of those, how many may still be running their units (the others are writing and committing). Default 1. */
  maxWorking?: number;
  /**
   * While other shared transactions are committing, fewer units than this wait for more
   * (at most `maxWaitMs`) before a transaction starts with them. Default 3.
   */
  minUnits?: number;
  /** The longest such wait, ms. Default 1. */
  maxWaitMs?: number;
}

class GroupCommitter {
  private queue: Unit[] = [];
  private running = 0;
  /** Shared transactions still running their units (the rest are writing and committing). */
  private working = 0;
  /** A {@link pump} is due on the next turn of the event loop. */
  private pumpDue = false;
  private readonly inFlight = new Set<string>();
  private readonly maxUnits: number;
  private readonly maxTransactions: number;
  private readonly maxWorking: number;
  private readonly minUnits: number;
  private readonly maxWaitMs: number;
  /** Ends the wait of a few queued units for more (see {@link pump}). */
  private waitTimer: NodeJS.Timeout | null = null;
  /** The wait ran out: the queued units start now, however few. */
  private waitedEnough = false;

  constructor(
    private readonly db: Db,
    opts: GroupCommitOptions,
  ) {
    this.maxUnits = opts.maxUnits ?? 32;
    this.maxTransactions = opts.maxTransactions ?? 3;
    this.maxWorking = opts.maxWorking ?? 1;
    this.minUnits = opts.minUnits ?? 3;
    this.maxWaitMs = opts.maxWaitMs ?? 1;
  }

  submit<T>(key: string, fn: (tx: Tx, prefetched: unknown) => Promise<T>, prefetch?: Unit['prefetch']): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      this.queue.push({ key, fn, prefetch, resolve: resolve as (v: unknown) => void, reject, alone: false });
      this.pumpSoon();
    });
  }

  /**
   * Pumps once the event loop has run the callbacks of the I/O that is ready now (setImmediate
   * runs after the poll phase): requests that arrived together — often the clients of the
   * transaction that just committed, asking again — then share the next transaction instead
   * of the first one taking a transaction alone (on the project machine: transactions of 1
   * unit were half of all, with 10 clients; docs/benchmarks.md, session 9).
   */
  private pumpSoon(): void {
    if (this.pumpDue) return;
    this.pumpDue = true;
    setImmediate(() => {
      this.pumpDue = false;
      this.pump();
    });
  }

  /**
   * Starts shared transactions while there are runnable units and room: at most
   * `maxWorking` still running their units, `maxTransactions` in all — so the units that
   * queue while one transaction runs its units go together into the next, which starts as
   * soon as the first is writing and committing.
   *
   * Fewer than `minUnits` queued units wait while other transactions are committing — until
   * one of those commits (whose clients often come back at once), more units arrive, or
   * `maxWaitMs` passed — as PostgreSQL's `commit_delay` waits only when `commit_siblings`
   * other transactions are active: a transaction's round trips, its WAL flush and its
   * statements' set-up cost about as much as the appends of three units, so a transaction
   * of one unit while others commit costs more than it saves (on the project machine, with
   * 10 clients: a third of the transactions had one unit; 3 % fewer PostgreSQL instructions
   * per append and a higher rate in 4 of 5 alternated runs; docs/benchmarks.md, session 9).
   * Alone, a unit never waits.
   */
  private pump(): void {
    while (this.running < this.maxTransactions && this.working < this.maxWorking && this.queue.length > 0) {
      if (this.queue.length < this.minUnits && this.running > 0 && !this.waitedEnough) {
        this.waitTimer ??= setTimeout(() => {
          this.waitTimer = null;
          this.waitedEnough = true;
          this.pump();
          this.waitedEnough = false;
        }, this.maxWaitMs);
        return;
      }
      if (this.waitTimer) {
        clearTimeout(this.waitTimer);
        this.waitTimer = null;
      }
      const batch = this.take();
      if (batch.length === 0) return;
      this.running++;
      this.working++;
      for (const u of batch) this.inFlight.add(u.key);
      let working = true;
      const worked = () => {
        if (!working) return;
        working = false;
        this.working--;
        this.pumpSoon();
      };
      void this.run(batch, worked).finally(() => {
        this.running--;
        for (const u of batch) this.inFlight.delete(u.key);
        worked();
        this.pumpSoon();
      });
    }
  }

  /** Takes queued units, oldest first, at most one per key and none whose key is in flight. */
  private take(): Unit[] {
    const batch: Unit[] = [];
    const keys = new Set<string>();
    const rest: Unit[] = [];
    for (const u of this.queue) {
      const fits =
        batch.length < this.maxUnits && !keys.has(u.key) && !this.inFlight.has(u.key) && (batch.length === 0 || (!u.alone && !batch[0].alone));
      if (fits) {
        batch.push(u);
        keys.add(u.key);
      } else rest.push(u);
    }
    this.queue = rest;
    return batch;
  }

  /** Runs `batch` in one transaction; `worked` is called once its units have run (its write and COMMIT next). */
  private async run(batch: Unit[], worked: () => void): Promise<void> {
    try {
      const reads = new Map<BatchRead<unknown, unknown>, Unit[]>();
      for (const u of batch) if (u.prefetch) reads.set(u.prefetch.read, [...(reads.get(u.prefetch.read) ?? []), u]);
      const [firstRead, firstUnits] = [...reads][0] ?? [];
      const first = firstRead?.statement?.(firstUnits!.map((u) => u.prefetch!.arg)) ?? null;
      const results = await pipelinedTransaction(this.db, first?.select ?? null, async (tx, firstRows) => {
        deferWrites(tx);
        const prefetched = new Map<Unit, unknown>();
        for (const [read, units] of reads) {
          const results = first && read === firstRead ? first.results(tx, firstRows) : await read.read(tx, units.map((u) => u.prefetch!.arg));
          units.forEach((u, i) => prefetched.set(u, results[i]));
        }
        const out: unknown[] = [];
        for (const u of batch) {
          try {
            out.push(await u.fn(tx, prefetched.get(u)));
          } catch (e) {
            throw new UnitFailed(u, e);
          }
        }
        worked();
        return out;
      });
      batch.forEach((u, i) => u.resolve(results[i]));
    } catch (e) {
      if (e instanceof UnitFailed) {
        e.unit.reject(e.error);
        this.queue.unshift(...batch.filter((u) => u !== e.unit));
      } else if (batch.length === 1) {
        batch[0].reject(e);
      } else {
        // The shared writes or the commit failed: run every unit alone to find whose it was.
        this.queue.unshift(...batch.map((u) => ({ ...u, alone: true })));
      }
    }
  }
}

const committers = new WeakMap<Db, GroupCommitter>();

/**
 * Runs `fn` in a transaction shared with other concurrent units of other `key`s (see the
 * module comment for the rules `fn` must follow), and resolves with its result once that
 * transaction committed.
 * @param key what the unit writes to exclusively — a conversation key
 * @throws whatever `fn` throws (the shared transaction is then rolled back and the others rerun), or the commit's error
 */
export function groupTransaction<T>(db: Db, key: string, fn: (tx: Tx) => Promise<T>, opts: GroupCommitOptions = {}): Promise<T> {
  return committerOf(db, opts).submit(key, fn);
}

/**
 * {@link groupTransaction} whose unit first needs `read` for `arg`: the reads of all units
 * of the shared transaction that use the same `read` are made in one call, before any unit
 * runs, and `fn` receives its own result.
 */
export function groupTransactionWith<A, R, T>(
  db: Db,
  key: string,
  read: BatchRead<A, R>,
  arg: A,
  fn: (tx: Tx, prefetched: R) => Promise<T>,
  opts: GroupCommitOptions = {},
): Promise<T> {
  return committerOf(db, opts).submit(key, fn as (tx: Tx, p: unknown) => Promise<T>, { read: read as BatchRead<unknown, unknown>, arg });
}

function committerOf(db: Db, opts: GroupCommitOptions): GroupCommitter {
  let c = committers.get(db);
  if (!c) committers.set(db, (c = new GroupCommitter(db, opts)));
  return c;
}
