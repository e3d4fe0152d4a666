import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { chmodSync, existsSync, mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import pg from 'pg';
import { join } from 'node:path';
import { tmpdir } from 'node:os';
import { startEmbeddedPostgres, unreachableAncestor } from '../../src/store/embedded.ts';
import { canScheduleAsBatch } from '../support/system.ts';

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

  it('runs the server under SCHED_BATCH: the postmaster, its background processes and the backends it forks afterwards', { skip: !canScheduleAsBatch && 'Linux with chrt (util-linux) only' }, async () => {
    const dir = mkdtempSync(join(tmpdir(), 'parley-embedded-'));
    chmodSync(dir, 0o755);
    const port = await new Promise<number>((resolve) => {
      const srv = createServer().listen(0, '127.0.0.1', () => {
        const p = (srv.address() as { port: number }).port;
        srv.close(() => resolve(p));
      });
    });
    const server = await startEmbeddedPostgres(join(dir, 'pg'), port);
    // /proc/<pid>/sched: "policy : 3" is SCHED_BATCH (0 is SCHED_OTHER, the default).
    const policy = (pid: number) => Number(/^policy\s*:\s*(\d+)/m.exec(readFileSync(`/proc/${pid}/sched`, 'utf8'))?.[1]);
    const client = new pg.Client({ connectionString: server.url });
    try {
      await client.connect();
      const postmaster = Number(readFileSync(join(dir, 'pg', 'postmaster.pid'), 'utf8').split('\n')[0]);
      const backend = Number((await client.query('select pg_backend_pid() as pid')).rows[0].pid);
      const checkpointer = Number((await client.query("select pid from pg_stat_activity where backend_type = 'checkpointer'")).rows[0].pid);
      assert.equal(policy(postmaster), 3, 'postmaster');
      assert.equal(policy(checkpointer), 3, 'checkpointer (started before the policy was set)');
      assert.equal(policy(backend), 3, 'a backend forked afterwards');
      assert.equal(policy(process.pid), 0, 'the platform itself keeps the default policy');
    } finally {
      await client.end().catch(() => {});
      await server.stop();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
