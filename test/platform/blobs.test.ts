import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { BlobStore } from '../../src/platform/blobs.ts';
import { AppError } from '../../src/platform/errors.ts';

/** The content-addressed blob store (src/platform/blobs.ts): layout, reads of older stores, refusals. */
describe('BlobStore', () => {
  const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');
  const dirs: string[] = [];
  after(() => {
    for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
  });
  const store = () => {
    const dir = mkdtempSync(join(tmpdir(), 'parley-blobs-test-'));
    dirs.push(dir);
    return { dir, blobs: new BlobStore(dir) };
  };
  const readAll = (s: NodeJS.ReadableStream) =>
    new Promise<Buffer>((resolve, reject) => {
      const chunks: Buffer[] = [];
      s.on('data', (c: Buffer) => chunks.push(c)).on('end', () => resolve(Buffer.concat(chunks))).on('error', reject);
    });

  it('stores bytes at <dir>/<first two hex digits>/<sha256>, reads them back, and writing them again is harmless', async () => {
    const s = store();
    const bytes = randomBytes(10_000);
    const r = await s.blobs.put(bytes);
    assert.deepEqual(r, { sha256: sha(bytes), size: 10_000 });
    const file = join(s.dir, r.sha256.slice(0, 2), r.sha256);
    assert.deepEqual(readFileSync(file), bytes);
    assert.equal(s.blobs.has(r.sha256), true);
    assert.equal(await s.blobs.size(r.sha256), 10_000);
    assert.deepEqual(await readAll(s.blobs.read(r.sha256)), bytes);
    assert.deepEqual(await s.blobs.put(bytes), r);
    // One level of fan-out: the only entry of the prefix directory is the blob itself.
    assert.deepEqual(readdirSync(join(s.dir, r.sha256.slice(0, 2))), [r.sha256]);
    assert.deepEqual(readdirSync(join(s.dir, 'tmp')), [], 'no temporary file is left');
  });

  it('a blob of several MiB (written through the thread pool) reads back whole', async () => {
    const s = store();
    const bytes = randomBytes(3 * 1024 * 1024 + 17);
    const r = await s.blobs.put(bytes);
    assert.deepEqual(r, { sha256: sha(bytes), size: bytes.length });
    assert.deepEqual(readFileSync(join(s.dir, r.sha256.slice(0, 2), r.sha256)), bytes);
  });

  it('many blobs written at once land in their prefix directories, none lost', async () => {
    const s = store();
    const all = Array.from({ length: 300 }, (_, i) => Buffer.from(`blob ${i} ${randomBytes(8).toString('hex')}`));
    await Promise.all(all.map((b) => s.blobs.put(b)));
    for (const b of all) assert.deepEqual(readFileSync(join(s.dir, sha(b).slice(0, 2), sha(b))), b);
    assert.deepEqual(readdirSync(join(s.dir, 'tmp')), []);
  });

  it('finds blobs of a store written with the older two-level layout (<ab>/<cd>/<sha256>) and does not store them again', async () => {
    const s = store();
    const bytes = Buffer.from('a raw message of an older store\r\n');
    const h = sha(bytes);
    mkdirSync(join(s.dir, h.slice(0, 2), h.slice(2, 4)), { recursive: true });
    writeFileSync(join(s.dir, h.slice(0, 2), h.slice(2, 4), h), bytes);
    const old = new BlobStore(s.dir);
    assert.equal(old.has(h), true);
    assert.equal(await old.size(h), bytes.length);
    assert.deepEqual(await readAll(old.read(h)), bytes);
    assert.deepEqual(await old.put(bytes), { sha256: h, size: bytes.length });
    assert.equal(existsSync(join(s.dir, h.slice(0, 2), h)), false, 'already stored: not written a second time');
    // New blobs of the same prefix go to the flat layout beside the old fan-out directory.
    const other = await old.put(randomBytes(100));
    assert.equal(existsSync(join(s.dir, other.sha256.slice(0, 2), other.sha256)), true);
  });

  it('an absent blob: has false, size null, read emits ENOENT', async () => {
    const s = store();
    const h = sha(Buffer.from('never stored'));
    assert.equal(s.blobs.has(h), false);
    assert.equal(await s.blobs.size(h), null);
    await assert.rejects(readAll(s.blobs.read(h)), (e: NodeJS.ErrnoException) => e.code === 'ENOENT');
    assert.throws(() => s.blobs.has('../../etc/passwd'), /invalid sha256/);
  });

  it('putStream stores a stream and refuses one larger than maxBytes, keeping nothing', async () => {
    const s = store();
    const bytes = randomBytes(5000);
    const r = await s.blobs.putStream(Readable.from([bytes.subarray(0, 2000), bytes.subarray(2000)]), 5000);
    assert.deepEqual(r, { sha256: sha(bytes), size: 5000 });
    assert.deepEqual(readFileSync(join(s.dir, r.sha256.slice(0, 2), r.sha256)), bytes);
    const big = randomBytes(6000);
    await assert.rejects(s.blobs.putStream(Readable.from([big]), 5000), (e: unknown) => e instanceof AppError && e.status === 413);
    assert.equal(s.blobs.has(sha(big)), false);
    assert.deepEqual(readdirSync(join(s.dir, 'tmp')), []);
  });
});
