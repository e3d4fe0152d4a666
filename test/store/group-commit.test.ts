/**
 * Group commit (src/store/group-commit.ts): units of different keys share a transaction and
 * buffer their row writes until just before COMMIT; a failing unit gets its own error and
 * costs the others nothing; units of one key run one after the other; a lone unit starts at
 * once, and while another transaction commits a few units wait for more; the stream events of
 * the units of a shared transaction, written by parley_write_rows, are numbered per user.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { sql } from 'kysely';
import { beforeCommit, type Db, openDb, transaction } from '../../src/store/db.ts';
import { migrate } from '../../src/store/migrate.ts';
import { appendEvents } from '../../src/streams/store.ts';
import { type BatchRead, type RowWriter, groupTransaction, groupTransactionWith, writeRows } from '../../src/store/group-commit.ts';
import { createTestDatabase } from '../support/db.ts';

describe('groupTransaction', () => {
  let db: Db;
  let drop: () => Promise<void>;
  before(async () => {
    const t = await createTestDatabase();
    drop = t.drop;
    db = openDb(t.url, 4);
    await sql`create table items (k text not null, n integer not null, txid bigint not null, primary key (k, n))`.execute(db.kysely);
  });
  after(async () => {
    await db.close();
    await drop();
  });

  const itemsWriter: RowWriter<{ k: string; n: number }> = {
    write: async (tx, rows) => {
      await sql`insert into items (k, n, txid)
                select r.k, r.n, txid_current() from jsonb_to_recordset(${JSON.stringify(rows)}::jsonb) as r(k text, n integer)`.execute(tx);
    },
  };

  /** A unit that appends item `last + 1` of `key`, reading what committed before it. */
  const appendItem = (key: string, opts: { fail?: boolean } = {}) =>
    groupTransaction(db, key, async (tx) => {
      const r = await sql<{ n: number | null }>`select max(n) as n from items where k = ${key}`.execute(tx);
      const n = (r.rows[0].n ?? 0) + 1;
      if (opts.fail) throw new Error(`refused ${key}`);
      await writeRows(tx, itemsWriter, [{ k: key, n }]);
      return n;
    });

  it('commits concurrent units of different keys together, each with its own result', async () => {
    const keys = Array.from({ length: 20 }, (_, i) => `a${i}`);
    const results = await Promise.all(keys.map((k) => appendItem(k)));
    assert.deepEqual(results, keys.map(() => 1));
    const rows = await sql<{ k: string; txid: number }>`select k, txid from items where k like 'a%'`.execute(db.kysely);
    assert.equal(rows.rows.length, 20);
    const transactions = new Set(rows.rows.map((r) => r.txid)).size;
    assert.ok(transactions < 20, `20 units shared ${transactions} transactions`);
  });

  it('runs units of one key in turn: each sees what the previous committed', async () => {
    const results = await Promise.all(Array.from({ length: 10 }, () => appendItem('same')));
    assert.deepEqual([...results].sort((x, y) => x - y), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
  });

  it('gives a failing unit its error and commits the others', async () => {
    const outcomes = await Promise.allSettled([appendItem('f1'), appendItem('f2', { fail: true }), appendItem('f3'), appendItem('f4')]);
    assert.deepEqual(
      outcomes.map((o) => o.status),
      ['fulfilled', 'rejected', 'fulfilled', 'fulfilled'],
    );
    assert.match(String((outcomes[1] as PromiseRejectedResult).reason), /refused f2/);
    const keys = (await sql<{ k: string }>`select k from items where k like 'f%' order by k`.execute(db.kysely)).rows.map((r) => r.k);
    assert.deepEqual(keys, ['f1', 'f3', 'f4']);
  });

  it('finds the unit whose buffered rows fail at COMMIT time and commits the rest', async () => {
    await sql`insert into items (k, n, txid) values ('dup', 1, 0)`.execute(db.kysely);
    // This unit writes a row that already exists; the failure shows only when the buffered rows are written.
    const clash = groupTransaction(db, 'dup', async (tx) => {
      await writeRows(tx, itemsWriter, [{ k: 'dup', n: 1 }]);
      return 'written';
    });
    const outcomes = await Promise.allSettled([appendItem('g1'), clash, appendItem('g2')]);
    assert.deepEqual(
      outcomes.map((o) => o.status),
      ['fulfilled', 'rejected', 'fulfilled'],
    );
    assert.equal((outcomes[1] as PromiseRejectedResult).reason.code, '23505');
    const keys = (await sql<{ k: string }>`select k from items where k like 'g%' order by k`.execute(db.kysely)).rows.map((r) => r.k);
    assert.deepEqual(keys, ['g1', 'g2']);
  });

  it('makes the batch read of all units sharing a transaction in one call, each unit getting its own result', async () => {
    const calls: string[][] = [];
    const lengths: BatchRead<string, number> = {
      name: 'lengths',
      read: async (_tx, args) => {
        calls.push(args);
        return args.map((a) => a.length);
      },
    };
    const keys = ['h', 'hh', 'hhh', 'hhhh', 'hhhhh', 'hhhhhh'];
    const results = await Promise.all(keys.map((k) => groupTransactionWith(db, k, lengths, k, async (_tx, n) => `${k}:${n}`)));
    assert.deepEqual(results, keys.map((k) => `${k}:${k.length}`));
    assert.deepEqual(calls.flat().sort(), [...keys].sort(), 'every argument read exactly once');
    assert.ok(calls.length < keys.length, `${keys.length} units, ${calls.length} reads`);
  });

  it('starts a lone unit at once; while another transaction commits, holds one unit back until three can go together', async () => {
    // A committer of its own, told to wait as long as the test may need: what starts the held
    // unit here is the arrival of more units, never the timer.
    const own = openDb(db.pool.options.connectionString as string, 4);
    const opts = { minUnits: 3, maxWaitMs: 60_000 };
    const blocker = await db.pool.connect();
    const txidOf = async (tx: Parameters<Parameters<typeof groupTransaction>[2]>[0]) =>
      (await sql<{ t: string }>`select txid_current()::text as t`.execute(tx)).rows[0].t;
    try {
      // Nothing else in flight: a lone unit starts (with a 60 s wait this would time out otherwise).
      assert.equal(await groupTransaction(own, 'w0', async () => 'alone', opts), 'alone');

      // A committing transaction: its COMMIT's round trip waits for an advisory lock the test holds.
      await blocker.query('select pg_advisory_lock(4242)');
      let committed = false;
      let unitRan!: () => void;
      const ran = new Promise<void>((r) => (unitRan = r));
      const committing = groupTransaction(
        own,
        'w1',
        async (tx) => {
          beforeCommit(tx, async () => {
            await sql`select pg_advisory_xact_lock(4242)`.execute(tx);
          });
          unitRan();
          return 'w1';
        },
        opts,
      ).then((v) => ((committed = true), v));
      await ran;

      // One unit, then a few turns of the event loop — a pump would have started it alone by
      // now — then three more: all four share one transaction, while w1 still commits.
      const held = groupTransaction(own, 'w2', txidOf, opts);
      for (let i = 0; i < 3; i++) await new Promise((r) => setImmediate(r));
      const txids = await Promise.all([held, ...['w3', 'w4', 'w5'].map((k) => groupTransaction(own, k, txidOf, opts))]);
      assert.equal(new Set(txids).size, 1, `the held unit and the three after it: transactions ${txids.join(', ')}`);
      assert.equal(committed, false, 'they ran while w1 was committing');

      await blocker.query('select pg_advisory_unlock(4242)');
      assert.equal(await committing, 'w1');
    } finally {
      blocker.release();
      await own.close();
    }
  });
});

describe('stream events in shared transactions (parley_write_rows)', () => {
  let db: Db;
  let drop: () => Promise<void>;
  let u1 = 0;
  let u2 = 0;
  const convs = new Map<string, number>();
  before(async () => {
    const t = await createTestDatabase();
    drop = t.drop;
    db = openDb(t.url, 4);
    await migrate(db.pool);
    const users = await sql<{ id: number; address: string }>`
      insert into users (address) values ('u1@alpha.test'), ('u2@alpha.test') returning id, address`.execute(db.kysely);
    u1 = users.rows.find((u) => u.address === 'u1@alpha.test')!.id;
    u2 = users.rows.find((u) => u.address === 'u2@alpha.test')!.id;
    for (const key of ['c1', 'c2', 'c3', 'c4']) {
      const r = await sql<{ id: number }>`
        insert into conversations (key, creator, leader, created_at) values (${key}, 'u1@alpha.test', 'alpha.test', now()) returning id`.execute(db.kysely);
      convs.set(key, r.rows[0].id);
    }
  });
  after(async () => {
    await db.close();
    await drop();
  });

  it("numbers each user's events gapless, in the order each unit appended them, across the units of shared transactions", async () => {
    const keys = ['c1', 'c2', 'c3', 'c4'];
    await Promise.all(
      keys.map((key) =>
        groupTransaction(db, key, async (tx) => {
          const convId = convs.get(key)!;
          await appendEvents(tx, [
            { userId: u1, convId, kind: 'flags', payload: { key, n: 1 } },
            { userId: u2, convId, kind: 'flags', payload: { key, n: 1 } },
          ]);
          await appendEvents(tx, [{ userId: u1, convId, kind: 'flags', payload: { key, n: 2 } }]);
        }),
      ),
    );
    // An ordinary transaction afterwards continues the same numbering.
    await transaction(db, (tx) => appendEvents(tx, [{ userId: u1, convId: convs.get('c1')!, kind: 'labels', payload: { key: 'after', n: 1 } }]));
    const events = (
      await sql<{ user_id: number; seq: number; payload: { key: string; n: number } }>`
        select user_id, seq, payload from user_events order by user_id, seq`.execute(db.kysely)
    ).rows;
    const mine = events.filter((e) => e.user_id === u1);
    assert.deepEqual(mine.map((e) => e.seq), [1, 2, 3, 4, 5, 6, 7, 8, 9]);
    for (const key of keys) {
      const ns = mine.filter((e) => e.payload.key === key).map((e) => e.payload.n);
      assert.deepEqual(ns, [1, 2], `${key}'s events in the order appended`);
    }
    assert.equal(mine[8].payload.key, 'after');
    assert.deepEqual(events.filter((e) => e.user_id === u2).map((e) => e.seq), [1, 2, 3, 4]);
    const seqs = await sql<{ id: number; stream_seq: number }>`select user_id as id, seq as stream_seq from user_streams order by user_id`.execute(db.kysely);
    assert.deepEqual(new Map(seqs.rows.map((r) => [r.id, r.stream_seq])), new Map([[u1, 9], [u2, 4]]));
  });

  it('rolls back a shared transaction whose last write, sent with its COMMIT, fails, and commits the other units alone', async () => {
    const before = (await sql<{ n: number }>`select count(*)::int as n from user_events`.execute(db.kysely)).rows[0].n;
    const outcomes = await Promise.allSettled(
      ['c1', 'c2', 'c3'].map((key) =>
        groupTransaction(db, key, async (tx) => {
          // c2's event names no user: parley_write_rows raises in the statement sent with COMMIT.
          await appendEvents(tx, [{ userId: key === 'c2' ? 999_999 : u2, convId: convs.get(key)!, kind: 'flags', payload: { key, n: 3 } }]);
          return key;
        }),
      ),
    );
    assert.deepEqual(
      outcomes.map((o) => o.status),
      ['fulfilled', 'rejected', 'fulfilled'],
    );
    assert.equal((outcomes[1] as PromiseRejectedResult).reason.code, '23503');
    const added = (await sql<{ key: string }>`select payload->>'key' as key from user_events order by user_id, seq offset ${before}`.execute(db.kysely)).rows;
    assert.deepEqual(added.map((r) => r.key).sort(), ['c1', 'c3']);
  });

  it('sends a batch read that has a statement with the BEGIN, each unit getting its own result', async () => {
    let reads = 0;
    const doubled: BatchRead<number, number> = {
      name: 'doubled',
      read: async (_tx, args) => {
        reads++;
        return args.map((a) => a * 2);
      },
      statement: (args) => ({
        select: `select x * 2 as y from unnest('{${args.join(',')}}'::int[]) with ordinality as t(x, i) order by i`,
        results: (_tx, rows) => (rows as { y: number }[]).map((r) => r.y),
      }),
    };
    const args = [1, 2, 3, 4, 5, 6];
    const results = await Promise.all(
      args.map((a) =>
        groupTransactionWith(db, `d${a}`, doubled, a, async (tx, y) => {
          // Inside the transaction the statement ran in: its snapshot is taken, its writes are its own.
          const r = await sql<{ t: boolean }>`select now() = statement_timestamp() as t`.execute(tx);
          return [y, r.rows[0].t];
        }),
      ),
    );
    assert.deepEqual(results.map((r) => r[0]), args.map((a) => a * 2));
    assert.ok(results.some((r) => r[1] === false), 'the units ran inside an open transaction (now() is its start)');
    assert.equal(reads, 0, 'the statement, not read, was used');
  });
});
