import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { chmodSync, existsSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { tmpdir } from 'node:os';
import { startEmbeddedPostgres, unreachableAncestor } from '../../src/store/embedded.ts';

describe('embedded PostgreSQL data directory', () => {
  it('names the first ancestor others cannot enter, and none when all can', () => {
    const dir = mkdtempSync(join(tmpdir(), 'parley-embedded-'));
    try {
      chmodSync(dir, 0o700);
      assert.equal(unreachableAncestor(join(dir, 'data', 'pg')), dir);
      chmodSync(dir, 0o755);
      assert.equal(unreachableAncestor(join(dir, 'data', 'pg')), null);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('as root, refuses a data directory the postgres user cannot reach with a clear error, creating nothing', { skip: process.getuid?.() !== 0 && 'only root runs the server as the postgres user' }, async () => {
    const dir = mkdtempSync(join(tmpdir(), 'parley-embedded-')); // mode 0700
    try {
      await assert.rejects(startEmbeddedPostgres(join(dir, 'pg'), 1), (e: Error) => {
        assert.match(e.message, /"postgres" user, which cannot enter .*chmod o\+x/);
        assert.ok(e.message.includes(dir));
        return true;
      });
      assert.equal(existsSync(join(dir, 'pg')), false);
      assert.deepEqual(readdirSync(dir), []);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
