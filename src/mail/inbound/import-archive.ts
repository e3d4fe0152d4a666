/**
 * `importArchive` — `parley import <path> --owner <address>` (issue 2 §6): every message of
 * an mbox file, a Maildir, a folder of message files or a single message file is ingested
 * as if it had been received for the owner, through the same `ingestEmail` as SMTP mail
 * (mode `import`: not authenticated — DNS answers of today say nothing about old mail —,
 * and nobody is emailed). Actions are stamped with the time of the import, as signed
 * history must be (ingest-email.ts, "Time"); each message's `Date` is kept in its
 * `source.date` and orders the conversations in the owner's list.
 *
 * **Order.** A reply can come before its parent in the archive (directory order, a
 * shuffled mbox), and threading needs the parent ingested first. So the import runs in
 * two passes: the first reads the header section of every message (Message-ID,
 * In-Reply-To, References, Date) and keeps the bytes when the archive fits in
 * {@link RETAIN_BYTES}; the second ingests each message once every message of the archive
 * that it names in In-Reply-To or References is done (a message repeating an earlier
 * Message-ID waits for it, and becomes a duplicate). Ties and independent messages go in
 * archive order; a reference cycle (malformed archives) is broken at its earliest-dated
 * message. This is exact where sorting by Date is not: clocks of senders disagree.
 *
 * **Batches.** Messages whose parents are done are committed up to `batchSize` per
 * transaction (ingest-email.ts `commitEmails`: one statement for their raw rows, one for
 * the owner's stream events, one COMMIT; a message that fails its batch goes alone and
 * the others are tried again, so one bad message never fails the others), `concurrency`
 * batches at once. A batch's messages are independent of each other (every parent was
 * committed before the batch was formed), so threading is the same as one message at a
 * time; batches touching the same conversation wait for each other's row lock.
 * Messages are prepared (raw bytes stored and fsynced, parsed, attachments stored) ahead
 * of their batch, in archive order, up to {@link PREPARE_AHEAD} beyond the last one taken:
 * preparing needs no database, so a batch's commit no longer waits for its messages'
 * files and parsing — a lane goes from one commit to the next.
 *
 * Importing twice adds nothing: every message is then a duplicate (same Message-ID in a
 * conversation the owner is in, or the same bytes for a message without Message-ID).
 */
import { type Deps, isLocalAddress } from '../../context.ts';
import { ensureSigningKey } from '../../federation/keys.ts';
import { badRequest } from '../../platform/errors.ts';
import { normalizeAddress } from '../address.ts';
import { type Archive, type ArchiveKind, openArchive } from '../archive.ts';
import { commitEmails, type IngestResult, type PreparedEmail, prepareEmail } from './ingest-email.ts';

/** Largest total size of an archive kept in memory between the two passes, in bytes; beyond it the archive is read twice. */
export const RETAIN_BYTES = 256 * 1024 * 1024;

/** Default most messages committed in one transaction. */
export const BATCH_SIZE = 25;
/** Default number of batches committed at once. */
export const CONCURRENCY = 4;

/** Counts so far, reported after each message. */
export interface ImportProgress {
  /** Messages in the archive. */
  total: number;
  /** Messages ingested so far (whatever the outcome). */
  processed: number;
  /** Messages that started a new conversation. */
  imported: number;
  /** Messages added to an existing conversation. */
  threaded: number;
  /** Messages already there (nothing added). */
  duplicates: number;
  /** Messages that could not be imported (kept raw in inbound_emails with the reason). */
  failed: number;
}

/** A message that could not be imported. */
export interface ImportFailure {
  /** Where it came from: a file path, or `<mbox path>#<index>`. */
  source: string;
  reason: string;
}

/** The outcome of {@link importArchive}. */
export interface ImportSummary extends ImportProgress {
  kind: ArchiveKind;
  owner: string;
  /** Every failure, in archive order. */
  failures: ImportFailure[];
  /** Every message skipped as a duplicate, with the reason, in archive order. */
  duplicatesSkipped: ImportFailure[];
  /** Wall-clock duration in seconds. */
  seconds: number;
}

/** Options of {@link importArchive}. */
export interface ImportOptions {
  /** Batches committed at once (default {@link CONCURRENCY}). */
  concurrency?: number;
  /** Most messages committed per transaction (default {@link BATCH_SIZE}; 1: one transaction per message). */
  batchSize?: number;
  /** Called after each message. */
  onProgress?(p: ImportProgress): void;
  /** Called once the archive is opened and counted. */
  onStart?(total: number, kind: ArchiveKind): void;
  /** Largest archive kept in memory between the passes, in bytes (default {@link RETAIN_BYTES}). */
  retainBytes?: number;
}

/** What the first pass keeps of a message. */
interface Entry {
  index: number;
  source: string;
  messageId: string | null;
  /** Message-IDs it names (In-Reply-To, References). */
  parents: string[];
  /** Date header in ms, or +Infinity. */
  date: number;
  raw: Buffer | null;
}

/**
 * Imports an archive for `owner` (see the module comment).
 * @throws AppError 400 when the owner is not an existing local user; Error when the path
 *   is not an archive (from openArchive)
 */
export async function importArchive(deps: Deps, path: string, ownerInput: string, opts: ImportOptions = {}): Promise<ImportSummary> {
  const started = Date.now();
  let owner: string;
  try {
    owner = normalizeAddress(ownerInput);
  } catch (e) {
    throw badRequest('invalid_address', (e as Error).message);
  }
  if (!isLocalAddress(deps, owner)) throw badRequest('foreign_domain', `${owner} is not in this platform's domains (${deps.config.domains.join(', ')})`);
  const user = await deps.db.kysely.selectFrom('users').select('id').where('address', '=', owner).executeTakeFirst();
  if (!user) throw badRequest('unknown_owner', `no user ${owner} on this platform: create it first with \`parley user add ${owner}\``);
  // The signing key, created or renewed now if needed, before the batches hold the pool's
  // connections: doing it inside a batch takes one more connection.
  await ensureSigningKey(deps);

  const archive = await openArchive(path);
  opts.onStart?.(archive.count, archive.kind);
  const entries = await scan(archive, opts.retainBytes ?? RETAIN_BYTES);
  const order = schedule(entries);

  const progress: ImportProgress = { total: entries.length, processed: 0, imported: 0, threaded: 0, duplicates: 0, failed: 0 };
  const failures: (ImportFailure & { index: number })[] = [];
  const duplicates: (ImportFailure & { index: number })[] = [];
  const retained = entries.every((e) => e.raw !== null);
  const rawOf = retained ? null : await rereader(archive, entries.length);

  const count = (e: Entry, r: IngestResult) => {
    progress.processed++;
    if (r.status === 'failed') {
      progress.failed++;
      failures.push({ index: e.index, source: e.source, reason: r.reason ?? 'unknown' });
    } else if (r.status === 'duplicate') {
      progress.duplicates++;
      duplicates.push({ index: e.index, source: e.source, reason: r.reason ?? 'already imported' });
    } else if (r.created.length > 0) progress.imported++;
    else progress.threaded++;
    opts.onProgress?.({ ...progress });
  };
  // Messages are prepared (raw bytes stored, parsed) ahead of the commits: preparing
  // needs no database, so it need not wait for a message's parents — only its commit does.
  const ahead = preparer(entries, PREPARE_AHEAD, PREPARE_AT_ONCE, async (e) => {
    const raw = e.raw ?? (await rawOf!(e.index));
    e.raw = null;
    return prepareEmail(deps, raw, { mailFrom: '', rcptTo: [owner], remoteIp: '', helo: '' }, { mode: 'import' });
  });
  await order.run(Math.max(1, opts.batchSize ?? BATCH_SIZE), Math.max(1, opts.concurrency ?? CONCURRENCY), async (batch) => {
    const prepared = await Promise.all(batch.map((e) => ahead.take(e.index)));
    const results = await commitEmails(deps, prepared);
    // A raw message that could not be recorded (disk or database gone) stops the import.
    for (const r of results) if (r.status === 'rejected') throw r.reason;
    batch.forEach((e, k) => count(e, (results[k] as PromiseFulfilledResult<IngestResult>).value));
  });
  const inOrder = (list: (ImportFailure & { index: number })[]) => list.sort((a, b) => a.index - b.index).map(({ source, reason }) => ({ source, reason }));
  return {
    ...progress,
    kind: archive.kind,
    owner,
    failures: inOrder(failures),
    duplicatesSkipped: inOrder(duplicates),
    seconds: (Date.now() - started) / 1000,
  };
}

/** Pass 1: the header fields that order the import, and the bytes while they fit in memory. */
async function scan(archive: Archive, retainBytes: number): Promise<Entry[]> {
  const entries: Entry[] = [];
  let kept = 0;
  let retain = true;
  for await (const m of archive.messages()) {
    const h = scanHeaders(m.raw);
    kept += m.raw.length;
    if (retain && kept > retainBytes) {
      retain = false;
      for (const e of entries) e.raw = null;
    }
    entries.push({ index: entries.length, source: m.source, ...h, raw: retain ? m.raw : null });
  }
  return entries;
}

/** Pass 2 for archives too large to keep: reads the archive again and hands out messages by index. */
async function rereader(archive: Archive, count: number): Promise<(index: number) => Promise<Buffer>> {
  const iterator = archive.messages()[Symbol.asyncIterator]();
  const waiting = new Map<number, Buffer>();
  let next = 0;
  let reading: Promise<void> = Promise.resolve();
  return async (index: number) => {
    // Reads are chained: one reader advances the archive, parking messages asked for later.
    const mine = reading.then(async () => {
      while (!waiting.has(index) && next < count) {
        const r = await iterator.next();
        if (r.done) break;
        waiting.set(next++, r.value.raw);
      }
    });
    reading = mine.catch(() => {});
    await mine;
    const raw = waiting.get(index);
    if (raw === undefined) throw new Error(`the archive changed while importing: message ${index} is gone`);
    waiting.delete(index);
    return raw;
  };
}

/**
 * The Message-ID, the ids named by In-Reply-To and References, and the Date of a raw
 * message, read from its header section alone (a simple reading: ordering only; the
 * ingest parses the message properly).
 */
export function scanHeaders(raw: Buffer): { messageId: string | null; parents: string[]; date: number } {
  const end = headerEnd(raw);
  const text = raw.subarray(0, end).toString('latin1').replace(/\r?\n[ \t]+/g, ' ');
  const fields = new Map<string, string>();
  for (const line of text.split(/\r?\n/)) {
    const m = /^([!-9;-~]+)[ \t]*:(.*)$/.exec(line);
    if (!m) continue;
    const name = m[1].toLowerCase();
    if (!fields.has(name)) fields.set(name, m[2].trim());
  }
  const ids = (v: string | undefined): string[] => {
    if (!v) return [];
    const bracketed = [...v.matchAll(/<([^<>]+)>/g)].map((x) => x[1].replace(/\s+/g, '')).filter(Boolean);
    return bracketed.length > 0 ? bracketed : v.split(/[\s,]+/).filter((x) => x.includes('@'));
  };
  const dateValue = fields.get('date');
  const date = dateValue ? Date.parse(dateValue.replace(/\([^()]*\)/g, ' ').trim()) : NaN;
  return {
    messageId: ids(fields.get('message-id'))[0] ?? null,
    parents: [...new Set([...ids(fields.get('in-reply-to')), ...ids(fields.get('references'))])],
    date: Number.isNaN(date) ? Infinity : date,
  };
}

/** Offset of the blank line ending the header section (or the whole buffer). */
function headerEnd(raw: Buffer): number {
  const lf = raw.indexOf('\n\n');
  const crlf = raw.indexOf('\n\r\n');
  const ends = [lf, crlf].filter((x) => x >= 0);
  return ends.length ? Math.min(...ends) : raw.length;
}

/** A dependency order over the archive: parents (by Message-ID) before the messages naming them. */
interface Schedule {
  /** Runs `work` on batches of at most `batchSize` ready messages (archive order), at most `lanes` batches at once. */
  run(batchSize: number, lanes: number, work: (batch: Entry[]) => Promise<void>): Promise<void>;
}

function schedule(entries: Entry[]): Schedule {
  const firstWithId = new Map<string, number>();
  for (const e of entries) if (e.messageId !== null && !firstWithId.has(e.messageId)) firstWithId.set(e.messageId, e.index);
  const waitsFor: number[] = entries.map(() => 0);
  const dependents: number[][] = entries.map(() => []);
  for (const e of entries) {
    const deps = new Set<number>();
    for (const p of e.parents) {
      const j = firstWithId.get(p);
      if (j !== undefined && j !== e.index) deps.add(j);
    }
    // A repeated Message-ID waits for its first occurrence (it is then a duplicate).
    const first = e.messageId !== null ? firstWithId.get(e.messageId) : undefined;
    if (first !== undefined && first !== e.index) deps.add(first);
    waitsFor[e.index] = deps.size;
    for (const j of deps) dependents[j].push(e.index);
  }
  return {
    async run(batchSize, lanes, work) {
      // Ready messages in archive order: a min-heap would do, a sorted insert is enough here.
      const ready: number[] = entries.filter((e) => waitsFor[e.index] === 0).map((e) => e.index);
      const started = new Set<number>();
      let active = 0;
      let finished = 0;
      let failure: unknown = null;
      await new Promise<void>((resolve, reject) => {
        const release = (i: number) => {
          for (const d of dependents[i]) {
            if (--waitsFor[d] === 0 && !started.has(d)) insertSorted(ready, d);
          }
        };
        const pump = () => {
          if (failure !== null) return;
          if (finished === entries.length) return resolve();
          if (ready.length === 0 && active === 0) {
            // Every message left waits on another: a reference cycle. Break it at the earliest date.
            const left = entries.filter((e) => !started.has(e.index)).sort((a, b) => a.date - b.date || a.index - b.index);
            insertSorted(ready, left[0].index);
          }
          while (active < lanes && ready.length > 0) {
            const batch: number[] = [];
            while (batch.length < batchSize && ready.length > 0) {
              const i = ready.shift()!;
              if (started.has(i)) continue;
              started.add(i);
              batch.push(i);
            }
            if (batch.length === 0) break;
            active++;
            work(batch.map((i) => entries[i])).then(
              () => {
                active--;
                finished += batch.length;
                for (const i of batch) release(i);
                pump();
              },
              (e) => {
                failure = e;
                reject(e);
              },
            );
          }
        };
        pump();
      });
    },
  };
}

/** Messages being prepared (parsed, their files written) at once. */
export const PREPARE_AT_ONCE = 8;
/** Most messages prepared ahead of the commits (their parsed form waits in memory). */
export const PREPARE_AHEAD = 100;

/**
 * Prepares entries in archive order, at most `atOnce` at a time and at most `ahead`
 * beyond those taken so far; `take(i)` hands out entry i's preparation (started on demand
 * when the read-ahead has not reached it), once. A failed preparation is reported by
 * `take` only (never as an unhandled rejection).
 */
function preparer(entries: Entry[], ahead: number, atOnce: number, prepareOne: (e: Entry) => Promise<PreparedEmail>): { take(index: number): Promise<PreparedEmail> } {
  const started = new Map<number, Promise<PreparedEmail>>();
  const taken = new Set<number>();
  let cursor = 0;
  let running = 0;
  const start = (i: number): Promise<PreparedEmail> => {
    const p = prepareOne(entries[i]);
    started.set(i, p);
    running++;
    p.catch(() => {}).finally(() => {
      running--;
      pump();
    });
    return p;
  };
  const pump = () => {
    while (running < atOnce && cursor < entries.length && cursor < taken.size + ahead) {
      if (!started.has(cursor) && !taken.has(cursor)) start(cursor);
      cursor++;
    }
  };
  return {
    take(i) {
      const p = started.get(i) ?? start(i);
      started.delete(i);
      taken.add(i);
      pump();
      return p;
    },
  };
}

function insertSorted(xs: number[], x: number): void {
  let lo = 0;
  let hi = xs.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (xs[mid] < x) lo = mid + 1;
    else hi = mid;
  }
  xs.splice(lo, 0, x);
}
