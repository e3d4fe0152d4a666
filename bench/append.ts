/**
 * Benchmark: the write path over HTTP — `POST /api/conversations/{key}/actions` with one
 * `message:add` each, from 10 concurrent clients (docs/benchmarks.md).
 */
import { connect, type Socket } from 'node:net';
import { countInstructions, countTreeInstructions, expectStatus, messageBody, percentile, processCpuMs, progress, round, type ConversationPair } from './support.ts';

/**
 * The writers' HTTP client: one keep-alive HTTP/1.1 connection, one request in flight. Each
 * request is written whole (head and JSON body) and each answer read whole — status line,
 * headers, exactly `content-length` bytes of body, parsed as JSON — before the next is sent.
 * It does with a fraction of the CPU of node:http's client (support.ts JsonClient: request
 * and response streams, an agent and a socket pool per request), whose cost counted in
 * `append_client_cpu_ms_per_action` — CPU taken from the two cores the platform and
 * PostgreSQL share: 0.33 M instructions per request here against 0.53 M for JsonClient and
 * 0.48 M for undici's Client, startup included (a canned-answer server, 20,000 requests).
 * What the platform receives is the same: the same requests, headers, bearer token and body.
 */
export class AppendClient {
  private socket: Socket | null = null;
  private buf: Buffer | null = null;
  private pending: { resolve: (r: { status: number; body: any }) => void; reject: (e: Error) => void } | null = null;

  /** @param base http://host:port of the platform; `token` a session's bearer token */
  constructor(
    base: string,
    private readonly token: string,
  ) {
    const u = new URL(base);
    this.host = u.hostname;
    this.port = Number(u.port);
  }
  private readonly host: string;
  private readonly port: number;

  private open(): Promise<Socket> {
    return new Promise((resolve, reject) => {
      const s = connect({ host: this.host, port: this.port, noDelay: true });
      s.once('connect', () => resolve(s));
      s.once('error', reject);
      s.on('data', (d: Buffer) => this.onData(d));
      s.on('error', (e) => this.fail(e));
      s.on('close', () => {
        if (this.socket === s) this.socket = null;
        this.fail(new Error('the platform closed the connection'));
      });
    });
  }

  private fail(e: Error): void {
    const p = this.pending;
    this.pending = null;
    this.buf = null;
    p?.reject(e);
  }

  private onData(d: Buffer): void {
    const b = (this.buf = this.buf ? Buffer.concat([this.buf, d]) : d);
    const end = b.indexOf('\r\n\r\n');
    if (end < 0) return;
    const head = b.toString('latin1', 0, end);
    const m = /^content-length:[ \t]*(\d+)[ \t]*$/im.exec(head);
    if (!m) return this.fail(new Error(`answer without content-length: ${head.slice(0, 300)}`));
    const bodyEnd = end + 4 + Number(m[1]);
    if (b.length < bodyEnd) return;
    if (b.length > bodyEnd) return this.fail(new Error('bytes after the answer while one request was in flight'));
    this.buf = null;
    const status = Number(/^HTTP\/1\.[01] (\d{3})/.exec(head)?.[1] ?? 0);
    const text = b.toString('utf8', end + 4, bodyEnd);
    let body: any = text;
    try {
      body = text ? JSON.parse(text) : null;
    } catch {
      /* not JSON: kept as text for the error message */
    }
    const p = this.pending;
    this.pending = null;
    p?.resolve({ status, body });
  }

  /** Sends one request with a JSON body; resolves with the status and the parsed JSON answer. */
  async request(method: string, path: string, body: unknown): Promise<{ status: number; body: any }> {
    if (this.pending) throw new Error('one request at a time');
    this.socket ??= await this.open();
    const payload = JSON.stringify(body);
    const head =
      `${method} ${path} HTTP/1.1\r\nhost: ${this.host}:${this.port}\r\nauthorization: Bearer ${this.token}\r\n` +
      `content-type: application/json\r\ncontent-length: ${Buffer.byteLength(payload)}\r\n\r\n`;
    return new Promise((resolve, reject) => {
      this.pending = { resolve, reject };
      this.socket!.write(head + payload);
    });
  }

  close(): void {
    this.socket?.destroy();
    this.socket = null;
  }
}

/** Figures of the append benchmark (keys of bench/results/latest.json). */
export interface AppendFigures {
  /** Actions committed per second over the measured requests (all clients together). */
  append_actions_per_s: number;
  /** Latency of one request (sent → full 200 response), ms. */
  append_p50_ms: number;
  append_p99_ms: number;
  append_max_ms: number;
  /** Requests measured (after the warm-up; fewer than asked when the time limit stopped it). */
  append_count: number;
  /** Concurrent clients (each its own user and conversation, one request in flight each). */
  append_clients: number;
  /** CPU the platform process used during the measured requests, in cores (1 = one core busy). */
  append_platform_cpu_cores: number;
  /** Platform CPU time per action, ms. */
  append_platform_cpu_ms_per_action: number;
  /** PostgreSQL CPU time per action (all its processes), ms; absent with DATABASE_URL. */
  append_pg_cpu_ms_per_action?: number;
  /** The benchmark client's own CPU time per action, ms (it shares the machine). */
  append_client_cpu_ms_per_action: number;
  /** Instructions per action (perf stat, user and kernel) of the platform process and of PostgreSQL's processes, millions; absent without perf (or, for PostgreSQL, with DATABASE_URL). */
  append_platform_minstr_per_action?: number;
  append_pg_minstr_per_action?: number;
}

/**
 * Each pair's writer adds messages to its own conversation in a closed loop (one request in
 * flight per client) until `total` requests have been answered; `warmup` requests first are
 * not measured (default 10,000, `BENCH_APPEND_WARMUP`: after 1,000 the platform was still
 * compiling through the measured run — 1.18 against 0.97–1.02 M instructions per append with
 * 5,000 to 20,000, session 8 — and a long-running platform compiled its code long before).
 * No request is started after `limitMs` (default 1 minute) of either phase.
 * @param platform the platform process (its CPU time is read from /proc) and its http://host:port
 * @param pgCpuMs reads the PostgreSQL server's CPU time (BenchDatabase.cpuMs)
 * @throws Error on any answer other than 200
 */
export async function benchAppend(
  pairs: ConversationPair[],
  platform: { pid: number; base: string },
  pgCpuMs: () => number | null,
  opts: { total?: number; warmup?: number; limitMs?: number; pgPids?: () => number[] | null } = {},
): Promise<AppendFigures> {
  const total = opts.total ?? 20_000;
  const warmup = opts.warmup ?? Number(process.env.BENCH_APPEND_WARMUP ?? 10_000);
  const limitMs = opts.limitMs ?? 60_000;
  const clients = pairs.map((p) => {
    if (!p.writer.token) throw new Error('append: a writer without a session token');
    return new AppendClient(platform.base, p.writer.token);
  });
  const run = async (count: number, latencies: number[] | null) => {
    let issued = 0;
    const stopAt = performance.now() + limitMs;
    await Promise.all(
      pairs.map(async (p, c) => {
        while (issued < count && performance.now() < stopAt) {
          const n = issued++;
          const t = performance.now();
          const r = await clients[c].request('POST', `/api/conversations/${p.key}/actions`, {
            actions: [{ act: 'message:add', body: messageBody(`append:${c}:${n}`) }],
          });
          const ms = performance.now() - t;
          expectStatus(r, 200, 'append');
          if (latencies) {
            latencies.push(ms);
            if (latencies.length % 5000 === 0) progress(`append: ${latencies.length}/${count}`);
          }
        }
      }),
    );
  };
  progress(`append: warm-up, ${warmup} requests`);
  try {
    await run(warmup, null);
    progress(`append: ${total} requests, ${pairs.length} concurrent clients`);
    const latencies: number[] = [];
    const cpu0 = processCpuMs(platform.pid);
    const pg0 = pgCpuMs();
    const client0 = process.cpuUsage();
    // PostgreSQL's backends for the platform's pool exist by now (the warm-up used them).
    const instrPlatform = countInstructions([platform.pid]);
    const instrPg = await countTreeInstructions(() => opts.pgPids?.() ?? []);
    await instrPlatform.ready();
    const t0 = performance.now();
    await run(total, latencies);
    const elapsedMs = performance.now() - t0;
    const [platformInstr, pgInstr] = [await instrPlatform.stop(), await instrPg.stop()];
    const done = latencies.length;
    if (done < total) progress(`append: time limit (${limitMs / 1000} s) reached after ${done} of ${total} requests`);
    const cpuMs = processCpuMs(platform.pid) - cpu0;
    const pg1 = pgCpuMs();
    const client = process.cpuUsage(client0);
    latencies.sort((a, b) => a - b);
    const figures: AppendFigures = {
      append_actions_per_s: round(done / (elapsedMs / 1000), 1),
      append_p50_ms: round(percentile(latencies, 50)),
      append_p99_ms: round(percentile(latencies, 99)),
      append_max_ms: round(latencies[latencies.length - 1]),
      append_count: done,
      append_clients: pairs.length,
      append_platform_cpu_cores: round(cpuMs / elapsedMs),
      append_platform_cpu_ms_per_action: round(cpuMs / done, 3),
      ...(pg0 !== null && pg1 !== null ? { append_pg_cpu_ms_per_action: round((pg1 - pg0) / done, 3) } : {}),
      append_client_cpu_ms_per_action: round((client.user + client.system) / 1000 / done, 3),
      ...(Number.isFinite(platformInstr) ? { append_platform_minstr_per_action: round(platformInstr / 1e6 / done, 3) } : {}),
      ...(Number.isFinite(pgInstr) ? { append_pg_minstr_per_action: round(pgInstr / 1e6 / done, 3) } : {}),
    };
    progress(`append: ${figures.append_actions_per_s} actions/s, p50 ${figures.append_p50_ms} ms, p99 ${figures.append_p99_ms} ms`);
    return figures;
  } finally {
    for (const c of clients) c.close();
  }
}
