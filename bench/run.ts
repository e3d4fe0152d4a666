/**
 * `npm run bench`: runs the benchmarks of docs/benchmarks.md, each on a PostgreSQL of its own
 * (an embedded server in a temporary directory, or fresh databases of DATABASE_URL's), and
 * writes their figures as one flat JSON object of numbers to bench/results/latest.json (also
 * printed on stdout). Progress goes to stderr. Exits 1 if a benchmark failed (the figures of
 * the others are still written).
 *
 * Options: `--only import,smtp,append,ws,delivery,federation` runs a subset (append and ws share one
 * platform; delivery is bench/delivery.ts, the delivery engine's workers; federation is
 * bench/federation.ts, three platforms replicating).
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { cpus, loadavg } from 'node:os';
import { join } from 'node:path';
import { benchImport } from './import.ts';
import { benchSmtpReceive } from './smtp-receive.ts';
import { benchAppend } from './append.ts';
import { benchWebsocket } from './websocket.ts';
import { type BenchDatabase, ROOT, cleanupAll, processMemoryMb, progress, round, setupPairs, startDatabase, startPlatformProcess, tempDataDir } from './support.ts';

const ALL = ['import', 'smtp', 'append', 'ws', 'delivery', 'federation'];
const onlyArg = process.argv.indexOf('--only');
const selected = onlyArg >= 0 ? (process.argv[onlyArg + 1] ?? '').split(',').map((s) => s.trim()) : ALL;
const unknown = selected.filter((s) => !ALL.includes(s));
if (unknown.length) {
  console.error(`unknown benchmark(s) ${unknown.join(', ')}; choose from ${ALL.join(', ')}`);
  process.exit(2);
}

// The load average tells whether other work shared the machine during the run (docs/benchmarks.md).
const results: Record<string, number> = { run_unix_ms: Date.now(), cpu_count: cpus().length, load_avg_1m_start: round(loadavg()[0], 2) };
const failures: string[] = [];

/**
 * Runs one benchmark on a PostgreSQL of its own — a fresh embedded server (or fresh databases
 * of DATABASE_URL's), stopped afterwards — so its figures do not depend on what ran before:
 * on one server the append run read 1.72 M PostgreSQL instructions per append after the SMTP
 * run against 1.52 M alone, even with the SMTP run's database dropped and a CHECKPOINT
 * between them (docs/benchmarks.md, session 10).
 */
async function step(name: string, fn: (database: BenchDatabase) => Promise<Record<string, number>>): Promise<void> {
  let database: BenchDatabase | null = null;
  try {
    database = await startDatabase();
    Object.assign(results, await fn(database));
  } catch (e) {
    failures.push(name);
    progress(`${name}: FAILED — ${(e as Error).stack ?? e}`);
  } finally {
    await database?.stop();
  }
}

for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.on(signal, () => {
    progress(`${signal}: stopping the platform processes and PostgreSQL`);
    void cleanupAll().finally(() => process.exit(130));
  });
}

const t0 = performance.now();
if (selected.includes('import')) await step('import', async (database) => ({ ...(await benchImport(database)) }));
if (selected.includes('smtp')) await step('smtp', async (database) => ({ ...(await benchSmtpReceive(database)) }));
if (selected.includes('append') || selected.includes('ws')) {
  await step('append+ws', async (database) => {
    const out: Record<string, number> = {};
    const url = await database.createDatabase('live');
    const data = tempDataDir('live');
    const roles = (process.env.BENCH_ROLES ?? 'web,worker,smtp').split(',');
    progress(`append/ws: starting platform (--roles ${roles.join(',')})`);
    const platform = await startPlatformProcess({ databaseUrl: url, dataDir: data.dir, roles });
    try {
      const pairs = await setupPairs(platform, url, data.dir, 10);
      if (selected.includes('append')) Object.assign(out, await benchAppend(pairs, platform, () => database.cpuMs(), { pgPids: () => database.pids() }));
      let close = () => {};
      if (selected.includes('ws')) {
        const ws = await benchWebsocket(platform.base, pairs);
        Object.assign(out, ws.figures);
        close = ws.close;
      }
      const mem = processMemoryMb(platform.pid);
      out.platform_rss_mb = round(mem.rss, 1);
      out.platform_rss_peak_mb = round(mem.hwm, 1);
      progress(`platform RSS ${out.platform_rss_mb} MB (peak ${out.platform_rss_peak_mb} MB)`);
      close();
      for (const p of pairs) {
        p.writer.close();
        p.reader.close();
      }
    } finally {
      await platform.stop();
      data.rm();
    }
    return out;
  });
}
if (selected.includes('delivery')) await step('delivery', async (database) => (await import('./delivery.ts')).benchDelivery(database));
if (selected.includes('federation')) await step('federation', async (database) => ({ ...(await (await import('./federation.ts')).benchFederation(database)) }));
results.load_avg_1m_end = round(loadavg()[0], 2);
results.bench_total_s = round((performance.now() - t0) / 1000, 1);

// A flat object of numbers: a figure that could not be measured here (NaN — e.g. the
// instruction counts where `perf` or the CPU's counters are missing) is left out, not
// written as null (JSON.stringify's rendering of NaN).
const absent = Object.keys(results).filter((k) => !Number.isFinite(results[k]));
for (const k of absent) delete results[k];
if (absent.length) progress(`not measured on this machine, left out: ${absent.join(', ')}`);
const json = JSON.stringify(results, null, 2);
mkdirSync(join(ROOT, 'bench', 'results'), { recursive: true });
writeFileSync(join(ROOT, 'bench', 'results', 'latest.json'), json + '\n');
process.stdout.write(json + '\n');
if (failures.length) {
  progress(`failed: ${failures.join(', ')} (their figures are missing from bench/results/latest.json)`);
  process.exit(1);
}
process.exit(0);
