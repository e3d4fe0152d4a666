/**
 * Shared plumbing of the benchmarks (docs/benchmarks.md): an isolated PostgreSQL, platform
 * child processes, users and sessions, a light keep-alive HTTP client, percentiles, progress
 * on stderr. Everything runs on loopback.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, mkdtempSync, readFileSync, readdirSync, readlinkSync, rmSync } from 'node:fs';
import http from 'node:http';
import { createServer, connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { randomBytes } from 'node:crypto';
import pg from 'pg';
import { createUser } from '../src/accounts/users.ts';
import { loadConfig } from '../src/platform/config.ts';
import { createLogger } from '../src/platform/logger.ts';
import { systemClock } from '../src/platform/clock.ts';
import { BlobStore } from '../src/platform/blobs.ts';
import { openDb } from '../src/store/db.ts';
import { migrate } from '../src/store/migrate.ts';
import { childPids, startEmbeddedPostgres } from '../src/store/embedded.ts';
import type { Deps } from '../src/context.ts';

/** Repository root (the benchmarks spawn `node bin/parley.js` from here). */
export const ROOT = resolve(import.meta.dirname, '..');
/** The `parley` command. */
export const PARLEY_BIN = join(ROOT, 'bin', 'parley.js');
/** The mail domain of every benchmark platform. */
export const BENCH_DOMAIN = 'bench.test';
/** The password of every benchmark user. */
export const BENCH_PASSWORD = 'bench password 1234';
/** The SpamAssassin easy_ham corpus (2,403 messages, one .eml file each); BENCH_EASY_HAM overrides the path. */
export const EASY_HAM = resolve(process.env.BENCH_EASY_HAM ?? join(ROOT, '..', 'shared', 'corpus', 'email', 'spamassassin-publiccorpus-easy_ham'));

const started = performance.now();

const cleanups = new Set<() => Promise<void>>();
/** Registers work to do if the run is interrupted (SIGINT/SIGTERM); returns its unregister function. */
export function onCleanup(fn: () => Promise<void>): () => void {
  cleanups.add(fn);
  return () => void cleanups.delete(fn);
}
/** Runs every registered cleanup, newest first (run.ts calls it on SIGINT/SIGTERM). */
export async function cleanupAll(): Promise<void> {
  for (const fn of [...cleanups].reverse()) await fn().catch(() => {});
  cleanups.clear();
}

/** Progress line on stderr, prefixed with the seconds since the run began. */
export function progress(msg: string): void {
  process.stderr.write(`[bench ${((performance.now() - started) / 1000).toFixed(1).padStart(6)}s] ${msg}\n`);
}

/** A free TCP port on 127.0.0.1 (bound then released). */
export function freePort(): Promise<number> {
  return new Promise((res, rej) => {
    const s = createServer();
    s.on('error', rej);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as { port: number };
      s.close(() => res(port));
    });
  });
}

/** The nearest-rank percentile `p` (0–100) of `sorted` (ascending). */
export function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return NaN;
  const rank = Math.ceil((p / 100) * sorted.length);
  return sorted[Math.min(sorted.length - 1, Math.max(0, rank - 1))];
}

/** Rounds to `digits` decimals (the JSON stays readable). */
export function round(x: number, digits = 2): number {
  const f = 10 ** digits;
  return Math.round(x * f) / f;
}

/** A PostgreSQL server on which each benchmark gets a fresh database. */
export interface BenchDatabase {
  /** URL of the server's maintenance database (for samplers that watch every database). */
  adminUrl: string;
  /** Creates an empty database and returns its URL. */
  createDatabase(prefix: string): Promise<string>;
  /**
   * CPU time (user + system, ms) used so far by the embedded server's processes (postmaster
   * and its children alive now); null with DATABASE_URL (the server may be elsewhere).
   */
  cpuMs(): number | null;
  /** The embedded server's processes alive now (postmaster and children); null with DATABASE_URL. */
  pids(): number[] | null;
  /** Drops the databases it created and stops the server if it started one. */
  stop(): Promise<void>;
}

/**
 * The PostgreSQL of one benchmark (bench/run.ts starts one per benchmark): `DATABASE_URL` when given (its role must be allowed to
 * CREATE DATABASE; each benchmark gets `bench_<name>_<random>`, dropped at the end), else an
 * embedded PostgreSQL (src/store/embedded.ts, fsync on, as `parley start` runs it) in a
 * temporary directory on a free port, removed at the end.
 */
export async function startDatabase(): Promise<BenchDatabase> {
  let adminUrl = process.env.DATABASE_URL ?? '';
  let stopServer = async () => {};
  let postmasterPid: number | null = null;
  if (!adminUrl) {
    const dir = mkdtempSync(join(tmpdir(), 'parley-bench-'));
    chmodSync(dir, 0o755); // as root the server runs as the `postgres` user, which must reach it
    const port = await freePort();
    progress(`starting embedded PostgreSQL in ${dir} on port ${port}`);
    const embedded = await startEmbeddedPostgres(join(dir, 'pg'), port);
    adminUrl = embedded.adminUrl;
    postmasterPid = Number(readFileSync(join(dir, 'pg', 'postmaster.pid'), 'utf8').split('\n')[0]);
    const unregister = onCleanup(() => stopServer());
    stopServer = async () => {
      unregister();
      await embedded.stop();
      rmSync(dir, { recursive: true, force: true });
    };
  } else {
    progress('using the PostgreSQL of DATABASE_URL');
  }
  const created: string[] = [];
  const admin = async (q: string) => {
    const c = new pg.Client({ connectionString: adminUrl });
    await c.connect();
    try {
      await c.query(q);
    } finally {
      await c.end();
    }
  };
  return {
    adminUrl,
    cpuMs: () => (postmasterPid === null ? null : treeCpuMs(postmasterPid)),
    pids: () => (postmasterPid === null ? null : [postmasterPid, ...childPids(postmasterPid)]),
    async createDatabase(prefix) {
      const name = `bench_${prefix}_${randomBytes(4).toString('hex')}`;
      await admin(`create database ${name}`);
      created.push(name);
      const url = new URL(adminUrl);
      url.pathname = `/${name}`;
      return url.toString();
    },
    async stop() {
      for (const name of created) await admin(`drop database if exists ${name} with (force)`).catch(() => {});
      await stopServer();
    },
  };
}

/** The environment of a `parley` child process on `databaseUrl`. */
export function parleyEnv(databaseUrl: string, dataDir: string, extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  return {
    ...process.env,
    DATABASE_URL: databaseUrl,
    PARLEY_DOMAINS: BENCH_DOMAIN,
    PARLEY_DATA_DIR: dataDir,
    PARLEY_DNS_OFFLINE: '1',
    PARLEY_LOG_LEVEL: 'warn',
    ...extra,
  };
}

/**
 * Opens the dependencies of in-process setup work (migrations, users) on `databaseUrl`.
 * The caller closes `deps.db`.
 */
export async function openSetupDeps(databaseUrl: string, dataDir: string): Promise<Deps> {
  const config = loadConfig({}, undefined, { domains: [BENCH_DOMAIN], databaseUrl, dataDir, dnsOffline: true, logLevel: 'warn' });
  const db = openDb(databaseUrl, 4);
  await migrate(db.pool);
  return { db, config, log: createLogger('bench', 'warn'), clock: systemClock, blobs: new BlobStore(join(dataDir, 'blobs')) };
}

/** Creates users (password BENCH_PASSWORD) with the platform's own createUser. */
export async function createUsers(databaseUrl: string, dataDir: string, addresses: string[]): Promise<void> {
  const deps = await openSetupDeps(databaseUrl, dataDir);
  try {
    for (const address of addresses) await createUser(deps, { address, password: BENCH_PASSWORD });
  } finally {
    await deps.db.close();
  }
}

/** A benchmark's own temporary data directory (PARLEY_DATA_DIR), removed by `rm()`. */
export function tempDataDir(name: string): { dir: string; rm(): void } {
  const dir = mkdtempSync(join(tmpdir(), `parley-bench-${name}-`));
  const rm = () => rmSync(dir, { recursive: true, force: true });
  const unregister = onCleanup(async () => rm());
  return {
    dir,
    rm: () => {
      unregister();
      rm();
    },
  };
}

/** Memory of a process from /proc/<pid>/status, in MiB: resident now and peak resident. */
export function processMemoryMb(pid: number): { rss: number; hwm: number } {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = (field: string) => Number(new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(status)?.[1] ?? NaN);
  return { rss: kb('VmRSS') / 1024, hwm: kb('VmHWM') / 1024 };
}

/**
 * Captures a child's output: the last lines are kept for error messages and echoed to
 * stderr (capped); `stdoutLines` (if given) receives every stdout line.
 */
/** Lines of a child's output echoed to stderr (BENCH_ECHO_LINES overrides, e.g. to read a --trace-opt log whole). */
const ECHO_LINES = Number(process.env.BENCH_ECHO_LINES ?? 200);

function captureOutput(child: ChildProcess, label: string, stdoutLines?: string[]): () => string {
  const tail: string[] = [];
  let echoed = 0;
  const onLine = (line: string, fromStdout: boolean) => {
    if (fromStdout && stdoutLines) stdoutLines.push(line);
    if (!line.trim()) return;
    tail.push(line);
    if (tail.length > 40) tail.shift();
    if (echoed < ECHO_LINES) process.stderr.write(`  [${label}] ${line.length > 300 ? `${line.slice(0, 300)}…` : line}\n`);
    else if (echoed === ECHO_LINES) process.stderr.write(`  [${label}] … (further output not shown)\n`);
    echoed++;
  };
  for (const stream of [child.stdout, child.stderr]) {
    let buf = '';
    const fromStdout = stream === child.stdout;
    stream?.setEncoding('utf8');
    stream?.on('data', (d: string) => {
      buf += d;
      const lines = buf.split(/\r?\n|\r/);
      buf = lines.pop()!;
      for (const line of lines) onLine(line, fromStdout);
    });
    stream?.on('end', () => buf && onLine(buf, fromStdout));
  }
  return () => tail.join('\n');
}

/** Resolves when `port` accepts a TCP connection on 127.0.0.1. */
function portOpen(port: number): Promise<boolean> {
  return new Promise((res) => {
    const s = connect({ host: '127.0.0.1', port });
    s.once('connect', () => (s.destroy(), res(true)));
    s.once('error', () => res(false));
  });
}

/** A platform running as its own process (`node bin/parley.js start`). */
export interface PlatformProcess {
  pid: number;
  /** http://127.0.0.1:<port> (web role) */
  base: string;
  httpPort: number;
  smtpPort: number;
  /** Stops it with SIGTERM (SIGKILL after 10 s). */
  stop(): Promise<void>;
}

/**
 * Starts `node bin/parley.js start --roles <roles>` on `databaseUrl` with HTTP and SMTP on
 * free loopback ports, DNS offline, logs at warn; resolves when its ports answer.
 * @throws Error with the process's last output if it exits or is not up within 60 s
 */
export async function startPlatformProcess(opts: { databaseUrl: string; dataDir: string; roles: string[] }): Promise<PlatformProcess> {
  const httpPort = await freePort();
  const smtpPort = await freePort();
  // BENCH_PLATFORM_NODE_ARGS: extra node flags for the platform, e.g. "--cpu-prof --cpu-prof-dir=/tmp/prof".
  const nodeArgs = (process.env.BENCH_PLATFORM_NODE_ARGS ?? '').split(' ').filter(Boolean);
  const child = spawn(process.execPath, [...nodeArgs, PARLEY_BIN, 'start', '--roles', opts.roles.join(',')], {
    cwd: ROOT,
    env: parleyEnv(opts.databaseUrl, opts.dataDir, {
      PARLEY_HTTP_PORT: String(httpPort),
      PARLEY_SMTP_PORT: String(smtpPort),
      PARLEY_BASE_URL: `http://127.0.0.1:${httpPort}`,
    }),
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const output = captureOutput(child, 'platform');
  const unregister = onCleanup(async () => void child.kill('SIGKILL'));
  let exited: string | null = null;
  const exit = new Promise<void>((res) =>
    child.once('exit', (code, signal) => {
      exited = `exited with ${code ?? signal}`;
      res();
    }),
  );
  const base = `http://127.0.0.1:${httpPort}`;
  const deadline = Date.now() + 60_000;
  const wanted = [...(opts.roles.includes('web') ? [httpPort] : []), ...(opts.roles.includes('smtp') ? [smtpPort] : [])];
  for (;;) {
    if (exited) throw new Error(`platform ${exited} before listening:\n${output()}`);
    const up = await Promise.all(wanted.map(portOpen));
    if (up.every(Boolean)) break;
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      const missing = wanted.filter((_, i) => !up[i]);
      throw new Error(`platform not listening on port(s) ${missing.join(', ')} after 60 s (roles ${opts.roles.join(',')}):\n${output()}`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  return {
    pid: child.pid!,
    base,
    httpPort,
    smtpPort,
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

/**
 * Runs `node bin/parley.js <args>` to completion, killing it after `timeoutMs`.
 * @throws Error when it had to be killed
 * @returns exit code, wall time in ms (spawn to exit), its CPU time in ms, its instructions
 *   (perf stat from just after the spawn; NaN without perf), the last lines of output and all of stdout
 */
export async function runParley(
  args: string[],
  env: NodeJS.ProcessEnv,
  label = 'parley',
  timeoutMs = 300_000,
): Promise<{ code: number; ms: number; cpuMs: number; instructions: number; output: string; stdout: string }> {
  const t0 = performance.now();
  // BENCH_CLI_NODE_ARGS: extra node flags for CLI runs, e.g. "--cpu-prof --cpu-prof-dir=/tmp/prof".
  const nodeArgs = (process.env.BENCH_CLI_NODE_ARGS ?? '').split(' ').filter(Boolean);
  const child = spawn(process.execPath, [...nodeArgs, PARLEY_BIN, ...args], { cwd: ROOT, env, stdio: ['ignore', 'pipe', 'pipe'] });
  const unregister = onCleanup(async () => void child.kill('SIGKILL'));
  const instructions = child.pid === undefined ? null : countInstructions([child.pid]);
  const stdout: string[] = [];
  const output = captureOutput(child, label, stdout);
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    child.kill('SIGKILL');
  }, timeoutMs);
  const cpu0 = exitedChildrenCpuMs();
  const code = await new Promise<number>((res) => child.once('close', (c, s) => res(c ?? (s ? 128 : 0))));
  clearTimeout(timer);
  unregister();
  if (timedOut) throw new Error(`parley ${args.join(' ')} did not finish within ${timeoutMs / 1000} s (killed):\n${output()}`);
  const instr = instructions ? await instructions.stop() : NaN;
  // Children exit one at a time here, so the growth of cutime+cstime is this child's CPU time.
  return { code, ms: performance.now() - t0, cpuMs: exitedChildrenCpuMs() - cpu0, instructions: instr, output: output(), stdout: stdout.join('\n') };
}

/** A keep-alive HTTP/1.1 JSON client (lighter than fetch, so the client steals little CPU). */
export class JsonClient {
  readonly agent: http.Agent;
  private readonly url: URL;
  constructor(base: string, readonly token: string | null = null, maxSockets = 16) {
    this.url = new URL(base);
    this.agent = new http.Agent({ keepAlive: true, maxSockets });
  }
  /** Sends one request; resolves with status and parsed JSON body (or raw text). */
  request(method: string, path: string, body?: unknown): Promise<{ status: number; body: any }> {
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    const headers: http.OutgoingHttpHeaders = {};
    if (payload) {
      headers['content-type'] = 'application/json';
      headers['content-length'] = payload.length;
    }
    if (this.token) headers.authorization = `Bearer ${this.token}`;
    return new Promise((res, rej) => {
      const req = http.request(
        { host: this.url.hostname, port: this.url.port, method, path, headers, agent: this.agent },
        (r) => {
          const chunks: Buffer[] = [];
          r.on('data', (c: Buffer) => chunks.push(c));
          r.on('end', () => {
            const text = Buffer.concat(chunks).toString('utf8');
            let parsed: any = text;
            try {
              parsed = text ? JSON.parse(text) : null;
            } catch {
              /* not JSON */
            }
            res({ status: r.statusCode ?? 0, body: parsed });
          });
          r.on('error', rej);
        },
      );
      req.on('error', rej);
      req.end(payload);
    });
  }
  close(): void {
    this.agent.destroy();
  }
}

/** Logs `address` in (POST /api/login) and returns a client carrying its bearer token. */
export async function login(base: string, address: string): Promise<JsonClient> {
  const anon = new JsonClient(base);
  const r = await anon.request('POST', '/api/login', { address, password: BENCH_PASSWORD, device: 'bench' });
  anon.close();
  if (r.status !== 200 || typeof r.body?.token !== 'string') throw new Error(`login of ${address} failed: ${r.status} ${JSON.stringify(r.body)}`);
  return new JsonClient(base, r.body.token);
}

/** Throws unless `r` has status `want`. */
export function expectStatus(r: { status: number; body: any }, want: number, what: string): void {
  if (r.status !== want) throw new Error(`${what}: HTTP ${r.status} ${JSON.stringify(r.body).slice(0, 500)}`);
}

/** Fields of /proc/<pid>/stat after the command name: [0] is field 3 (state), [1] the ppid. */
function statFields(pid: number): string[] {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  return stat.slice(stat.lastIndexOf(')') + 2).split(' ');
}

/** CPU time (user + system) a process has used so far, in ms, from /proc/<pid>/stat. */
export function processCpuMs(pid: number): number {
  const fields = statFields(pid);
  // utime and stime are fields 14 and 15, in clock ticks (100/s on Linux)
  return (Number(fields[11]) + Number(fields[12])) * 10;
}

/**
 * CPU time the whole machine has spent busy so far (all cores: user, nice, system, irq,
 * softirq from /proc/stat's first line; steal, time the hypervisor gave to others, apart), in ms. The difference of two readings over
 * an interval, divided by the interval, is the number of cores busy in it.
 */
export function machineBusyMs(): number {
  const [, user, nice, system, , , irq, softirq] = readFileSync('/proc/stat', 'utf8').split('\n', 1)[0].trim().split(/\s+/).map(Number);
  return (user + nice + system + irq + softirq) * 10;
}

/** CPU time (ms) of this process's children that have exited and been waited for (cutime + cstime). */
export function exitedChildrenCpuMs(): number {
  const f = statFields(process.pid);
  return (Number(f[13]) + Number(f[14])) * 10;
}

/**
 * CPU time (ms) of `pid`, its live children and its exited children (PostgreSQL: the
 * postmaster, its backends, and the backends of connections closed meanwhile, which the
 * postmaster has reaped into its cutime/cstime).
 */
export function treeCpuMs(pid: number): number {
  const own = statFields(pid);
  let total = (Number(own[11]) + Number(own[12]) + Number(own[13]) + Number(own[14])) * 10;
  for (const child of childPids(pid)) {
    try {
      const f = statFields(child);
      total += (Number(f[11]) + Number(f[12])) * 10;
    } catch {
      /* exited meanwhile */
    }
  }
  return total;
}

/**
 * Counts the instructions (user and kernel, `perf stat -e instructions`) of the processes
 * `pids` (each with its threads) from now until `stop()`, which resolves with the count —
 * NaN when perf is missing, not allowed, or `pids` is empty. Instructions per operation vary
 * far less than CPU time with the machine's speed and load (docs/benchmarks.md).
 */
export function countInstructions(pids: number[]): { ready(): Promise<void>; stop(): Promise<number> } {
  const out = join(tmpdir(), `parley-perf-${process.pid}-${randomBytes(4).toString('hex')}.csv`);
  let child: ChildProcess | null = null;
  let exited: Promise<unknown> = Promise.resolve();
  if (pids.length > 0) {
    try {
      child = spawn('perf', ['stat', '-x,', '-e', 'instructions', '-o', out, '-p', pids.join(',')], { stdio: 'ignore' });
      exited = new Promise((r) => child!.once('exit', r));
      child.on('error', () => (child = null));
    } catch {
      child = null;
    }
  }
  return {
    async ready() {
      // perf has attached once it holds a perf_event descriptor per thread of `pids`
      const threads = pids.reduce((n, pid) => n + threadCount(pid), 0);
      const deadline = Date.now() + 2000;
      while (child?.pid !== undefined && child.exitCode === null && perfEvents(child.pid) < threads && Date.now() < deadline)
        await new Promise((r) => setTimeout(r, 5));
    },
    async stop() {
      if (!child) return NaN;
      // perf ends by itself when the processes it counts have all exited (its file is then written).
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGINT');
      await exited;
      try {
        const line = readFileSync(out, 'utf8').split('\n').find((l) => l.includes('instructions'));
        const n = Number(line?.split(',')[0]);
        return Number.isFinite(n) ? n : NaN;
      } catch {
        return NaN;
      } finally {
        rmSync(out, { force: true });
      }
    },
  };
}

/** Threads of process `pid` now (0 when it is gone). */
function threadCount(pid: number): number {
  try {
    return readdirSync(`/proc/${pid}/task`).length;
  } catch {
    return 0;
  }
}

/** perf_event descriptors process `pid` holds open. */
function perfEvents(pid: number): number {
  try {
    return readdirSync(`/proc/${pid}/fd`).filter((fd) => {
      try {
        return readlinkSync(`/proc/${pid}/fd/${fd}`) === 'anon_inode:[perf_event]';
      } catch {
        return false;
      }
    }).length;
  } catch {
    return 0;
  }
}

/**
 * {@link countInstructions} for a changing set of processes — PostgreSQL's postmaster and its
 * backends (`list()`, e.g. BenchDatabase.pids) — counted from when this resolves: a backend
 * forked after perf attached counts through the postmaster's inherited counter, but one forked
 * between `list()` and the attach was missed — the platform's pool opening connections as the
 * measured run began — and the SMTP run reported 2–5 instead of ≈ 9 M PostgreSQL instructions
 * per message in about half its runs (session 8). So this waits until perf has attached, lists
 * again and counts the newcomers too (from then; what they did in those few milliseconds is
 * not counted).
 */
export async function countTreeInstructions(list: () => number[]): Promise<{ stop(): Promise<number> }> {
  const first = list();
  const a = countInstructions(first);
  await a.ready();
  const known = new Set(first);
  const late = list().filter((pid) => !known.has(pid));
  const b = late.length > 0 ? countInstructions(late) : null;
  await b?.ready();
  return {
    async stop() {
      const [x, y] = await Promise.all([a.stop(), b ? b.stop() : Promise.resolve(0)]);
      return x + y;
    },
  };
}

/** One writer and one reader sharing a conversation (append and websocket benchmarks). */
export interface ConversationPair {
  /** The writer's API client. */
  writer: JsonClient;
  /** The reader's API client (its token opens the websocket). */
  reader: JsonClient;
  /** The conversation's key. */
  key: string;
}

/**
 * Creates `n` writers `w<i>@bench.test` and readers `r<i>@bench.test`, logs them in, and has
 * each writer start a published conversation with its reader: `n` conversations of two local
 * participants, one writer each.
 */
export async function setupPairs(platform: PlatformProcess, databaseUrl: string, dataDir: string, n: number): Promise<ConversationPair[]> {
  const writers = Array.from({ length: n }, (_, i) => `w${i}@${BENCH_DOMAIN}`);
  const readers = Array.from({ length: n }, (_, i) => `r${i}@${BENCH_DOMAIN}`);
  await createUsers(databaseUrl, dataDir, [...writers, ...readers]);
  const pairs: ConversationPair[] = [];
  for (let i = 0; i < n; i++) {
    const writer = await login(platform.base, writers[i]);
    const reader = await login(platform.base, readers[i]);
    const r = await writer.request('POST', '/api/conversations', {
      subject: `Benchmark conversation ${i}`,
      participants: [readers[i]],
      messages: [{ body: 'First message of the benchmark conversation.' }],
    });
    expectStatus(r, 201, 'create conversation');
    pairs.push({ writer, reader, key: r.body.key });
  }
  return pairs;
}

/** A message body of about 200 characters of English text, tagged with `tag` first. */
export function messageBody(tag: string): string {
  return `${tag} Thanks for the notes from yesterday's meeting. I have gone through the draft agreement and left comments on sections three and five; could you check the delivery dates before Friday?`;
}

/**
 * Samples pg_stat_activity every `everyMs` while `fn` runs and returns how often each wait
 * (`type:event`, or `cpu` for an active backend not waiting) was seen among the active
 * client backends of the server of `databaseUrl` (every database but the sampler's own
 * connection) — a poor man's wait profile of PostgreSQL, for profiling (docs/benchmarks.md).
 */
export async function sampleWaits<T>(databaseUrl: string, fn: () => Promise<T>, everyMs = 10): Promise<{ result: T; waits: [string, number][] }> {
  const c = new pg.Client({ connectionString: databaseUrl });
  await c.connect();
  const seen = new Map<string, number>();
  let running = true;
  const loop = (async () => {
    while (running) {
      const r = await c.query(
        `select coalesce(wait_event_type || ':' || wait_event, 'cpu') as w, count(*)::int as n
           from pg_stat_activity
          where backend_type = 'client backend' and state = 'active' and pid <> pg_backend_pid()
          group by 1`,
      );
      for (const row of r.rows) seen.set(row.w, (seen.get(row.w) ?? 0) + row.n);
      await new Promise((res) => setTimeout(res, everyMs));
    }
  })();
  try {
    const result = await fn();
    return { result, waits: [...seen.entries()].sort((a, b) => b[1] - a[1]) };
  } finally {
    running = false;
    await loop.catch(() => {});
    await c.end();
  }
}
