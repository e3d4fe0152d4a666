/**
 * Benchmark: the delivery engine's workers (issue 4, Done means 5; docs/benchmarks.md,
 * "Delivery"). Real `parley start --roles worker` child processes on one PostgreSQL, the
 * `webhook` plugin against a local HTTP receiver that answers 200 at once (a fast fake
 * provider: the figures are the engine's, not a provider's).
 *
 * - `delivery_per_s`: 2 workers, started and idle; after a warm-up of WARMUP deliveries
 *   sent the same way and awaited (not measured), N deliveries are enqueued with the
 *   engine's `enqueueDelivery` inside ONE transaction, so none is due before its commit and
 *   enqueueing is not measured; the clock runs from that commit to the last `sent_at`.
 * - `delivery_queue_p99_ms` (and p50, max): the same 2 workers, not saturated: deliveries
 *   enqueued at a steady moderate rate (QUEUE_RATE per second, each its own transaction, as
 *   an application's single messages are); per delivery, from the enqueueing transaction
 *   (`deliveries.created_at`) to the start of its attempt (`delivery_attempts.at` − the
 *   attempt's `duration_ms`) — both slightly late, so the figure errs high.
 * - `backlog_rss_mb`: one worker with 100,000 deliveries pending (inserted with one
 *   `INSERT … SELECT generate_series`, not through the API), working through them: the
 *   largest VmRSS (/proc/<pid>/status) sampled over BACKLOG_WINDOW_S, and its VmHWM.
 *
 * Environment: BENCH_DELIVERY_N (default 20000), BENCH_DELIVERY_WARMUP (5000), BENCH_DELIVERY_QUEUE_RATE (50/s),
 * BENCH_DELIVERY_QUEUE_S (20), BENCH_DELIVERY_BACKLOG (100000), BENCH_DELIVERY_BACKLOG_S (60);
 * BENCH_DELIVERY_ONLY=rate,queue,backlog runs a subset (profiling);
 * BENCH_WORKER_NODE_ARGS adds node flags to the workers (e.g. "--cpu-prof --cpu-prof-dir=/tmp/prof");
 * BENCH_DELIVERY_PGSS=1 prints PostgreSQL's time per statement in the rate run (with
 * PARLEY_PG_SETTINGS="shared_preload_libraries=pg_stat_statements pg_stat_statements.track_planning=on").
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { sql } from 'kysely';
import { createUser } from '../src/accounts/users.ts';
import type { Deps } from '../src/context.ts';
import { enqueueDelivery } from '../src/delivery/engine.ts';
import { createOrganisation } from '../src/organisations/orgs.ts';
import {
  BENCH_DOMAIN,
  type BenchDatabase,
  PARLEY_BIN,
  ROOT,
  onCleanup,
  openSetupDeps,
  parleyEnv,
  percentile,
  processCpuMs,
  processMemoryMb,
  progress,
  round,
  startDatabase,
  tempDataDir,
} from './support.ts';

const env = (name: string, dflt: number) => {
  const v = Number(process.env[name]);
  return Number.isFinite(v) && v > 0 ? v : dflt;
};

/** Figures of the delivery benchmark (keys of bench/results/latest.json). */
export interface DeliveryFigures {
  /** Deliveries sent per second by 2 workers, from the commit that made N due to the last one sent. */
  delivery_per_s: number;
  /** Deliveries in that run. */
  delivery_count: number;
  /** CPU per delivery in that run, ms: both workers together, PostgreSQL (absent with DATABASE_URL), the receiver (this process). */
  delivery_worker_cpu_ms: number;
  delivery_pg_cpu_ms?: number;
  delivery_receiver_cpu_ms: number;
  /** Queue delay (enqueue → attempt start) at QUEUE_RATE/s with 2 workers, ms. */
  delivery_queue_p50_ms: number;
  delivery_queue_p99_ms: number;
  delivery_queue_max_ms: number;
  /** The enqueue rate achieved in that run, per second, and how many were measured. */
  delivery_queue_rate_per_s: number;
  delivery_queue_count: number;
  /** Largest VmRSS of one worker working through BACKLOG pending deliveries, MiB, and its VmHWM. */
  backlog_rss_mb: number;
  backlog_rss_peak_mb: number;
  /** VmRSS of an idle worker (started, nothing pending), MiB, for comparison. */
  worker_idle_rss_mb: number;
  /** Deliveries pending at the start, and sent per second by that one worker during the window. */
  backlog_count: number;
  backlog_single_worker_per_s: number;
}

/** A receiver of webhook deliveries answering 200 `{"id": n}` at once, without checking anything. */
async function startFastReceiver(): Promise<{ url: string; received: () => number; close(): Promise<void> }> {
  let n = 0;
  const server: Server = createServer((req, res) => {
    req.resume();
    req.on('end', () => {
      n++;
      res.writeHead(200, { 'content-type': 'application/json' }).end(`{"id":"r${n}"}`);
    });
  });
  server.keepAliveTimeout = 60_000;
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as AddressInfo).port;
  return {
    url: `http://127.0.0.1:${port}/hook`,
    received: () => n,
    close: async () => {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

/** A `parley start --roles worker` child process. */
interface WorkerProcess {
  pid: number;
  stop(): Promise<void>;
}

/**
 * Starts `node bin/parley.js start --roles worker` on `databaseUrl`; resolves once it logged
 * "delivery worker started" (its plugins validated, LISTEN in place, first round under way).
 * @throws Error with its last output when it exits or is not ready within 60 s
 */
async function startWorkerProcess(databaseUrl: string, dataDir: string, label: string): Promise<WorkerProcess> {
  const nodeArgs = (process.env.BENCH_WORKER_NODE_ARGS ?? '').split(' ').filter(Boolean);
  const child: ChildProcess = spawn(process.execPath, [...nodeArgs, PARLEY_BIN, 'start', '--roles', 'worker'], {
    cwd: ROOT,
    env: parleyEnv(databaseUrl, dataDir, { PARLEY_LOG_LEVEL: 'info' }),
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const unregister = onCleanup(async () => void child.kill('SIGKILL'));
  const tail: string[] = [];
  let ready: () => void = () => {};
  const isReady = new Promise<void>((resolve) => (ready = resolve));
  for (const stream of [child.stdout!, child.stderr!]) {
    let buf = '';
    stream.setEncoding('utf8');
    stream.on('data', (d: string) => {
      buf += d;
      const lines = buf.split('\n');
      buf = lines.pop()!;
      for (const line of lines) {
        if (line.includes('delivery worker started')) ready();
        else if (/"level":(40|50|60)/.test(line) && tail.length < 20) process.stderr.write(`  [${label}] ${line.slice(0, 300)}\n`);
        tail.push(line);
        if (tail.length > 30) tail.shift();
      }
    });
  }
  let exited: string | null = null;
  const exit = new Promise<void>((resolve) =>
    child.once('exit', (code, signal) => {
      exited = `exited with ${code ?? signal}`;
      resolve();
    }),
  );
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([
    isReady,
    exit.then(() => {
      throw new Error(`${label} ${exited} before it was ready:\n${tail.join('\n')}`);
    }),
    new Promise((_, reject) => (timer = setTimeout(() => reject(new Error(`${label} not ready after 60 s:\n${tail.join('\n')}`)), 60_000))),
  ]).finally(() => clearTimeout(timer));
  return {
    pid: child.pid!,
    async stop() {
      unregister();
      if (exited) return;
      child.kill('SIGTERM');
      const kill = setTimeout(() => child.kill('SIGKILL'), 10_000);
      await exit;
      clearTimeout(kill);
    },
  };
}

/** Creates the organisation whose `webhook` plugin posts to `url`; returns its id. */
async function createBenchOrg(deps: Deps, url: string): Promise<number> {
  await createUser(deps, { address: `owner@${BENCH_DOMAIN}` });
  const org = await createOrganisation(deps, { slug: 'bench', name: 'Bench', address: `bench-org@${BENCH_DOMAIN}`, owner: `owner@${BENCH_DOMAIN}` });
  const row = await deps.db.kysely
    .updateTable('organisations')
    .set({ plugin_config: JSON.stringify({ webhook: { url, secret: 'bench-webhook-secret-0123456789' } }) })
    .where('slug', '=', org.slug)
    .returning('id')
    .executeTakeFirstOrThrow();
  return row.id;
}

/** The largest delivery id so far (0 when none): the rows of a phase are those above it. */
async function maxDeliveryId(deps: Deps): Promise<number> {
  const r = await sql<{ id: string | null }>`select max(id) as id from deliveries`.execute(deps.db.kysely);
  return Number(r.rows[0].id ?? 0);
}

/**
 * Polls until no delivery with an id above `after` is pending or sending; throws unless all
 * `total` are sent. The poll counts only the open rows (through the `deliveries_due` partial
 * index), so that it costs PostgreSQL little while it runs (a count of every row of the run
 * cost ~30 ms per poll, ~0.15 ms of PostgreSQL CPU per delivery, counted as the engine's).
 */
async function untilSent(deps: Deps, after: number, total: number, limitMs: number): Promise<void> {
  const deadline = Date.now() + limitMs;
  let lastLog = Date.now();
  for (;;) {
    const r = await sql<{ open: string }>`
      select count(*) as open from deliveries where state in ('pending', 'sending') and next_attempt_at > '-infinity' and id > ${after}`.execute(deps.db.kysely);
    const open = Number(r.rows[0].open);
    if (open === 0) {
      const done = await sql<{ sent: string }>`select count(*) filter (where state = 'sent') as sent from deliveries where id > ${after}`.execute(deps.db.kysely);
      const sent = Number(done.rows[0].sent);
      if (sent !== total) throw new Error(`${sent} of ${total} deliveries sent (the others failed?)`);
      return;
    }
    if (Date.now() > deadline) throw new Error(`${total - open} of ${total} done after ${limitMs / 1000} s`);
    if (Date.now() - lastLog > 5_000) {
      lastLog = Date.now();
      progress(`delivery: ${total - open}/${total} done`);
    }
    await new Promise((res) => setTimeout(res, 250));
  }
}

/** delivery_per_s: `n` deliveries made due at one commit, while `workers` are up and idle. */
async function measureRate(deps: Deps, db: BenchDatabase, workers: WorkerProcess[], orgId: number, n: number, tag = 't'): Promise<Partial<DeliveryFigures>> {
  progress(`delivery: ${tag === 'w' ? 'warm-up: ' : ''}enqueueing ${n} deliveries in one transaction`);
  const before = await maxDeliveryId(deps);
  await deps.db.kysely.transaction().execute(async (tx) => {
    for (let i = 0; i < n; i++) {
      await enqueueDelivery(tx, deps, { chain: ['webhook'], destinations: { webhook: `contact-${i}` }, payload: { text: `Benchmark message ${i}` }, idempotencyKey: `${tag}:${i}`, orgId });
    }
  });
  const pgss = process.env.BENCH_DELIVERY_PGSS === '1';
  if (pgss) await sql`create extension if not exists pg_stat_statements`.execute(deps.db.kysely);
  if (pgss) await sql`select pg_stat_statements_reset()`.execute(deps.db.kysely);
  const t0 = Date.now();
  const cpu0 = workers.map((w) => processCpuMs(w.pid));
  const pg0 = db.cpuMs();
  const me0 = process.cpuUsage();
  await untilSent(deps, before, n, 600_000);
  const last = await sql<{ t: Date }>`select max(sent_at) as t from deliveries where id > ${before}`.execute(deps.db.kysely);
  const seconds = (new Date(last.rows[0].t).getTime() - t0) / 1000;
  const workerCpu = workers.reduce((s, w, i) => s + processCpuMs(w.pid) - cpu0[i], 0);
  const pg1 = db.cpuMs();
  const me = process.cpuUsage(me0);
  const out: Partial<DeliveryFigures> = {
    delivery_per_s: round(n / seconds, 0),
    delivery_count: n,
    delivery_worker_cpu_ms: round(workerCpu / n, 3),
    delivery_receiver_cpu_ms: round((me.user + me.system) / 1000 / n, 3),
  };
  if (pg0 !== null && pg1 !== null) out.delivery_pg_cpu_ms = round((pg1 - pg0) / n, 3);
  if (pgss) {
    // Where PostgreSQL's time went, per statement (needs PARLEY_PG_SETTINGS="shared_preload_libraries=pg_stat_statements").
    const top = await sql<{ calls: string; total_ms: number; plan_ms: number; rows: string; query: string }>`
      select calls, round(total_exec_time::numeric, 1)::float8 as total_ms, round(total_plan_time::numeric, 1)::float8 as plan_ms, rows, left(regexp_replace(query, '\s+', ' ', 'g'), 110) as query
        from pg_stat_statements order by total_exec_time + total_plan_time desc limit 12`.execute(deps.db.kysely);
    for (const r of top.rows) progress(`  pgss ${String(r.calls).padStart(7)} calls ${String(r.total_ms).padStart(9)} ms exec ${String(r.plan_ms).padStart(7)} ms plan ${String(r.rows).padStart(7)} rows  ${r.query}`);
  }
  progress(`delivery: ${n} sent in ${seconds.toFixed(1)} s = ${out.delivery_per_s}/s (CPU per delivery: workers ${out.delivery_worker_cpu_ms} ms, PostgreSQL ${out.delivery_pg_cpu_ms ?? '?'} ms)`);
  return out;
}

/** delivery_queue_*: deliveries enqueued at `rate`/s for `seconds`, each its own transaction, while the workers run. */
async function measureQueue(deps: Deps, orgId: number, rate: number, seconds: number): Promise<Partial<DeliveryFigures>> {
  progress(`delivery: enqueueing at ${rate}/s for ${seconds} s`);
  const before = await maxDeliveryId(deps);
  const tq = performance.now();
  let issued = 0;
  const pending: Promise<unknown>[] = [];
  while (performance.now() - tq < seconds * 1000) {
    const due = Math.floor(((performance.now() - tq) / 1000) * rate);
    while (issued < due) {
      const i = issued++;
      pending.push(
        deps.db.kysely.transaction().execute((tx) =>
          enqueueDelivery(tx, deps, { chain: ['webhook'], destinations: { webhook: `contact-${i}` }, payload: { text: `Queued message ${i}` }, idempotencyKey: `q:${i}`, orgId }),
        ),
      );
    }
    await new Promise((res) => setTimeout(res, 5));
  }
  await Promise.all(pending);
  const achieved = issued / ((performance.now() - tq) / 1000);
  await untilSent(deps, before, issued, 120_000);
  const delays = (
    await sql<{ ms: number }>`
      select extract(epoch from (a.at - d.created_at)) * 1000 - a.duration_ms as ms
        from deliveries d join delivery_attempts a on a.delivery_id = d.id
       where d.id > ${before}`.execute(deps.db.kysely)
  ).rows
    .map((r) => Math.max(0, Number(r.ms)))
    .sort((a, b) => a - b);
  const out: Partial<DeliveryFigures> = {
    delivery_queue_p50_ms: round(percentile(delays, 50), 1),
    delivery_queue_p99_ms: round(percentile(delays, 99), 1),
    delivery_queue_max_ms: round(delays[delays.length - 1], 1),
    delivery_queue_rate_per_s: round(achieved, 0),
    delivery_queue_count: delays.length,
  };
  progress(`delivery: queue delay at ${out.delivery_queue_rate_per_s}/s: p50 ${out.delivery_queue_p50_ms} ms, p99 ${out.delivery_queue_p99_ms} ms, max ${out.delivery_queue_max_ms} ms`);
  return out;
}

/** backlog_rss_mb: `count` pending deliveries inserted in bulk, one worker working through them for `windowS`. */
async function measureBacklog(deps: Deps, one: WorkerProcess, orgId: number, count: number, windowS: number): Promise<Partial<DeliveryFigures>> {
  const idle = processMemoryMb(one.pid).rss;
  progress(`delivery: inserting ${count} pending deliveries (INSERT … SELECT generate_series)`);
  const before = await maxDeliveryId(deps);
  await sql`
    insert into deliveries (org_id, plugin, destination, chain, chain_index, destinations, idempotency_base, idempotency_key, payload, step_started_at, next_attempt_at)
    select ${orgId}, 'webhook', 'contact-' || g, '{webhook}', 0, jsonb_build_object('webhook', 'contact-' || g), 'b:' || g, 'b:' || g || ':webhook',
           jsonb_build_object('text', 'Backlog message ' || g), now(), now()
      from generate_series(1, ${count}::int) g`.execute(deps.db.kysely);
  await sql`select pg_notify('parley_deliveries', '')`.execute(deps.db.kysely);
  const tb = Date.now();
  let rss = 0;
  let shown = tb;
  while (Date.now() - tb < windowS * 1000) {
    const now = processMemoryMb(one.pid).rss;
    rss = Math.max(rss, now);
    if (Date.now() - shown >= 10_000) {
      shown = Date.now();
      progress(`delivery: backlog worker RSS ${round(now, 1)} MB after ${Math.round((shown - tb) / 1000)} s`);
    }
    await new Promise((res) => setTimeout(res, 250));
  }
  const done = await sql<{ n: string }>`select count(*) as n from deliveries where id > ${before} and state = 'sent'`.execute(deps.db.kysely);
  const out: Partial<DeliveryFigures> = {
    worker_idle_rss_mb: round(idle, 1),
    backlog_rss_mb: round(rss, 1),
    backlog_rss_peak_mb: round(processMemoryMb(one.pid).hwm, 1),
    backlog_count: count,
    backlog_single_worker_per_s: round(Number(done.rows[0].n) / ((Date.now() - tb) / 1000), 0),
  };
  progress(`delivery: one worker with ${count} pending: RSS ≤ ${out.backlog_rss_mb} MB (peak ${out.backlog_rss_peak_mb} MB, idle ${out.worker_idle_rss_mb} MB); ${out.backlog_single_worker_per_s}/s meanwhile`);
  return out;
}

/**
 * Runs the delivery benchmarks (see the module comment) on a fresh database of `database`
 * (or of its own PostgreSQL when none is given).
 * @returns the figures (DeliveryFigures) as a flat object of numbers
 * @throws Error when a delivery is not sent in time or a worker does not start
 */
export async function benchDelivery(database?: BenchDatabase): Promise<Record<string, number>> {
  const own = database ? null : await startDatabase();
  const db = database ?? own!;
  const only = (process.env.BENCH_DELIVERY_ONLY ?? 'rate,queue,backlog').split(',');
  const url = await db.createDatabase('delivery');
  const data = tempDataDir('delivery');
  const receiver = await startFastReceiver();
  const deps = await openSetupDeps(url, data.dir);
  const workers: WorkerProcess[] = [];
  const out: Partial<DeliveryFigures> = {};
  try {
    const orgId = await createBenchOrg(deps, receiver.url);
    if (only.includes('rate') || only.includes('queue')) {
      progress('delivery: starting 2 workers');
      workers.push(...(await Promise.all([startWorkerProcess(url, data.dir, 'worker-1'), startWorkerProcess(url, data.dir, 'worker-2')])));
      if (only.includes('rate')) {
        // Warm-up (not measured), as the other benchmarks do: the workers' code paths, their
        // connections and plans, and PostgreSQL's buffers and WAL segments.
        const warm = env('BENCH_DELIVERY_WARMUP', 5_000);
        if (warm > 0) await measureRate(deps, db, workers, orgId, warm, 'w');
        Object.assign(out, await measureRate(deps, db, workers, orgId, env('BENCH_DELIVERY_N', 20_000)));
      }
      if (only.includes('queue')) Object.assign(out, await measureQueue(deps, orgId, env('BENCH_DELIVERY_QUEUE_RATE', 50), env('BENCH_DELIVERY_QUEUE_S', 20)));
      await Promise.all(workers.splice(0).map((w) => w.stop()));
    }
    if (only.includes('backlog')) {
      const one = await startWorkerProcess(url, data.dir, 'worker-backlog');
      workers.push(one);
      Object.assign(out, await measureBacklog(deps, one, orgId, env('BENCH_DELIVERY_BACKLOG', 100_000), env('BENCH_DELIVERY_BACKLOG_S', 60)));
    }
  } finally {
    await Promise.all(workers.map((w) => w.stop().catch(() => {})));
    await deps.db.close();
    await receiver.close();
    data.rm();
    if (own) await own.stop();
  }
  return out as Record<string, number>;
}

// `node --import tsx bench/delivery.ts` runs it alone and prints the figures.
if (import.meta.url === `file://${process.argv[1]}`) {
  const figures = await benchDelivery();
  process.stdout.write(`${JSON.stringify(figures, null, 2)}\n`);
  process.exit(0);
}
