import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Deps } from '../../src/context.ts';
import { prepareEmail } from '../../src/mail/inbound/ingest-email.ts';
import { BlobStore } from '../../src/platform/blobs.ts';
import { systemClock } from '../../src/platform/clock.ts';
import { loadConfig } from '../../src/platform/config.ts';
import { createLogger } from '../../src/platform/logger.ts';

/**
 * prepareEmail (src/mail/inbound/ingest-email.ts) stores the raw message while it parses
 * and authenticates it: the message it returns has its raw bytes in the blob store, and a
 * message whose bytes could not be stored is never returned (nothing may be committed or
 * answered for it). Real files; no database is needed before the commit.
 */
describe('prepareEmail: the raw message is stored before the message is returned', () => {
  const dirs: string[] = [];
  after(() => {
    for (const d of dirs) rmSync(d, { recursive: true, force: true });
  });
  const depsWith = (blobDir: string): Deps => {
    const config = loadConfig({}, undefined, { domains: ['alpha.test'], dnsOffline: true, dataDir: blobDir });
    return { config, blobs: new BlobStore(blobDir), log: createLogger('test', 'silent'), clock: systemClock } as unknown as Deps;
  };
  const raw = Buffer.from('From: Ann <ann@example.com>\r\nTo: bob@alpha.test\r\nSubject: Hi\r\nMessage-ID: <p1@example.com>\r\n\r\nHello Bob\r\n');
  const envelope = { mailFrom: 'ann@example.com', rcptTo: ['bob@alpha.test'], remoteIp: '192.0.2.1', helo: 'mail.example.com' };

  it('returns the message parsed and authenticated, its raw bytes in the blob store', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'parley-prepare-'));
    dirs.push(dir);
    const p = await prepareEmail(depsWith(dir), raw, envelope);
    const sha = createHash('sha256').update(raw).digest('hex');
    assert.equal(p.sha256, sha);
    assert.deepEqual(readFileSync(join(dir, sha.slice(0, 2), sha)), raw);
    assert.equal(p.problem, null);
    assert.equal(p.parsed?.messageId, 'p1@example.com');
    assert.ok(p.auth, 'SMTP mail is authenticated');
    assert.equal(p.message?.body, 'Hello Bob');
  });

  it('an empty message is stored raw and returned with its problem', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'parley-prepare-'));
    dirs.push(dir);
    const empty = Buffer.from('\r\n');
    const p = await prepareEmail(depsWith(dir), empty, envelope, { mode: 'import' });
    assert.match(p.problem?.reason ?? '', /could not be parsed/);
    assert.equal(p.problem?.permanent, true);
    const sha = createHash('sha256').update(empty).digest('hex');
    assert.deepEqual(readFileSync(join(dir, sha.slice(0, 2), sha)), empty);
  });

  it('rejects, for a good message and for an unparseable one, when the raw bytes cannot be stored', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'parley-prepare-'));
    dirs.push(dir);
    const deps = depsWith(dir);
    // The store's folder for files being written is replaced by a plain file: every write fails.
    rmSync(join(dir, 'tmp'), { recursive: true });
    writeFileSync(join(dir, 'tmp'), 'not a folder');
    await assert.rejects(prepareEmail(deps, raw, envelope), (e: NodeJS.ErrnoException) => e.code === 'ENOTDIR');
    await assert.rejects(prepareEmail(deps, Buffer.from('\r\n'), envelope, { mode: 'import' }), (e: NodeJS.ErrnoException) => e.code === 'ENOTDIR');
  });
});
