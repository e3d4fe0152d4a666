/**
 * The process's one LISTEN connection (src/store/listen.ts): every channel a process waits on
 * shares one backend; notifications reach the subscribers of their channel only; a lost
 * connection is made again and its subscribers are told; the last unsubscribe closes it.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { sql } from 'kysely';
import { type Db, openDb } from '../../src/store/db.ts';
import { listen } from '../../src/store/listen.ts';
import { createLogger } from '../../src/platform/logger.ts';
import { createTestDatabase } from '../support/db.ts';

/** Backends of this database that LISTEN on something (pg_stat_activity: the last query was a LISTEN). */
async function listeningBackends(db: Db): Promise<number[]> {
  const r = await sql<{ pid: number }>`select pid from pg_stat_activity
    where datname = current_database() and pid <> pg_backend_pid() and query ilike 'listen %'`.execute(db.kysely);
  return r.rows.map((x) => x.pid);
}

/** A queue of payloads with a way to wait for the next one. */
function inbox() {
  const got: string[] = [];
  let waiter: (() => void) | null = null;
  return {
    push: (p: string) => {
      got.push(p);
      waiter?.();
    },
    async next(): Promise<string> {
      while (got.length === 0) await new Promise<void>((r) => (waiter = r));
      waiter = null;
      return got.shift()!;
    },
    get size() {
      return got.length;
    },
  };
}

describe('listen', () => {
  const log = createLogger('test', 'silent');
  let db: Db;
  let drop: () => Promise<void>;
  before(async () => {
    const t = await createTestDatabase();
    drop = t.drop;
    db = openDb(t.url, 4);
  });
  after(async () => {
    await db.close();
    await drop();
  });

  it('serves several channels from one backend, each notification to its own channel', async () => {
    const a = inbox();
    const b = inbox();
    const stopA = await listen({ db, log }, 'parley_test_a', a.push);
    const stopB = await listen({ db, log }, 'parley_test_b', b.push);
    try {
      assert.equal((await listeningBackends(db)).length, 1);
      await sql`select pg_notify('parley_test_b', 'to b'), pg_notify('parley_test_a', 'to a')`.execute(db.kysely);
      assert.equal(await a.next(), 'to a');
      assert.equal(await b.next(), 'to b');
      // A notification on a channel nobody here listens to reaches no one: send one, then a
      // marker on `a`; once the marker is in, the other would have been too.
      await sql`select pg_notify('parley_test_c', 'to c')`.execute(db.kysely);
      await sql`select pg_notify('parley_test_a', 'marker')`.execute(db.kysely);
      assert.equal(await a.next(), 'marker');
      assert.equal(b.size, 0);
    } finally {
      await stopA();
      await stopB();
    }
    assert.deepEqual(await listeningBackends(db), []);
  });

  it('makes a lost connection again, tells the subscribers, and hears notifications after it', async () => {
    const a = inbox();
    let reconnected!: () => void;
    const back = new Promise<void>((r) => (reconnected = r));
    const stop = await listen({ db, log }, 'parley_test_d', a.push, () => reconnected());
    try {
      const [pid] = await listeningBackends(db);
      assert.ok(pid);
      await sql`select pg_terminate_backend(${pid}::integer)`.execute(db.kysely);
      await back;
      const [newPid] = await listeningBackends(db);
      assert.ok(newPid && newPid !== pid, `a new backend listens (was ${pid}, now ${newPid})`);
      await sql`select pg_notify('parley_test_d', 'after')`.execute(db.kysely);
      assert.equal(await a.next(), 'after');
    } finally {
      await stop();
    }
  });

  it('while the process stops (Db.stopping) a lost connection is neither warned about nor made again', async () => {
    // A second pool of the same database, stopping, beside the first (a positive control):
    // both LISTEN connections are terminated together; once the first hub has made its
    // connection again (after its first retry delay), the stopping one would have too.
    const t = await createTestDatabase();
    const live = openDb(t.url, 2);
    const stopping = openDb(t.url, 2);
    const warnings: string[] = [];
    const spy = { warn: (_o: unknown, msg?: string) => void warnings.push(String(msg)) };
    let reconnected!: () => void;
    const back = new Promise<void>((r) => (reconnected = r));
    let stoppingReconnects = 0;
    const stopLive = await listen({ db: live, log }, 'parley_test_live', () => {}, () => reconnected());
    const stopStopping = await listen({ db: stopping, log: spy }, 'parley_test_stopping', () => {}, () => stoppingReconnects++);
    try {
      const pids = await listeningBackends(live);
      assert.equal(pids.length, 2, 'one listening backend per pool');
      stopping.stopping = true;
      await sql`select pg_terminate_backend(pid) from pg_stat_activity where pid = any(${pids}::integer[])`.execute(live.kysely);
      await back;
      const now = await listeningBackends(live);
      assert.equal(now.length, 1, `only the live pool listens again (${now.join(', ')})`);
      assert.equal(stoppingReconnects, 0);
      assert.deepEqual(warnings, []);
    } finally {
      await stopLive();
      await stopStopping();
      await live.close();
      await stopping.close();
      await t.drop();
    }
  });
});
