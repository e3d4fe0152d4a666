import { createHash, randomBytes } from 'node:crypto';
import { closeSync, createReadStream, existsSync, fsync, mkdirSync, open as openFile, openSync, type ReadStream, unlinkSync, write, writeSync } from 'node:fs';
import { mkdir, open, rename, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import type { Readable } from 'node:stream';
import { promisify } from 'node:util';
import { tooLarge } from './errors.ts';

const fsyncFd = promisify(fsync);
const openFd = promisify(openFile);
const writeFd = promisify(write);

/** Larger blobs are written through the thread pool, so a big message or attachment never holds up the event loop while it is copied. */
const SYNC_WRITE_MAX = 1024 * 1024;

/**
 * The content-addressed blob store: bytes on disk under `<dir>/ab/<sha256>` (one level of
 * 256 fan-out directories named by the first two hex digits), named by their SHA-256 (hex).
 * Writes go to a temporary file, are fsynced and renamed into place, so a blob is either
 * complete or absent; writing the same bytes twice is harmless. The directory that
 * receives the name is fsynced too (and the store's directory, the first time this process
 * uses a fan-out directory), so once `put` resolves the blob survives a crash on any
 * filesystem — an SMTP 250 is answered only after its raw message is durable (issue 2 §6).
 *
 * Stores written before 2026-11-22 (session 6) used two levels, `<dir>/ab/cd/<sha256>`:
 * nearly every new blob then made a directory of its own (one more inode to allocate
 * and two more directories to fsync). Such blobs are still found: every read looks
 * at `ab/<sha256>` first and then at `ab/cd/<sha256>`; new blobs always go to the flat
 * layout, so an old store ends up mixed, which is fine (docs/operations.md, "Backups").
 */
export class BlobStore {
  /** Fan-out directories this process has made sure of (created, and named durably in `dir`): first two hex digits → done. */
  private readonly fanOut = new Map<string, Promise<void>>();

  constructor(readonly dir: string) {
    mkdirSync(join(dir, 'tmp'), { recursive: true });
  }

  /** Where a blob is written: `<dir>/ab/<sha256>` (whether or not it exists). @throws Error for a malformed sha256 */
  path(sha256: string): string {
    if (!/^[0-9a-f]{64}$/.test(sha256)) throw new Error(`invalid sha256 ${sha256}`);
    return join(this.dir, sha256.slice(0, 2), sha256);
  }

  /** The path of a stored blob (flat layout first, then the two-level layout of older stores), or null when absent. @throws Error for a malformed sha256 */
  private locate(sha256: string): string | null {
    const flat = this.path(sha256);
    if (existsSync(flat)) return flat;
    const legacy = join(this.dir, sha256.slice(0, 2), sha256.slice(2, 4), sha256);
    return existsSync(legacy) ? legacy : null;
  }

  /** Whether the blob is stored. @throws Error for a malformed sha256 */
  has(sha256: string): boolean {
    return this.locate(sha256) !== null;
  }

  /**
   * Stores bytes durably (see the class comment). Returns their SHA-256 (hex) and size in
   * bytes. @throws Error (from the filesystem) when they could not be stored: nothing may
   * then be acknowledged
   */
  async put(data: Uint8Array): Promise<{ sha256: string; size: number }> {
    const sha256 = createHash('sha256').update(data).digest('hex');
    if (!this.has(sha256)) {
      // What changes the filesystem's metadata — creating the file here, renaming it into
      // place — goes through libuv's thread pool, as the fsyncs do: on a journalling
      // filesystem such a call waits for the journal's commit in progress, which every
      // fsync forces. Synchronous, it stopped this process's event loop for ≈ 1 ms per file
      // at times on the project machine (ext4: a fifth of `parley import`'s wall time;
      // docs/benchmarks.md, session 10). The write of a small blob into the page cache
      // stays synchronous: it costs less than a trip through the pool.
      const tmp = this.tmpPath();
      const fd = await openFd(tmp, 'wx');
      try {
        if (data.byteLength <= SYNC_WRITE_MAX) for (let at = 0; at < data.byteLength; ) at += writeSync(fd, data, at, data.byteLength - at);
        else for (let at = 0; at < data.byteLength; ) at += (await writeFd(fd, data, at, data.byteLength - at)).bytesWritten;
        await fsyncFd(fd);
      } catch (e) {
        closeSync(fd);
        try {
          unlinkSync(tmp);
        } catch {
          // already gone: nothing to clean up
        }
        throw e;
      }
      closeSync(fd);
      await this.moveIntoPlace(tmp, sha256);
    }
    return { sha256, size: data.byteLength };
  }

  /**
   * Stores a stream durably, refusing more than `maxBytes`. Returns its SHA-256 (hex) and size.
   * @throws AppError 413 when the stream exceeds maxBytes (nothing is kept)
   */
  async putStream(stream: Readable, maxBytes: number): Promise<{ sha256: string; size: number }> {
    const tmp = this.tmpPath();
    const hash = createHash('sha256');
    const fh = await open(tmp, 'wx');
    let size = 0;
    try {
      for await (const chunk of stream) {
        size += chunk.length;
        if (size > maxBytes) throw tooLarge(`the file is larger than ${maxBytes} bytes`, { max_bytes: maxBytes });
        hash.update(chunk);
        await fh.write(chunk);
      }
      await fh.sync();
    } catch (e) {
      await fh.close();
      await rm(tmp, { force: true });
      throw e;
    }
    await fh.close();
    const sha256 = hash.digest('hex');
    if (this.has(sha256)) await rm(tmp, { force: true });
    else await this.moveIntoPlace(tmp, sha256);
    return { sha256, size };
  }

  /** A read stream of a blob. Absent, the stream emits an ENOENT error. */
  read(sha256: string): ReadStream {
    return createReadStream(this.locate(sha256) ?? this.path(sha256));
  }

  /** Size in bytes, or null when absent. */
  async size(sha256: string): Promise<number | null> {
    const at = this.locate(sha256);
    if (at === null) return null;
    try {
      return (await stat(at)).size;
    } catch {
      return null;
    }
  }

  private tmpPath(): string {
    return join(this.dir, 'tmp', randomBytes(8).toString('hex'));
  }

  /** Renames a complete, fsynced temporary file to its blob path and makes that name durable. */
  private async moveIntoPlace(tmp: string, sha256: string): Promise<void> {
    const dest = this.path(sha256);
    const prefix = sha256.slice(0, 2);
    let ready = this.fanOut.get(prefix);
    if (ready === undefined) {
      // Once per fan-out directory and process: created if missing, and the store's
      // directory fsynced so that the entry naming it is durable — also when another
      // process created it and may have died before its own fsync. Concurrent writers of
      // the same prefix wait for the same promise.
      ready = (async () => {
        try {
          await mkdir(join(this.dir, prefix));
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
        }
        await syncDirectory(this.dir);
      })();
      this.fanOut.set(prefix, ready);
      ready.catch(() => this.fanOut.delete(prefix));
    }
    await ready;
    await rename(tmp, dest);
    await syncDirectory(join(this.dir, prefix));
  }
}

/** fsyncs a directory, making the entries renamed or created in it durable (POSIX leaves them in memory until then). */
async function syncDirectory(dir: string): Promise<void> {
  const fd = openSync(dir, 'r');
  try {
    await fsyncFd(fd);
  } finally {
    closeSync(fd);
  }
}
