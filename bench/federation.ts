/**
 * Benchmark: federation (issue 3, Done means 5; docs/benchmarks.md, "Federation"). Three
 * platforms as processes — alpha.test (A), beta.test (B), gamma.test (C) — each on its own
 * database of the run's PostgreSQL, talking over loopback through static routes.
 *
 * - **Live replication, A → B** (the figures of record, `federation_*`; issue 3, Done means 5:
 *   "from A's API to visible on B's websocket"): 10 writers on A each lead a conversation with
 *   one reader on B. After a warm-up of 500 actions per writer (not measured; every frame of
 *   it seen on B), the writers append `message:add` actions through A's API as fast as they
 *   can (10 concurrent clients, one request in flight each); every reader holds a websocket
 *   open on B. Per action: A's API request sent → the action's frame on B's websocket
 *   (`federation_p50_ms`, `federation_p99_ms`); overall: actions / (first send → last frame)
 *   (`federation_actions_per_s`). C is idle meanwhile.
 * - **Live replication, A → B and C** (`federation_fanout_*`): the same with 10 other writers
 *   whose conversations also have a participant on C, so every action is pushed to two
 *   platforms and three platforms with their databases share the machine's cores (on a
 *   deployment each platform has a machine of its own). Until session 9 this was the run of
 *   record.
 * - **Catch-up**: B is stopped, 10,000 actions are appended on A to one conversation with a
 *   participant on B (100 per request), B is started again: `catchup_10k_s` is B's start
 *   (spawn) → B's copy of the conversation has A's last action, read from B's database.
 */
import { execFileSync, spawn } from 'node:child_process';
import { appendFileSync } from 'node:fs';
import { join } from 'node:path';
// @ts-expect-error — a plain ES module without types (scripts/cli-bundle.mjs)
import { bundleIsCurrent } from '../scripts/cli-bundle.mjs';
import pg from 'pg';
import WebSocket from 'ws';
import { AppendClient } from './append.ts';
import { createUser } from '../src/accounts/users.ts';
import { loadConfig } from '../src/platform/config.ts';
import { createLogger } from '../src/platform/logger.ts';
import { systemClock } from '../src/platform/clock.ts';
import { BlobStore } from '../src/platform/blobs.ts';
import { openDb } from '../src/store/db.ts';
import { migrate } from '../src/store/migrate.ts';
import {
  type BenchDatabase,
  BENCH_PASSWORD,
  countInstructions,
  countTreeInstructions,
  machineBusyMs,
  PARLEY_BIN,
  ROOT,
  expectStatus,
  freePort,
  login,
  messageBody,
  onCleanup,
  percentile,
  processCpuMs,
  progress,
  round,
  tempDataDir,
  type JsonClient,
} from './support.ts';

/** Figures of the federation benchmark (keys of bench/results/latest.json). */
export interface FederationFigures {
  /** Actions appended on A and seen on B's websockets, per second (first send → last frame). */
  federation_actions_per_s: number;
  /** A's API request sent → the action's frame on B's websocket, ms, under that load. */
  federation_p50_ms: number;
  federation_p99_ms: number;
  federation_max_ms: number;
  /**
   * The replication part: A's `200` received → the frame on B, ms (negative when the frame
   * came first). The rest of `federation_p*_ms` is A's append itself under the load.
   */
  federation_after_response_p50_ms: number;
  federation_after_response_p99_ms: number;
  /** Actions measured, and actions whose frame never came (must be 0). */
  federation_samples: number;
  federation_missing: number;
  /** CPU of A's and B's processes per replicated action during the live run, ms. */
  federation_a_cpu_ms_per_action: number;
  federation_b_cpu_ms_per_action: number;
  /** Instructions (user space, `perf stat -e instructions`) of A's and B's processes per replicated action during the live run, millions; NaN without perf. */
  federation_a_minstr_per_action: number;
  federation_b_minstr_per_action: number;
  /** Instructions of the PostgreSQL server's processes (the databases of all three platforms) per replicated action during the live run, millions; NaN without perf or with DATABASE_URL. */
  federation_pg_minstr_per_action: number;
  /** Cores the whole machine kept busy during the live run (all processes: platforms, PostgreSQL, the benchmark), of `cpu_count`. */
  federation_machine_busy_cores: number;
  /** CPU of A's and B's processes per action during the catch-up (B's start excluded), ms. */
  catchup_a_cpu_ms_per_action: number;
  catchup_b_cpu_ms_per_action: number;
  /** Instructions of A's and B's processes per action during the catch-up, millions; NaN without perf. */
  catchup_a_minstr_per_action: number;
  catchup_b_minstr_per_action: number;
  /** The A → B and C run's figures (each action pushed to two platforms), as the `federation_*` above. */
  federation_fanout_actions_per_s: number;
  federation_fanout_p50_ms: number;
  federation_fanout_p99_ms: number;
  federation_fanout_max_ms: number;
  federation_fanout_after_response_p50_ms: number;
  federation_fanout_after_response_p99_ms: number;
  federation_fanout_samples: number;
  federation_fanout_missing: number;
  federation_fanout_a_cpu_ms_per_action: number;
  federation_fanout_b_cpu_ms_per_action: number;
  federation_fanout_a_minstr_per_action: number;
  federation_fanout_b_minstr_per_action: number;
  federation_fanout_pg_minstr_per_action: number;
  federation_fanout_machine_busy_cores: number;
  /** 1 when the platforms ran the CLI bundle (dist/parley.mjs, built as `npm install` does), 0 when the sources through tsx. */
  federation_platforms_bundled: number;
  /** B started (spawn) → B holds all 10,000 actions appended while it was down, s. */
  catchup_10k_s: number;
  /** The same, from B's HTTP port answering (without B's own start-up), s. */
  catchup_10k_after_listen_s: number;
  /**
   * The transfer alone: B's first new action committed → all of them, s. What
   * `catchup_10k_after_listen_s` adds to it is the wait for A's next push attempt (A backs off
   * while B is down: 1 s, 2 s, 4 s … capped at 5 minutes).
   */
  catchup_10k_transfer_s: number;
}

const DOMAINS = ['alpha.test', 'beta.test', 'gamma.test'] as const;
const WRITERS = 10;

/** One platform of the benchmark: its database, data directory, port, and its process while it runs. */
interface Member {
  domain: string;
  databaseUrl: string;
  dataDir: string;
  port: number;
  base: string;
  proc: { pid: number; stop(): Promise<void>; exited: () => string | null } | null;
}

/** Starts `node bin/parley.js start --roles web,worker` for `m` with the federation routes; resolves when its port answers. */
async function startMember(m: Member, routes: string): Promise<void> {
  // BENCH_FEDERATION_NODE_ARGS_<A|B|C>: node flags for one platform, e.g. "--cpu-prof --cpu-prof-dir=/tmp/prof".
  const nodeArgs = (process.env[`BENCH_FEDERATION_NODE_ARGS_${'ABC'[DOMAINS.indexOf(m.domain as (typeof DOMAINS)[number])]}`] ?? '').split(' ').filter(Boolean);
  const child = spawn(process.execPath, [...nodeArgs, PARLEY_BIN, 'start', '--roles', 'web,worker'], {
    cwd: ROOT,
    env: {
      ...process.env,
      DATABASE_URL: m.databaseUrl,
      PARLEY_DOMAINS: m.domain,
      PARLEY_DATA_DIR: m.dataDir,
      PARLEY_DNS_OFFLINE: '1',
      PARLEY_LOG_LEVEL: process.env.BENCH_FEDERATION_LOG_LEVEL ?? 'warn',
      PARLEY_HTTP_PORT: String(m.port),
      PARLEY_HTTP_HOST: '127.0.0.1',
      PARLEY_BASE_URL: m.base,
      PARLEY_FEDERATION_ROUTES: routes,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const tail: string[] = [];
  // BENCH_FEDERATION_LOG_DIR: every line of each platform's output to <dir>/<domain>.log (with BENCH_FEDERATION_LOG_LEVEL=info, e.g., request times).
  const logDir = process.env.BENCH_FEDERATION_LOG_DIR;
  for (const s of [child.stdout, child.stderr]) {
    s?.setEncoding('utf8');
    s?.on('data', (d: string) => {
      if (logDir) appendFileSync(join(logDir, `${m.domain}.log`), d);
      for (const line of d.split('\n').filter(Boolean)) {
        tail.push(line);
        if (tail.length > 30) tail.shift();
        if (tail.length < 30) process.stderr.write(`  [${m.domain}] ${line.slice(0, 300)}\n`);
      }
    });
  }
  const unregister = onCleanup(async () => void child.kill('SIGKILL'));
  let exited: string | null = null;
  const exit = new Promise<void>((res) => child.once('exit', (code, signal) => ((exited = `exited with ${code ?? signal}`), res())));
  const deadline = Date.now() + 60_000;
  for (;;) {
    if (exited) throw new Error(`${m.domain} ${exited} before listening:\n${tail.join('\n')}`);
    const up = await fetch(`${m.base}/health`).then((r) => r.ok).catch(() => false);
    if (up) break;
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`${m.domain} not answering on ${m.base} after 60 s:\n${tail.join('\n')}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  m.proc = {
    pid: child.pid!,
    exited: () => exited,
    async stop() {
      unregister();
      if (exited) return;
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
      await exit;
      clearTimeout(timer);
    },
  };
}

/** Creates users of `m` (password BENCH_PASSWORD) with the platform's own createUser, migrating its database first. */
async function createMemberUsers(m: Member, addresses: string[]): Promise<void> {
  const config = loadConfig({}, undefined, { domains: [m.domain], databaseUrl: m.databaseUrl, dataDir: m.dataDir, dnsOffline: true, logLevel: 'warn' });
  const db = openDb(m.databaseUrl, 2);
  try {
    await migrate(db.pool);
    const deps = { db, config, log: createLogger('bench', 'warn'), clock: systemClock, blobs: new BlobStore(join(m.dataDir, 'blobs')) };
    for (const address of addresses) await createUser(deps, { address, password: BENCH_PASSWORD });
  } finally {
    await db.close();
  }
}

/** Prints the statements of pg_stat_statements since the last reset, most frequent first, and resets them (BENCH_FEDERATION_STATEMENTS). */
async function printStatements(client: pg.Client, phase: string): Promise<void> {
  const r = await client.query(
    `select d.datname, s.calls, round(s.total_exec_time::numeric, 1) as ms, left(regexp_replace(s.query, '\\s+', ' ', 'g'), 140) as query
       from pg_stat_statements s join pg_database d on d.oid = s.dbid order by s.calls desc limit 60`,
  );
  for (const x of r.rows) process.stderr.write(`  [statements ${phase}] ${x.datname} ${x.calls} ${x.ms} ms ${x.query}\n`);
  await client.query('select pg_stat_statements_reset()');
}

/** Polls `fn` every `everyMs` until it is true; throws `what` after `timeoutMs`. */
async function until(fn: () => Promise<boolean>, what: string, timeoutMs = 60_000, everyMs = 20): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  while (!(await fn())) {
    if (performance.now() > deadline) throw new Error(`timed out after ${timeoutMs / 1000} s waiting for ${what}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/** Opens a websocket on `base` as `token`; resolves after `hello`. */
function openSocket(base: string, token: string, onFrame: (f: any) => void): Promise<WebSocket> {
  const ws = new WebSocket(`${base.replace(/^http/, 'ws')}/api/ws`, { headers: { authorization: `Bearer ${token}` } });
  return new Promise((res, rej) => {
    const timer = setTimeout(() => rej(new Error('websocket: no hello frame within 10 s')), 10_000);
    ws.on('message', (data) => {
      const f = JSON.parse(String(data));
      if (f.type === 'hello') {
        clearTimeout(timer);
        res(ws);
      } else onFrame(f);
    });
    ws.once('error', (e) => (clearTimeout(timer), rej(e)));
  });
}

/** What a live run needs (see {@link liveRun}). */
interface LivePhase {
  A: Member;
  B: Member;
  /** Logged-in readers on B, one per writer. */
  readerClients: JsonClient[];
  /** Where clients and sockets opened go, to be closed at the end. */
  clients: { close(): void }[];
  sockets: WebSocket[];
  /** pg_stat_statements of A's database (BENCH_FEDERATION_STATEMENTS), or null. */
  statements: pg.Client | null;
  warmup: number;
  perWriter: number;
  /** B's database. */
  dbB: pg.Client;
  /** The PostgreSQL server's processes (all three databases), or null with DATABASE_URL. */
  pgPids: () => number[] | null;
}

/** The figures of a live run (keys of bench/results/latest.json, as the A → B run gives them). */
type LiveFigures = Pick<
  FederationFigures,
  | 'federation_actions_per_s'
  | 'federation_p50_ms'
  | 'federation_p99_ms'
  | 'federation_max_ms'
  | 'federation_after_response_p50_ms'
  | 'federation_after_response_p99_ms'
  | 'federation_samples'
  | 'federation_missing'
  | 'federation_a_cpu_ms_per_action'
  | 'federation_b_cpu_ms_per_action'
  | 'federation_a_minstr_per_action'
  | 'federation_b_minstr_per_action'
  | 'federation_pg_minstr_per_action'
  | 'federation_machine_busy_cores'
>;

/** The same figures of the A → B and C run, named `federation_fanout_…`. */
type FanOutFigures = { [K in keyof LiveFigures as K extends `federation_${infer R}` ? `federation_fanout_${R}` : never]: number };

/**
 * One live run: each of `writers` (users of A) leads a new conversation with the participants
 * `others(i)` (its reader on B first), every reader holds a websocket open on B, and the
 * writers append `message:add` through A's API as fast as they are answered — a warm-up of
 * `warmup` actions each (every frame seen on B), then `perWriter` each, measured.
 * @throws Error when an append is refused or B does not hold the conversations within 60 s
 */
async function liveRun(ph: LivePhase, label: string, writers: string[], others: (i: number) => string[]): Promise<LiveFigures> {
  const { A, B } = ph;
  const writerClients = await Promise.all(writers.map((w) => login(A.base, w)));
  ph.clients.push(...writerClients);
  // The appends go through the append benchmark's lean client: what A receives is the same,
  // and the cores the platforms share lose less to the benchmark itself (0.33 against 0.53 M
  // instructions per request: bench/append.ts).
  const appenders = writerClients.map((w) => new AppendClient(A.base, w.token!));
  ph.clients.push(...appenders);
  const keys: string[] = [];
  const created: number[] = [];
  for (let i = 0; i < writers.length; i++) {
    const r = await writerClients[i].request('POST', '/api/conversations', {
      subject: `Federation benchmark ${label} ${i}`,
      participants: others(i),
      messages: [{ body: 'First message of the federation benchmark.' }],
    });
    expectStatus(r, 201, 'create conversation on A');
    keys.push(r.body.key);
    created.push(r.body.actions.at(-1).id);
  }
  progress(`federation ${label}: waiting for B to hold the ${writers.length} conversations`);
  await until(async () => {
    const r = await ph.dbB.query('select key, last_id from conversations where key = any($1)', [keys]);
    const have = new Map(r.rows.map((x) => [x.key as string, Number(x.last_id)]));
    return keys.every((k, i) => (have.get(k) ?? -1) >= created[i]);
  }, 'the conversations on B');

  const sentAt = new Map<string, number>();
  const answeredAt = new Map<string, number>();
  const frameAt = new Map<string, number>();
  const latencies: number[] = [];
  let lastFrame = 0;
  let warmFrames = 0;
  const onFrame = (f: any) => {
    if (f.type !== 'event' || typeof f.action?.body !== 'string') return;
    if (f.action.body.startsWith('warm:')) return void warmFrames++;
    const tag = /^fed:(\S+)/.exec(f.action.body)?.[1];
    const t = tag === undefined ? undefined : sentAt.get(tag);
    if (t === undefined) return;
    lastFrame = performance.now();
    latencies.push(lastFrame - t);
    frameAt.set(tag!, lastFrame);
    sentAt.delete(tag!);
  };
  const sockets = await Promise.all(ph.readerClients.slice(0, writers.length).map((c) => openSocket(B.base, c.token!, onFrame)));
  ph.sockets.push(...sockets);
  // Warm-up, as the append benchmark's: the platforms are long-running servers, and the
  // first thousand actions mostly measure V8 compiling their code paths.
  if (ph.warmup > 0) {
    progress(`federation ${label}: warm-up, ${writers.length} writers × ${ph.warmup} actions (not measured)`);
    await Promise.all(
      appenders.map(async (w, c) => {
        for (let n = 0; n < ph.warmup; n++) {
          const r = await w.request('POST', `/api/conversations/${keys[c]}/actions`, { actions: [{ act: 'message:add', body: messageBody(`warm:${c}:${n}`) }] });
          expectStatus(r, 200, 'append on A (warm-up)');
        }
      }),
    );
    await until(async () => warmFrames >= writers.length * ph.warmup, "the warm-up's frames on B");
  }
  progress(`federation ${label}: ${writers.length} writers on A × ${ph.perWriter} actions, as fast as answered; readers on B's websockets`);
  // BENCH_FEDERATION_STATEMENTS=1 (with PARLEY_PG_SETTINGS="shared_preload_libraries=pg_stat_statements"):
  // prints the statements the databases ran during the measured run, most frequent first.
  if (ph.statements) await ph.statements.query('select pg_stat_statements_reset()');
  const cpuA0 = processCpuMs(A.proc!.pid);
  const cpuB0 = processCpuMs(B.proc!.pid);
  const perfA = countInstructions([A.proc!.pid]);
  const perfB = countInstructions([B.proc!.pid]);
  const perfPg = await countTreeInstructions(() => ph.pgPids() ?? []);
  const busy0 = machineBusyMs();
  const t0 = performance.now();
  await Promise.all(
    appenders.map(async (w, c) => {
      for (let n = 0; n < ph.perWriter; n++) {
        // The writer's address in the tag: the two runs' frames reach the same readers.
        const tag = `${writers[c]}:${n}`;
        sentAt.set(tag, performance.now());
        const r = await w.request('POST', `/api/conversations/${keys[c]}/actions`, { actions: [{ act: 'message:add', body: messageBody(`fed:${tag}`) }] });
        answeredAt.set(tag, performance.now());
        expectStatus(r, 200, 'append on A');
      }
    }),
  );
  const sendDone = performance.now();
  const deadline = performance.now() + 60_000;
  while (sentAt.size > 0 && performance.now() < deadline) await new Promise((r) => setTimeout(r, 10));
  const total = writers.length * ph.perWriter;
  const replicated = total - sentAt.size;
  const busyCores = (machineBusyMs() - busy0) / (performance.now() - t0);
  const cpuA = processCpuMs(A.proc!.pid) - cpuA0;
  const cpuB = processCpuMs(B.proc!.pid) - cpuB0;
  const [instrA, instrB, instrPg] = await Promise.all([perfA.stop(), perfB.stop(), perfPg.stop()]);
  if (ph.statements) await printStatements(ph.statements, `live ${label}`);
  latencies.sort((a, b) => a - b);
  const afterResponse = [...frameAt.entries()].map(([tag, at]) => at - answeredAt.get(tag)!).sort((a, b) => a - b);
  const live: LiveFigures = {
    federation_actions_per_s: round(replicated / (((sentAt.size ? performance.now() : lastFrame) - t0) / 1000), 1),
    federation_p50_ms: round(percentile(latencies, 50)),
    federation_p99_ms: round(percentile(latencies, 99)),
    federation_max_ms: round(latencies.at(-1) ?? NaN),
    federation_after_response_p50_ms: round(percentile(afterResponse, 50)),
    federation_after_response_p99_ms: round(percentile(afterResponse, 99)),
    federation_samples: latencies.length,
    federation_missing: sentAt.size,
    federation_a_cpu_ms_per_action: round(cpuA / Math.max(1, replicated), 3),
    federation_b_cpu_ms_per_action: round(cpuB / Math.max(1, replicated), 3),
    federation_a_minstr_per_action: round(instrA / 1e6 / Math.max(1, replicated), 3),
    federation_b_minstr_per_action: round(instrB / 1e6 / Math.max(1, replicated), 3),
    federation_pg_minstr_per_action: ph.pgPids() ? round(instrPg / 1e6 / Math.max(1, replicated), 3) : NaN,
    federation_machine_busy_cores: round(busyCores, 2),
  };
  progress(
    `federation ${label}: ${replicated}/${total} actions on B in ${round((lastFrame - t0) / 1000, 2)} s (appends took ${round((sendDone - t0) / 1000, 2)} s): ` +
      `${live.federation_actions_per_s}/s, p50 ${live.federation_p50_ms} ms, p99 ${live.federation_p99_ms} ms (after A's answer: p50 ${live.federation_after_response_p50_ms}, p99 ${live.federation_after_response_p99_ms} ms); CPU/action A ${live.federation_a_cpu_ms_per_action} ms, B ${live.federation_b_cpu_ms_per_action} ms; ` +
      `instructions/action A ${live.federation_a_minstr_per_action} M, B ${live.federation_b_minstr_per_action} M, PostgreSQL ${live.federation_pg_minstr_per_action} M; machine busy ${live.federation_machine_busy_cores} cores`,
  );
  for (const s of sockets) s.close();
  for (const a of appenders) a.close();
  return live;
}

/**
 * Runs the federation benchmark on fresh databases of `database`.
 * @param opts.perWriter actions each of the 10 writers appends in the live run (default 200)
 * @param opts.warmup actions each writer appends first, not measured, all seen on B before the live run starts (default 500: 5,000 in all — with
 *   100 the three platforms were still compiling through the 2,000 measured actions, half of A's
 *   instructions per action; `BENCH_FEDERATION_WARMUP`)
 * @param opts.catchup actions appended while B is down (default 10,000; `BENCH_FEDERATION_CATCHUP` sets it for a run whose profile should cover the live part only)
 * @throws Error when a platform does not start, an append is refused, or replication does not converge within 60 s
 */
export async function benchFederation(database: BenchDatabase, opts: { perWriter?: number; warmup?: number; catchup?: number } = {}): Promise<FederationFigures> {
  const perWriter = opts.perWriter ?? Number(process.env.BENCH_FEDERATION_PER_WRITER ?? 200);
  const warmup = opts.warmup ?? Number(process.env.BENCH_FEDERATION_WARMUP ?? 500);
  const catchup = opts.catchup ?? Number(process.env.BENCH_FEDERATION_CATCHUP ?? 10_000);
  const members: Member[] = [];
  const dirs: { rm(): void }[] = [];
  for (const domain of DOMAINS) {
    const dir = tempDataDir(domain.split('.')[0]);
    dirs.push(dir);
    const port = await freePort();
    members.push({ domain, databaseUrl: await database.createDatabase(domain.split('.')[0]), dataDir: dir.dir, port, base: `http://127.0.0.1:${port}`, proc: null });
  }
  const [A, B, C] = members;
  // The platforms as installed: `npm install` builds the CLI bundle (the `prepare` script).
  execFileSync(process.execPath, [join(ROOT, 'scripts', 'build-cli.mjs')], { stdio: ['ignore', 'ignore', 'inherit'] });
  const bundled: boolean = bundleIsCurrent();
  const routes = members.map((m) => `${m.domain}=${m.base}`).join(',');
  const dbB = new pg.Client({ connectionString: B.databaseUrl });
  const clients: { close(): void }[] = [];
  const sockets: WebSocket[] = [];
  try {
    const writers = Array.from({ length: WRITERS }, (_, i) => `w${i}@${A.domain}`);
    const fanWriters = Array.from({ length: WRITERS }, (_, i) => `f${i}@${A.domain}`);
    const readers = Array.from({ length: WRITERS }, (_, i) => `r${i}@${B.domain}`);
    const thirds = Array.from({ length: WRITERS }, (_, i) => `g${i}@${C.domain}`);
    await createMemberUsers(A, [...writers, ...fanWriters, `catchup@${A.domain}`]);
    await createMemberUsers(B, [...readers, `late@${B.domain}`]);
    await createMemberUsers(C, thirds);
    progress(`federation: starting ${DOMAINS.join(', ')} (web,worker, ${bundled ? 'bundle' : 'sources through tsx'}) on ${members.map((m) => m.port).join(', ')}`);
    await Promise.all(members.map((m) => startMember(m, routes)));
    await dbB.connect();
    const lastIdOnB = async (key: string) => {
      const r = await dbB.query('select last_id from conversations where key = $1', [key]);
      return r.rows.length ? Number(r.rows[0].last_id) : -1;
    };

    // ---- Live replication: A → B (the figure of record), then A → B and C.
    const readerClients = await Promise.all(readers.map((r) => login(B.base, r)));
    clients.push(...readerClients);
    const statements = process.env.BENCH_FEDERATION_STATEMENTS === '1' ? new pg.Client({ connectionString: A.databaseUrl }) : null;
    if (statements) {
      await statements.connect();
      await statements.query('create extension if not exists pg_stat_statements');
    }
    const phase: LivePhase = { A, B, readerClients, clients, sockets, statements, warmup, perWriter, dbB, pgPids: () => database.pids() };
    const pair = await liveRun(phase, 'A → B', writers, (i) => [readers[i]]);
    const fanOut = await liveRun(phase, 'A → B and C', fanWriters, (i) => [readers[i], thirds[i]]);
    const live = {
      ...pair,
      ...Object.fromEntries(Object.entries(fanOut).map(([k, v]) => [k.replace(/^federation_/, 'federation_fanout_'), v])),
    } as LiveFigures & FanOutFigures;

    // ---- Catch-up of a replica 10,000 actions behind.
    const writer = await login(A.base, `catchup@${A.domain}`);
    clients.push(writer);
    const c = await writer.request('POST', '/api/conversations', { subject: 'Catch-up', participants: [`late@${B.domain}`], messages: [{ body: 'before B stops' }] });
    expectStatus(c, 201, 'create the catch-up conversation');
    const key = c.body.key as string;
    await until(async () => (await lastIdOnB(key)) >= c.body.actions.at(-1).id, 'the catch-up conversation on B');
    progress('federation: B stopped; appending 10,000 actions on A');
    await B.proc!.stop();
    let last = 0;
    for (let n = 0; n < catchup; n += 100) {
      const batch = Array.from({ length: Math.min(100, catchup - n) }, (_, i) => ({ act: 'message:add', body: messageBody(`catchup:${n + i}`) }));
      const r = await writer.request('POST', `/api/conversations/${key}/actions`, { actions: batch });
      expectStatus(r, 200, 'append the catch-up batch on A');
      last = r.body.actions.at(-1).id;
    }
    const before = await lastIdOnB(key);
    progress(`federation: B holds ${before} of ${last} actions; starting B`);
    if (statements) await statements.query('select pg_stat_statements_reset()');
    const s0 = performance.now();
    await startMember(B, routes);
    const listening = performance.now();
    const cpuCA0 = processCpuMs(A.proc!.pid);
    const cpuCB0 = processCpuMs(B.proc!.pid);
    const perfCA = countInstructions([A.proc!.pid]);
    const perfCB = countInstructions([B.proc!.pid]);
    let firstMoved = 0;
    await until(
      async () => {
        const id = await lastIdOnB(key);
        if (id > before && !firstMoved) firstMoved = performance.now();
        return id >= last;
      },
      `B catching up to action ${last}`,
      400_000,
      10,
    );
    const done = performance.now();
    if (statements) {
      await printStatements(statements, 'catch-up');
      await statements.end();
    }
    const moved = Math.max(1, last - before);
    const cpuCA = processCpuMs(A.proc!.pid) - cpuCA0;
    const cpuCB = processCpuMs(B.proc!.pid) - cpuCB0;
    const [instrCA, instrCB] = await Promise.all([perfCA.stop(), perfCB.stop()]);
    const figures: FederationFigures = {
      ...live,
      catchup_a_cpu_ms_per_action: round(cpuCA / moved, 3),
      catchup_b_cpu_ms_per_action: round(cpuCB / moved, 3),
      catchup_a_minstr_per_action: round(instrCA / 1e6 / moved, 3),
      catchup_b_minstr_per_action: round(instrCB / 1e6 / moved, 3),
      federation_platforms_bundled: bundled ? 1 : 0,
      catchup_10k_s: round((done - s0) / 1000, 2),
      catchup_10k_after_listen_s: round((done - listening) / 1000, 2),
      catchup_10k_transfer_s: round((done - firstMoved) / 1000, 2),
    };
    progress(
      `federation: B caught up ${last - before} actions in ${figures.catchup_10k_s} s from its start (${figures.catchup_10k_after_listen_s} s after listening, ${figures.catchup_10k_transfer_s} s from the first to the last); ` +
        `CPU/action A ${figures.catchup_a_cpu_ms_per_action} ms, B ${figures.catchup_b_cpu_ms_per_action} ms; instructions/action A ${figures.catchup_a_minstr_per_action} M, B ${figures.catchup_b_minstr_per_action} M`,
    );
    return figures;
  } finally {
    for (const s of sockets) s.close();
    for (const c of clients) c.close();
    await dbB.end().catch(() => {});
    await Promise.all(members.map((m) => m.proc?.stop()));
    for (const d of dirs) d.rm();
  }
}
