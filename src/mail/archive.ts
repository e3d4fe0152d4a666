/**
 * Reading mail archives for import: mbox files, Maildirs, folders of message files and
 * single message files, one raw RFC 5322 message at a time.
 */
import { closeSync, createReadStream, openSync, readSync } from 'node:fs';
import { readdir, readFile, stat } from 'node:fs/promises';
import { extname, join } from 'node:path';
import { badRequest } from '../platform/errors.ts';

/** What {@link openArchive} found at the path. */
export type ArchiveKind = 'mbox' | 'maildir' | 'eml-folder' | 'eml-file';

/** One message of an archive. */
export interface ArchiveMessage {
  /** Where the message came from: a file path, or `<mbox path>#<zero-based index>` for a message inside an mbox file. */
  source: string;
  /** The message bytes (RFC 5322), without the mbox envelope line and with mboxrd `>From ` escaping undone. */
  raw: Buffer;
}

/** An opened archive; {@link Archive.messages} can be iterated more than once. */
export interface Archive {
  kind: ArchiveKind;
  /** Number of messages `messages()` yields, known before reading them (for progress reporting). */
  count: number;
  /** The messages in a stable order (file names sorted, mbox messages in file order), read lazily. */
  messages(): AsyncIterable<ArchiveMessage>;
}

/** Extensions of single-message files, which need only a header section to be taken as a message (a bare MIME entity). */
const MESSAGE_EXTENSIONS = new Set(['.eml', '.msg']);
/** Extensions that name an mbox file even when it holds fewer than two messages. */
const MBOX_EXTENSIONS = new Set(['.mbox', '.mbx', '.mbs']);
/** Project files that sit beside corpora and are never messages. */
const NOT_MESSAGES = new Set(['source.md', 'readme.md', 'license', 'copying']);
/** How much of a file is read to decide whether it is a message. */
const SNIFF_BYTES = 64 * 1024;
/** A header field line (RFC 5322 §2.2), allowing the obsolete whitespace before the colon (§4.5). */
const HEADER_FIELD_LINE = /^[\x21-\x39\x3B-\x7E]+[ \t]*:/;
/** Header fields at least one of which any real message carries (RFC 5322 §3.6, RFC 5321 trace fields). */
const MESSAGE_FIELDS = /^(?:from|to|cc|subject|date|message-id|received|return-path|delivered-to|sender|reply-to|in-reply-to|references|mime-version)[ \t]*:/im;

const isEnvelopeLine = (line: string): boolean => line.startsWith('From ') && !HEADER_FIELD_LINE.test(line);
const isBlankLine = (line: Buffer): boolean => line.length <= 2 && line.toString('latin1').trim() === '';

/**
 * Opens an archive for import and counts its messages.
 *
 * - a directory with `cur/` and `new/` subdirectories is a **Maildir** (its Maildir++
 *   `.Folder` subdirectories included; `tmp/` is skipped, as Maildir readers must);
 * - any other directory is an **eml-folder**, walked recursively in name order: every file
 *   that looks like a message (`*.eml`, `*.txt`, extensionless… files starting with a
 *   header section that has one of From/To/Subject/Date/Message-ID/Received…; `*.eml` and
 *   `*.msg` files need only a header section) or is an mbox, whose messages are each
 *   counted; a nested Maildir contributes its cur/ and new/ files; dot-files,
 *   README.md/SOURCE.md, symbolic links and non-message files are skipped;
 * - a file starting with an mbox `From ` envelope line (RFC 4155) is an **mbox** when it
 *   holds several messages or is named `*.mbox`/`*.mbx`/`*.mbs`, otherwise an **eml-file**;
 *   any other file that looks like a message is an **eml-file**.
 *
 * mbox files are split on `From ` lines at the start of the file or after a blank line
 * and followed by a header field; `>From ` lines are unescaped (mboxrd, which also undoes
 * mboxo escaping); Content-Length headers are ignored. They are streamed, never read whole.
 *
 * @throws AppError 400 `archive_not_found` when the path does not exist (or cannot be read),
 *   `not_an_archive` when it is a file that is neither a message nor an mbox
 */
export async function openArchive(path: string): Promise<Archive> {
  const info = await stat(path).catch((err: NodeJS.ErrnoException) => {
    throw badRequest('archive_not_found', err.code === 'ENOENT' ? `Archive not found: ${path} does not exist` : `Cannot open archive ${path}: ${err.message}`);
  });
  if (info.isDirectory()) {
    if (await isMaildir(path)) return openMaildir(path);
    return openFolder(path);
  }
  const file = await classifyFile(path, { bytes: KEEP_CONTENT_BYTES });
  if (file === null) throw badRequest('not_an_archive', `Not an email archive: ${path} is neither an email message nor an mbox file`);
  return { kind: file.kind, count: file.count, messages: () => fileMessages(file) };
}

/** A message file or an mbox file, as classified by {@link classifyFile}. */
interface ArchiveFile {
  path: string;
  kind: 'mbox' | 'eml-file';
  count: number;
  /** Whether the file starts with an mbox envelope line (its messages are then split out of it). */
  hasEnvelope: boolean;
  /** The whole file when it was small enough to be read whole while classifying it (and the budget allowed keeping it), so it is not read again. */
  content?: Buffer;
}

/** Bytes of small files kept from classifying them to reading their messages, per archive opened. */
const KEEP_CONTENT_BYTES = 64 * 1024 * 1024;

/** A file's kind and message count, or null when it holds no message. */
async function classifyFile(path: string, budget: { bytes: number } = { bytes: 0 }): Promise<ArchiveFile | null> {
  const head = readHead(path);
  const whole = head.length < SNIFF_BYTES;
  // A head shorter than SNIFF_BYTES is the whole file: kept (within the budget), it is not read again.
  const keep = (f: ArchiveFile): ArchiveFile => {
    if (!whole || head.length > budget.bytes) return f;
    budget.bytes -= head.length;
    return { ...f, content: head };
  };
  const newline = head.indexOf('\n');
  const firstLine = head.subarray(0, newline < 0 ? head.length : newline).toString('latin1');
  const isMboxNamed = MBOX_EXTENSIONS.has(extname(path).toLowerCase());
  if (isEnvelopeLine(firstLine)) {
    // A whole file is counted without reading it again.
    const count = await countMboxMessages(whole ? head : path);
    if (count >= 2 || isMboxNamed) return keep({ path, kind: 'mbox', count, hasEnvelope: true });
    return count === 1 ? keep({ path, kind: 'eml-file', count, hasEnvelope: true }) : null;
  }
  if (isMboxNamed && head.toString('latin1').trim() === '') return { path, kind: 'mbox', count: 0, hasEnvelope: false };
  const isMessageNamed = MESSAGE_EXTENSIONS.has(extname(path).toLowerCase());
  return looksLikeMessage(head, isMessageNamed) ? keep({ path, kind: 'eml-file', count: 1, hasEnvelope: false }) : null;
}

function looksLikeMessage(head: Buffer, anyFields: boolean): boolean {
  const text = head.toString('latin1').trimStart();
  const headerEnd = text.search(/\r?\n\r?\n/);
  const header = headerEnd < 0 ? text : text.slice(0, headerEnd);
  return HEADER_FIELD_LINE.test(header) && (anyFields || MESSAGE_FIELDS.test(header));
}

/** {@link readHead}'s read buffer (its bytes are copied out before it returns). */
let scratch: Buffer | null = null;

/**
 * The first {@link SNIFF_BYTES} of a file. Synchronous: files are classified one after the
 * other before anything else runs, and three trips through libuv's thread pool per file
 * (open, read, close) cost more CPU and time than the reads themselves (a folder of 2,403
 * messages took ≈ 1 s to open).
 */
function readHead(path: string): Buffer {
  scratch ??= Buffer.allocUnsafe(SNIFF_BYTES);
  const fd = openSync(path, 'r');
  try {
    // Only the bytes read are ever looked at.
    const bytesRead = readSync(fd, scratch, 0, SNIFF_BYTES, 0);
    // A copy of the bytes read, no larger: most message files are a few kB, and a 64 kB
    // buffer per file made work for the garbage collector.
    return Buffer.from(scratch.subarray(0, bytesRead));
  } finally {
    closeSync(fd);
  }
}

async function* fileMessages(file: ArchiveFile): AsyncGenerator<ArchiveMessage> {
  if (!file.hasEnvelope) {
    if (file.count > 0) yield { source: file.path, raw: file.content ?? (await readFile(file.path)) };
    return;
  }
  let index = 0;
  for await (const raw of splitMbox(file.content ?? file.path, true)) {
    yield { source: file.kind === 'mbox' ? `${file.path}#${index}` : file.path, raw };
    index++;
  }
}

/** Messages of an mbox file, or of its whole content when already read. */
async function countMboxMessages(source: string | Buffer): Promise<number> {
  let count = 0;
  for await (const _ of splitMbox(source, false)) count++;
  return count;
}

/** Files up to this size are read at once instead of streamed (a message file; most of a folder import). */
const READ_WHOLE_BYTES = 1024 * 1024;

/**
 * The lines of a file (or of its content), each with its line terminator, in batches: one
 * batch per chunk read (small files at once: a stream costs more than the read), so the
 * caller pays for one await per chunk rather than per line.
 */
async function* readLines(source: string | Buffer): AsyncGenerator<Buffer[]> {
  let pending: Buffer[] = [];
  const chunks: AsyncIterable<Buffer> | Buffer[] =
    typeof source !== 'string'
      ? [source]
      : (await stat(source)).size <= READ_WHOLE_BYTES
        ? [await readFile(source)]
        : (createReadStream(source, { highWaterMark: 256 * 1024 }) as AsyncIterable<Buffer>);
  for await (const chunk of chunks) {
    const lines: Buffer[] = [];
    let start = 0;
    let newline: number;
    while ((newline = chunk.indexOf(0x0a, start)) >= 0) {
      const tail = chunk.subarray(start, newline + 1);
      lines.push(pending.length > 0 ? Buffer.concat([...pending, tail]) : tail);
      pending = [];
      start = newline + 1;
    }
    if (start < chunk.length) pending.push(chunk.subarray(start));
    if (lines.length > 0) yield lines;
  }
  if (pending.length > 0) yield [Buffer.concat(pending)];
}

/**
 * The messages of an mbox file (RFC 4155). A `From ` line is a separator when it starts
 * the file or follows a blank line, and the next line is a header field. The blank line
 * before a separator belongs to the mbox format and is dropped. With `collect` false the
 * messages are only counted: empty buffers are yielded.
 */
async function* splitMbox(source: string | Buffer, collect: boolean): AsyncGenerator<Buffer> {
  if (typeof source !== 'string') return yield* splitMboxBuffer(source, collect);
  if ((await stat(source)).size <= READ_WHOLE_BYTES) return yield* splitMboxBuffer(await readFile(source), collect);
  yield* splitMboxLines(source, collect);
}

/** Whether the line buf[start, end) is a header field line ({@link HEADER_FIELD_LINE}, on bytes). */
function isHeaderFieldAt(buf: Buffer, start: number, end: number): boolean {
  let i = start;
  while (i < end && ((buf[i] >= 0x21 && buf[i] <= 0x39) || (buf[i] >= 0x3b && buf[i] <= 0x7e))) i++;
  if (i === start) return false;
  while (i < end && (buf[i] === 0x20 || buf[i] === 0x09)) i++;
  return i < end && buf[i] === 0x3a;
}

/** Whether buf[start, end) is an mbox envelope line ({@link isEnvelopeLine}, on bytes). */
function isEnvelopeAt(buf: Buffer, start: number, end: number): boolean {
  return end - start >= 5 && buf[start] === 0x46 && buf[start + 1] === 0x72 && buf[start + 2] === 0x6f && buf[start + 3] === 0x6d && buf[start + 4] === 0x20 && !isHeaderFieldAt(buf, start, end);
}

/** Bytes that String.prototype.trim() removes from a latin1 string. */
const TRIMMED = new Set([0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x20, 0xa0]);

/** {@link isBlankLine} for buf[start, end). */
function isBlankAt(buf: Buffer, start: number, end: number): boolean {
  if (end - start > 2) return false;
  for (let i = start; i < end; i++) if (!TRIMMED.has(buf[i])) return false;
  return true;
}

/**
 * {@link splitMboxLines} over bytes in memory, with the same rules and results, without a
 * Buffer per line: lines are index ranges, and a message is one copy of its ranges.
 */
function* splitMboxBuffer(buf: Buffer, collect: boolean): Generator<Buffer> {
  /** The kept lines of the current message as [start, end) pairs (after unescaping); null before the first envelope. */
  let message: number[] | null = null;
  let candidateStart = -1;
  let candidateEnd = -1;
  let previousBlank = true;
  const append = (start: number, end: number) => {
    if (message === null || !collect) return;
    // unescapeFromLine: `>…>From ` loses one `>`.
    if (buf[start] === 0x3e) {
      let q = start;
      while (q < end && buf[q] === 0x3e) q++;
      if (end - q >= 5 && buf[q] === 0x46 && buf[q + 1] === 0x72 && buf[q + 2] === 0x6f && buf[q + 3] === 0x6d && buf[q + 4] === 0x20) start++;
    }
    message.push(start, end);
  };
  const finish = (): Buffer => {
    const lines = message ?? [];
    if (lines.length > 0 && isBlankAt(buf, lines[lines.length - 2], lines[lines.length - 1])) lines.length -= 2;
    if (!collect) return Buffer.alloc(0);
    const parts: Buffer[] = [];
    let size = 0;
    for (let k = 0; k < lines.length; ) {
      const start = lines[k];
      let end = lines[k + 1];
      k += 2;
      // Contiguous lines are one part.
      while (k < lines.length && lines[k] === end) {
        end = lines[k + 1];
        k += 2;
      }
      parts.push(buf.subarray(start, end));
      size += end - start;
    }
    return Buffer.concat(parts, size);
  };
  let at = 0;
  while (at < buf.length) {
    const newline = buf.indexOf(0x0a, at);
    const start = at;
    const end = newline < 0 ? buf.length : newline + 1;
    at = end;
    if (candidateStart >= 0) {
      const [s0, e0] = [candidateStart, candidateEnd];
      candidateStart = -1;
      if (isHeaderFieldAt(buf, start, end)) {
        if (message !== null) yield finish();
        message = [];
      } else {
        append(s0, e0);
      }
    } else if (previousBlank && isEnvelopeAt(buf, start, end)) {
      candidateStart = start;
      candidateEnd = end;
      previousBlank = false;
      continue;
    }
    append(start, end);
    previousBlank = isBlankAt(buf, start, end);
  }
  if (candidateStart >= 0) append(candidateStart, candidateEnd);
  if (message !== null) yield finish();
}

/** {@link splitMbox} streaming a large file line by line. */
async function* splitMboxLines(source: string | Buffer, collect: boolean): AsyncGenerator<Buffer> {
  let message: Buffer[] | null = null;
  let candidate: Buffer | null = null;
  let previousBlank = true;
  const finish = (): Buffer => {
    const lines = message ?? [];
    if (lines.length > 0 && isBlankLine(lines[lines.length - 1])) lines.pop();
    return collect ? Buffer.concat(lines) : Buffer.alloc(0);
  };
  const append = (line: Buffer) => {
    if (message !== null && collect) message.push(unescapeFromLine(line));
  };
  for await (const batch of readLines(source)) for (const line of batch) {
    if (candidate !== null) {
      const separator = candidate;
      candidate = null;
      if (HEADER_FIELD_LINE.test(line.toString('latin1'))) {
        if (message !== null) yield finish();
        message = [];
      } else {
        append(separator);
      }
    } else if (previousBlank && line[0] === 0x46 && isEnvelopeLine(line.toString('latin1'))) {
      candidate = line;
      previousBlank = false;
      continue;
    }
    append(line);
    previousBlank = isBlankLine(line);
  }
  if (candidate !== null) append(candidate);
  if (message !== null) yield finish();
}

/** mboxrd unescaping: `>From `, `>>From `… lose one `>`. */
function unescapeFromLine(line: Buffer): Buffer {
  let quotes = 0;
  while (line[quotes] === 0x3e) quotes++;
  return quotes > 0 && line.subarray(quotes, quotes + 5).toString('latin1') === 'From ' ? line.subarray(1) : line;
}

async function isMaildir(path: string): Promise<boolean> {
  const [cur, fresh] = await Promise.all([stat(join(path, 'cur')).catch(() => null), stat(join(path, 'new')).catch(() => null)]);
  return cur?.isDirectory() === true && fresh?.isDirectory() === true;
}

/** The message files of a Maildir: cur/ then new/ (each sorted), then those of its Maildir++ subfolders. */
async function maildirFiles(path: string): Promise<string[]> {
  const files: string[] = [];
  for (const sub of ['cur', 'new']) {
    const entries = await readdir(join(path, sub), { withFileTypes: true });
    files.push(...entries.filter((e) => e.isFile() && !e.name.startsWith('.')).map((e) => join(path, sub, e.name)).sort());
  }
  const folders = (await readdir(path, { withFileTypes: true })).filter((e) => e.isDirectory() && e.name.startsWith('.'));
  for (const folder of folders.map((e) => e.name).sort()) {
    const folderPath = join(path, folder);
    if (await isMaildir(folderPath)) files.push(...(await maildirFiles(folderPath)));
  }
  return files;
}

async function openMaildir(path: string): Promise<Archive> {
  const files = await maildirFiles(path);
  return {
    kind: 'maildir',
    count: files.length,
    async *messages() {
      for (const file of files) yield { source: file, raw: await readFile(file) };
    },
  };
}

/**
 * Candidate message files under `dir`, recursively, in sorted order: every file except
 * dot-files and project notes; a nested Maildir contributes its new/ and cur/ files only.
 */
async function folderFiles(dir: string): Promise<string[]> {
  const entries = (await readdir(dir, { withFileTypes: true })).filter((e) => !e.name.startsWith('.')).sort((a, b) => (a.name < b.name ? -1 : 1));
  const files: string[] = [];
  for (const entry of entries) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) files.push(...(await ((await isMaildir(path)) ? maildirFiles(path) : folderFiles(path))));
    else if (entry.isFile() && !NOT_MESSAGES.has(entry.name.toLowerCase())) files.push(path);
  }
  return files;
}

async function openFolder(path: string): Promise<Archive> {
  const files: ArchiveFile[] = [];
  const budget = { bytes: KEEP_CONTENT_BYTES };
  for (const candidate of await folderFiles(path)) {
    const file = await classifyFile(candidate, budget);
    if (file !== null && file.count > 0) files.push(file);
  }
  return {
    kind: 'eml-folder',
    count: files.reduce((sum, f) => sum + f.count, 0),
    async *messages() {
      for (const file of files) yield* fileMessages(file);
    },
  };
}
