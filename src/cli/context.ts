import { join, resolve } from 'node:path';
import type { Command } from 'commander';
import { loadConfig, type Config } from '../platform/config.ts';
import { createLogger } from '../platform/logger.ts';
import { systemClock } from '../platform/clock.ts';
import { BlobStore } from '../platform/blobs.ts';
import { openDatabase } from '../store/open.ts';
import type { Deps } from '../context.ts';

/** The configuration for a CLI command: global `--config` plus the environment. */
export function cliConfig(cmd: Command): Config {
  const opts = cmd.optsWithGlobals() as { config?: string };
  return loadConfig(process.env, opts.config ?? process.env.PARLEY_CONFIG);
}

/**
 * Runs `fn` with the platform's dependencies (database opened — embedded or DATABASE_URL —
 * and migrated), then closes everything. Logs go to stderr at warn level unless configured.
 */
export async function withDeps<T>(cmd: Command, fn: (deps: Deps) => Promise<T>): Promise<T> {
  const config = cliConfig(cmd);
  const log = createLogger('parley', process.env.PARLEY_LOG_LEVEL ?? 'warn');
  const { db, embedded } = await openDatabase(config, log);
  const deps: Deps = { db, config, log, clock: systemClock, blobs: new BlobStore(join(resolve(config.dataDir), 'blobs')) };
  try {
    return await fn(deps);
  } finally {
    await db.close();
    await embedded?.stop();
  }
}
