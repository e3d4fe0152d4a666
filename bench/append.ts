/**
 * Benchmark: the write path over HTTP — `POST /api/conversations/{key}/actions` with one
 * `message:add` each, from 10 concurrent clients (docs/benchmarks.md).
 */
import { expectStatus, messageBody, percentile, processCpuMs, progress, round, type ConversationPair } from './support.ts';

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
}

/**
 * Each pair's writer adds messages to its own conversation in a closed loop (one request in
 * flight per client) until `total` requests have been answered; `warmup` requests first are
 * not measured. No request is started after `limitMs` (default 1 minute) of either phase.
 * @param platformPid the platform process, whose CPU time is read from /proc
 * @param pgCpuMs reads the PostgreSQL server's CPU time (BenchDatabase.cpuMs)
 * @throws Error on any answer other than 200
 */
export async function benchAppend(
  pairs: ConversationPair[],
  platformPid: number,
  pgCpuMs: () => number | null,
  opts: { total?: number; warmup?: number; limitMs?: number } = {},
): Promise<AppendFigures> {
  const total = opts.total ?? 20_000;
  const warmup = opts.warmup ?? 1_000;
  const limitMs = opts.limitMs ?? 60_000;
  const run = async (count: number, latencies: number[] | null) => {
    let issued = 0;
    const stopAt = performance.now() + limitMs;
    await Promise.all(
      pairs.map(async (p, c) => {
        while (issued < count && performance.now() < stopAt) {
          const n = issued++;
          const t = performance.now();
          const r = await p.writer.request('POST', `/api/conversations/${p.key}/actions`, {
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
  await run(warmup, null);
  progress(`append: ${total} requests, ${pairs.length} concurrent clients`);
  const latencies: number[] = [];
  const cpu0 = processCpuMs(platformPid);
  const pg0 = pgCpuMs();
  const client0 = process.cpuUsage();
  const t0 = performance.now();
  await run(total, latencies);
  const elapsedMs = performance.now() - t0;
  const done = latencies.length;
  if (done < total) progress(`append: time limit (${limitMs / 1000} s) reached after ${done} of ${total} requests`);
  const cpuMs = processCpuMs(platformPid) - cpu0;
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
  };
  progress(`append: ${figures.append_actions_per_s} actions/s, p50 ${figures.append_p50_ms} ms, p99 ${figures.append_p99_ms} ms`);
  return figures;
}
