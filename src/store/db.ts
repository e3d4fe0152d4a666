import pg from 'pg';
import { Kysely, PostgresDialect, type Transaction } from 'kysely';
import type { Database } from './schema.ts';

// int8 (bigserial ids, count(*)) as JS numbers: every id and count here stays below 2^53.
pg.types.setTypeParser(20, (v) => Number(v));

/** The query layer: Kysely over a pg Pool. `pool` is exposed for LISTEN/NOTIFY and migrations. */
export interface Db {
  kysely: Kysely<Database>;
  pool: pg.Pool;
  close(): Promise<void>;
}

export type Tx = Transaction<Database>;
export type Queryable = Kysely<Database> | Tx;

/**
 * Opens a pool on `url`.
 * @param max pool size (connections); default 10
 */
export function openDb(url: string, max = 10): Db {
  const pool = new pg.Pool({ connectionString: url, max });
  // An idle client that loses its connection must not crash the process.
  pool.on('error', () => {});
  const kysely = new Kysely<Database>({ dialect: new PostgresDialect({ pool }) });
  return {
    kysely,
    pool,
    close: async () => {
      await kysely.destroy();
    },
  };
}

/** True when `e` is a PostgreSQL unique violation (SQLSTATE 23505), optionally on `constraint`. */
export function isUniqueViolation(e: unknown, constraint?: string): boolean {
  const err = e as { code?: string; constraint?: string };
  return err?.code === '23505' && (constraint === undefined || err.constraint === constraint);
}
