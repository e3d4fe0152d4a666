/**
 * Group commit for the write path (issue 2, Done means 7: append throughput on two cores).
 *
 * Every SQL round trip costs this platform far more CPU than the work it carries (syscalls
 * and wake-ups on both sides: docs/benchmarks.md, "Where the time goes"), and every commit
 * waits for one WAL flush. So concurrent writers that touch different conversations share
 * one transaction: each runs its own logic (its reads, the core rules) in turn inside it, the
 * rows they write are buffered ({@link writeRows}) and written as one set-based statement per
 * table just before the single COMMIT. Ten concurrent appends then cost one BEGIN, one
 * COMMIT, one flush and a handful of statements between them, instead of ten of each.
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
import { beforeCommit, type Db, transaction, type Tx } from './db.ts';

/** A set-based statement writing many rows of one kind at once (e.g. one `insert … select from jsonb_to_recordset`). */
export interface RowWriter<R> {
  /** For diagnostics: the table and operation. */
  readonly name: string;
  /** Writes `rows` (never empty) in `tx`. */
  write(tx: Tx, rows: R[]): Promise<void>;
}

/** Buffered rows per transaction that defers its writes, per writer in first-use order. */
const buffers = new WeakMap<object, Map<RowWriter<unknown>, unknown[]>>();

/**
 * Writes `rows` with `writer`: now, or — in a group transaction — buffered and written with
 * the rows of every other unit just before COMMIT, writers in the order they were first used
 * (so a unit that upserts participants before updating their flags keeps that order).
 */
export async function writeRows<R>(tx: Tx, writer: RowWriter<R>, rows: R[]): Promise<void> {
  if (rows.length === 0) return;
  const buffer = buffers.get(tx);
  if (!buffer) return writer.write(tx, rows);
  const list = buffer.get(writer as RowWriter<unknown>);
  if (list) list.push(...rows);
  else buffer.set(writer as RowWriter<unknown>, [...rows]);
}

/** Makes `tx` buffer the rows given to {@link writeRows} until just before its COMMIT. */
function deferWrites(tx: Tx): void {
  const buffer = new Map<RowWriter<unknown>, unknown[]>();
  buffers.set(tx, buffer);
  beforeCommit(tx, async () => {
    buffers.delete(tx);
    for (const [writer, rows] of buffer) await writer.write(tx, rows);
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
  /** Shared transactions in progress at once (one can commit while the next runs). Default 2. */
  maxTransactions?: number;
}

class GroupCommitter {
  private queue: Unit[] = [];
  private running = 0;
  private readonly inFlight = new Set<string>();
  private readonly maxUnits: number;
  private readonly maxTransactions: number;

  constructor(
    private readonly db: Db,
    opts: GroupCommitOptions,
  ) {
    this.maxUnits = opts.maxUnits ?? 32;
    this.maxTransactions = opts.maxTransactions ?? 2;
  }

  submit<T>(key: string, fn: (tx: Tx, prefetched: unknown) => Promise<T>, prefetch?: Unit['prefetch']): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      this.queue.push({ key, fn, prefetch, resolve: resolve as (v: unknown) => void, reject, alone: false });
      this.pump();
    });
  }

  /** Starts shared transactions while there are runnable units and room. */
  private pump(): void {
    while (this.running < this.maxTransactions && this.queue.length > 0) {
      const batch = this.take();
      if (batch.length === 0) return;
      this.running++;
      for (const u of batch) this.inFlight.add(u.key);
      void this.run(batch).finally(() => {
        this.running--;
        for (const u of batch) this.inFlight.delete(u.key);
        this.pump();
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

  private async run(batch: Unit[]): Promise<void> {
    try {
      const results = await transaction(this.db, async (tx) => {
        deferWrites(tx);
        const prefetched = new Map<Unit, unknown>();
        const reads = new Map<BatchRead<unknown, unknown>, Unit[]>();
        for (const u of batch) if (u.prefetch) reads.set(u.prefetch.read, [...(reads.get(u.prefetch.read) ?? []), u]);
        for (const [read, units] of reads) {
          const results = await read.read(tx, units.map((u) => u.prefetch!.arg));
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
