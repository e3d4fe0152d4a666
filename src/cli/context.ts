import { join, resolve } from 'node:path';
import type { Command } from 'commander';
import type { Config } from '../platform/config.ts';
import type { Deps } from '../context.ts';

// The CLI loads what a command needs when it runs (dynamic imports), not every module at
// start: `parley --help` or `parley import` need not load the HTTP server, mail
// authentication or the delivery plugins (docs/benchmarks.md, "CLI start-up").

/** The configuration for a CLI command: global `--config` plus the environment. */
export async function cliConfig(cmd: Command): Promise<Config> {
  const { loadConfig } = await import('../platform/config.ts');
  const opts = cmd.optsWithGlobals() as { config?: string };
  return loadConfig(process.env, opts.config ?? process.env.PARLEY_CONFIG);
}

/**
 * Runs `fn` with the platform's dependencies (database opened — embedded or DATABASE_URL —
 * and migrated), then closes everything. Logs go to stderr at warn level unless configured.
 */
export async function withDeps<T>(cmd: Command, fn: (deps: Deps) => Promise<T>): Promise<T> {
  const config = await cliConfig(cmd);
  const [{ createLogger }, { systemClock }, { BlobStore }, { openDatabase }] = await Promise.all([
    import('../platform/logger.ts'),
    import('../platform/clock.ts'),
    import('../platform/blobs.ts'),
    import('../store/open.ts'),
  ]);
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
