/**
 * Benchmark: `parley import` of the SpamAssassin easy_ham corpus (2,403 messages) into a
 * fresh database, run as the real CLI in a child process (docs/benchmarks.md).
 */
import { execFileSync } from 'node:child_process';
import { readdirSync } from 'node:fs';
import pg from 'pg';
// @ts-expect-error — a plain ES module without types (scripts/cli-bundle.mjs)
import { bundleIsCurrent } from '../scripts/cli-bundle.mjs';
import { join } from 'node:path';
import { BENCH_DOMAIN, EASY_HAM, ROOT, countTreeInstructions, createUsers, openSetupDeps, parleyEnv, progress, round, runParley, tempDataDir, type BenchDatabase } from './support.ts';

/** Figures of the import benchmark (keys of bench/results/latest.json). */
export interface ImportFigures {
  /** Messages in the corpus divided by the wall time of the `parley import` process. */
  import_msgs_per_s: number;
  /** Wall time of `parley import`, seconds (process start to exit). */
  import_wall_s: number;
  /** Fixed cost inside that wall time: wall time minus the CLI's own import time (Node + tsx loading the sources, connecting, migration check, exit), seconds. */
  import_startup_s: number;
  /** Messages per second over the CLI's own import time (`seconds` of its summary: archive opened → last message). */
  import_msgs_per_s_excl_startup: number;
  /** CPU time per message of the `parley import` process and of PostgreSQL (absent with DATABASE_URL), ms. */
  import_cli_cpu_ms_per_msg: number;
  import_pg_cpu_ms_per_msg?: number;
  /** Instructions per message of the CLI and of PostgreSQL during the import (perf stat; absent without perf), millions. */
  import_cli_minstr_per_msg?: number;
  import_pg_minstr_per_msg?: number;
  /** .eml files in the corpus. */
  import_corpus_messages: number;
  /** Conversations and messages in the database after the import. */
  import_conversations: number;
  import_messages: number;
  /** The CLI's own summary (`--json`): messages imported as new conversations, threaded into one, skipped as duplicates, failed. */
  import_new_conversations: number;
  import_threaded: number;
  import_duplicates: number;
  import_failed: number;
  /** The CLI's own measure of the import (archive opened → last message), seconds. */
  import_cli_seconds: number;
  /** 1 when `parley` ran its bundle (dist/parley.mjs, built as `npm install` does), 0 when the sources through tsx (the bundle was stale: sources changed during the run). */
  import_cli_bundled: number;
  /** Messages added by importing the same corpus a second time (must be 0), and its wall time. */
  import_again_added: number;
  import_again_wall_s: number;
}

async function counts(url: string): Promise<{ conversations: number; messages: number }> {
  const c = new pg.Client({ connectionString: url });
  await c.connect();
  try {
    const r = await c.query('select (select count(*) from conversations)::int as conversations, (select count(*) from messages)::int as messages');
    return r.rows[0];
  } finally {
    await c.end();
  }
}

/** The JSON summary line `parley import --json` prints on stdout. */
function parseSummary(stdout: string): { imported: number; threaded: number; duplicates: number; failed: number; seconds: number } {
  const line = stdout.split('\n').reverse().find((l) => l.trim().startsWith('{'));
  if (!line) throw new Error(`parley import --json printed no summary; stdout was:\n${stdout.slice(-2000)}`);
  const s = JSON.parse(line);
  const num = (k: string) => (typeof s[k] === 'number' ? s[k] : NaN);
  return { imported: num('imported'), threaded: num('threaded'), duplicates: num('duplicates'), failed: num('failed'), seconds: num('seconds') };
}

/**
 * Imports easy_ham with `node bin/parley.js import <dir> --owner archive@bench.test --json` into a
 * fresh database whose owner was created beforehand, then once more (idempotence check).
 * The database server is already running (its start-up is not measured); the child's own
 * start-up and exit are reported apart as `import_startup_s`.
 * @throws Error when the CLI exits non-zero or takes longer than 4 minutes (it is killed)
 */
export async function benchImport(database: BenchDatabase, corpus = EASY_HAM): Promise<ImportFigures> {
  const messagesInCorpus = readdirSync(corpus).filter((f) => f.endsWith('.eml')).length;
  const url = await database.createDatabase('import');
  const data = tempDataDir('import');
  try {
    const owner = `archive@${BENCH_DOMAIN}`;
    // Migrations run here, so the measured import does not include creating the schema.
    await (await openSetupDeps(url, data.dir)).db.close();
    await createUsers(url, data.dir, [owner]);
    const env = parleyEnv(url, data.dir);

    // The CLI as installed: `npm install` builds its bundle (the `prepare` script).
    execFileSync(process.execPath, [join(ROOT, 'scripts', 'build-cli.mjs')], { stdio: ['ignore', 'ignore', 'inherit'] });
    const bundledBefore: boolean = bundleIsCurrent();
    progress(`import: parley import of ${messagesInCorpus} messages from ${corpus} (${bundledBefore ? 'bundle' : 'sources through tsx'})`);
    const pg0 = database.cpuMs();
    const instrPg = await countTreeInstructions(() => database.pids() ?? []);
    const run = await runParley(['import', corpus, '--owner', owner, '--json'], env, 'import', 240_000);
    const pg1 = database.cpuMs();
    const pgInstr = await instrPg.stop();
    const bundled = bundledBefore && (bundleIsCurrent() as boolean);
    if (run.code !== 0) throw new Error(`parley import exited with ${run.code}:\n${run.output}`);
    const summary = parseSummary(run.stdout);
    const after = await counts(url);
    progress(`import: ${(run.ms / 1000).toFixed(1)} s; ${after.conversations} conversations, ${after.messages} messages stored`);

    progress('import: importing the same corpus again (must add nothing)');
    const again = await runParley(['import', corpus, '--owner', owner, '--json'], env, 'import-again', 240_000);
    if (again.code !== 0) throw new Error(`second parley import exited with ${again.code}:\n${again.output}`);
    const after2 = await counts(url);

    const wallS = run.ms / 1000;
    // The CLI times the import itself (archive opened → last message); the rest of the
    // process's wall time is its fixed cost: Node + tsx loading the sources, connecting,
    // checking migrations, exiting.
    const startupS = Math.max(0, wallS - summary.seconds);
    return {
      import_msgs_per_s: round(messagesInCorpus / wallS, 1),
      import_wall_s: round(wallS, 2),
      import_startup_s: round(startupS, 2),
      import_msgs_per_s_excl_startup: round(messagesInCorpus / Math.max(0.001, summary.seconds), 1),
      import_cli_cpu_ms_per_msg: round(run.cpuMs / messagesInCorpus, 2),
      ...(pg0 !== null && pg1 !== null ? { import_pg_cpu_ms_per_msg: round((pg1 - pg0) / messagesInCorpus, 2) } : {}),
      ...(Number.isFinite(run.instructions) ? { import_cli_minstr_per_msg: round(run.instructions / 1e6 / messagesInCorpus, 2) } : {}),
      ...(Number.isFinite(pgInstr) ? { import_pg_minstr_per_msg: round(pgInstr / 1e6 / messagesInCorpus, 2) } : {}),
      import_corpus_messages: messagesInCorpus,
      import_conversations: after.conversations,
      import_messages: after.messages,
      import_new_conversations: summary.imported,
      import_threaded: summary.threaded,
      import_duplicates: summary.duplicates,
      import_failed: summary.failed,
      import_cli_seconds: round(summary.seconds, 2),
      import_cli_bundled: bundled ? 1 : 0,
      import_again_added: after2.messages - after.messages,
      import_again_wall_s: round(again.ms / 1000, 2),
    };
  } finally {
    data.rm();
  }
}
