import { createHash, randomBytes } from 'node:crypto';
import { createReadStream, existsSync, mkdirSync, type ReadStream } from 'node:fs';
import { mkdir, open, rename, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import type { Readable } from 'node:stream';
import { tooLarge } from './errors.ts';

/**
 * The content-addressed blob store: bytes on disk under `<dir>/ab/cd/<sha256>`, named by
 * their SHA-256 (hex). Writes go to a temporary file, are fsynced and renamed into place,
 * so a blob is either complete or absent; writing the same bytes twice is harmless. The
 * directory that receives the name is fsynced too (and, when a fan-out directory is made,
 * the directories above it), so once `put` resolves the blob survives a crash on any
 * filesystem — an SMTP 250 is answered only after its raw message is durable (issue 2 §6).
 */
export class BlobStore {
  constructor(readonly dir: string) {
    mkdirSync(join(dir, 'tmp'), { recursive: true });
  }

  /** Path of a blob (whether or not it exists). @throws Error for a malformed sha256 */
  path(sha256: string): string {
    if (!/^[0-9a-f]{64}$/.test(sha256)) throw new Error(`invalid sha256 ${sha256}`);
    return join(this.dir, sha256.slice(0, 2), sha256.slice(2, 4), sha256);
  }

  has(sha256: string): boolean {
    return existsSync(this.path(sha256));
  }

  /** Stores bytes durably. Returns their SHA-256 and size in bytes. */
  async put(data: Uint8Array): Promise<{ sha256: string; size: number }> {
    const sha256 = createHash('sha256').update(data).digest('hex');
    if (!this.has(sha256)) {
      const tmp = join(this.dir, 'tmp', randomBytes(8).toString('hex'));
      const fh = await open(tmp, 'w');
      try {
        await fh.writeFile(data);
        await fh.sync();
      } finally {
        await fh.close();
      }
      await this.moveIntoPlace(tmp, sha256);
    }
    return { sha256, size: data.byteLength };
  }

  /**
   * Stores a stream durably, refusing more than `maxBytes`.
   * @throws AppError 413 when the stream exceeds maxBytes (nothing is kept)
   */
  async putStream(stream: Readable, maxBytes: number): Promise<{ sha256: string; size: number }> {
    const tmp = join(this.dir, 'tmp', randomBytes(8).toString('hex'));
    const hash = createHash('sha256');
    const fh = await open(tmp, 'w');
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

  /** Fan-out directories known to exist (creating one is a synchronous syscall per write otherwise). */
  private readonly made = new Set<string>();

  private async moveIntoPlace(tmp: string, sha256: string): Promise<void> {
    const dest = this.path(sha256);
    const dir = join(dest, '..');
    if (!this.made.has(dir)) {
      const created = await mkdir(dir, { recursive: true });
      // New fan-out directories: the entries naming them are made durable, top down.
      if (created !== undefined) for (const d of [this.dir, join(dir, '..')]) await syncDirectory(d);
      this.made.add(dir);
    }
    await rename(tmp, dest);
    await syncDirectory(dir);
  }

  /** A read stream of a blob. @throws Error ENOENT when absent */
  read(sha256: string): ReadStream {
    return createReadStream(this.path(sha256));
  }

  /** Size in bytes, or null when absent. */
  async size(sha256: string): Promise<number | null> {
    try {
      return (await stat(this.path(sha256))).size;
    } catch {
      return null;
    }
  }
}

/** fsyncs a directory, making the entries renamed or created in it durable (POSIX leaves them in memory until then). */
async function syncDirectory(dir: string): Promise<void> {
  const fh = await open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}
