/**
 * Benchmark: inbound SMTP — a direct SMTP client (nodemailer, pooled, 4 connections) sends
 * raw easy_ham messages to a platform's smtp role for one local user (docs/benchmarks.md).
 */
import { execFileSync } from 'node:child_process';
import { readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import nodemailer from 'nodemailer';
import pg from 'pg';
// @ts-expect-error — a plain ES module without types (scripts/cli-bundle.mjs)
import { bundleIsCurrent } from '../scripts/cli-bundle.mjs';
import {
  BENCH_DOMAIN,
  EASY_HAM,
  countInstructions,
  countTreeInstructions,
  ROOT,
  createUsers,
  percentile,
  processCpuMs,
  progress,
  round,
  startPlatformProcess,
  tempDataDir,
  type BenchDatabase,
} from './support.ts';

/** Figures of the SMTP benchmark (keys of bench/results/latest.json). */
export interface SmtpFigures {
  /** Messages answered 250 per second, over the measured batch (first send to last 250). */
  smtp_receive_msgs_per_s: number;
  /** Messages in the measured batch (fewer than asked when the time limit stopped it). */
  smtp_receive_messages: number;
  /** Per-message time from handing it to the pool (a connection free) to its 250, ms. */
  smtp_receive_p50_ms: number;
  smtp_receive_p99_ms: number;
  /** CPU time per message of the platform process, of PostgreSQL (absent with DATABASE_URL) and of this client, ms. */
  smtp_platform_cpu_ms_per_msg: number;
  smtp_pg_cpu_ms_per_msg?: number;
  smtp_client_cpu_ms_per_msg: number;
  /** Instructions per message of the platform process and of PostgreSQL (perf stat; absent without perf), millions — steadier than CPU time on a VM whose speed varies. */
  smtp_platform_minstr_per_msg?: number;
  smtp_pg_minstr_per_msg?: number;
  /** Messages stored in the database at the end (warm-up included), a check that every 250 was committed. */
  smtp_messages_stored: number;
  /** 1 when the platform ran the CLI bundle (dist/parley.mjs, built as `npm install` does), 0 when the sources through tsx (sources changed meanwhile). */
  smtp_platform_bundled: number;
}

/**
 * Messages sent to another mailbox before the measured ones (BENCH_SMTP_SERVER_WARMUP
 * overrides; 0: none). The platform is a long-running server, and V8 optimises the functions
 * of mailparser, mailauth, smtp-server and the write path as they become hot: with a warm-up
 * of 100 messages it was still compiling through the whole measured run (≈ 550 TurboFan
 * compilations, ≈ 4 s of CPU for 2,000 messages: 20–30 % of the platform's instructions,
 * 2026-11-22), which a server receiving mail for days does once.
 */
export const SERVER_WARMUP = 2000;

/**
 * A corpus message for the server warm-up: one header field more (so its bytes, hence its
 * raw blob, are new) and its Message-ID, In-Reply-To and References ids prefixed with
 * `warm-up.` in the header section (so it threads among warm-up copies only).
 */
export function warmUpCopy(raw: Buffer, n: number): Buffer {
  const text = raw.toString('latin1');
  const end = text.search(/\r?\n\r?\n/);
  const head = (end < 0 ? text : text.slice(0, end)).replace(/^(message-id|in-reply-to|references)(:(?:.*)(?:\r?\n[ \t].*)*)/gim, (_all, name: string, rest: string) => name + rest.replace(/</g, '<warm-up.'));
  return Buffer.from(`X-Parley-Bench: warm-up ${n}\r\n${head}${end < 0 ? '' : text.slice(end)}`, 'latin1');
}

/** The corpus's raw messages, in file order, without the mbox `From ` line that precedes the header. */
export function loadRawMessages(dir: string): { from: string; raw: Buffer }[] {
  return readdirSync(dir)
    .filter((f) => f.endsWith('.eml'))
    .sort()
    .map((f) => {
      let text = readFileSync(join(dir, f), 'latin1');
      if (text.startsWith('From ')) text = text.slice(text.indexOf('\n') + 1);
      const rp = /^Return-Path:\s*<([^<>\s]*@[^<>\s]*)>/im.exec(text);
      return { from: rp?.[1] ?? 'sender@example.org', raw: Buffer.from(text, 'latin1') };
    });
}

/**
 * Starts a platform with `--roles smtp` on a fresh database with one local user, sends
 * `warmup` messages (not measured), then `count` more through a pool of 4 SMTP connections
 * kept busy by 4 senders; the clock stops when the last has been answered 250. No new
 * message is sent after `limitMs` (default 1 minute): the figure then covers those sent.
 * @throws Error when a message is refused (the figure would be meaningless)
 */
export async function benchSmtpReceive(
  database: BenchDatabase,
  opts: { count?: number; warmup?: number; serverWarmup?: number; limitMs?: number } = {},
): Promise<SmtpFigures> {
  const count = opts.count ?? 2000;
  const warmup = opts.warmup ?? 100;
  const serverWarmup = opts.serverWarmup ?? Number(process.env.BENCH_SMTP_SERVER_WARMUP ?? SERVER_WARMUP);
  const limitMs = opts.limitMs ?? 60_000;
  const messages = loadRawMessages(EASY_HAM);
  if (messages.length < warmup + count) throw new Error(`the corpus has ${messages.length} messages; need ${warmup + count}`);
  const url = await database.createDatabase('smtp');
  const data = tempDataDir('smtp');
  const rcpt = `inbox@${BENCH_DOMAIN}`;
  const warmRcpt = `warm-up@${BENCH_DOMAIN}`;
  await createUsers(url, data.dir, [rcpt, warmRcpt]);
  // The platform as installed: `npm install` builds the CLI bundle (the `prepare` script).
  execFileSync(process.execPath, [join(ROOT, 'scripts', 'build-cli.mjs')], { stdio: ['ignore', 'ignore', 'inherit'] });
  const bundled: boolean = bundleIsCurrent();
  progress(`smtp: starting platform (--roles smtp, ${bundled ? 'bundle' : 'sources through tsx'})`);
  const platform = await startPlatformProcess({ databaseUrl: url, dataDir: data.dir, roles: ['smtp'] });
  const transport = nodemailer.createTransport({
    pool: true,
    maxConnections: 4,
    maxMessages: Infinity,
    host: '127.0.0.1',
    port: platform.smtpPort,
    secure: false,
    ignoreTLS: true,
    name: 'bench.client.test',
    connectionTimeout: 10_000,
    socketTimeout: 60_000,
  });
  const send = async (m: { from: string; raw: Buffer }, to = rcpt): Promise<void> => {
    const info = await transport.sendMail({ envelope: { from: m.from, to: [to] }, raw: m.raw });
    if (!/^250[ -]/.test(String(info.response))) throw new Error(`unexpected SMTP answer: ${info.response}`);
  };
  try {
    progress(`smtp: warm-up, ${warmup} messages`);
    await Promise.all(messages.slice(0, warmup).map((m) => send(m)));
    if (serverWarmup > 0) {
      // The server's own warm-up (see SERVER_WARMUP): the corpus again, to another mailbox,
      // each message made new (warmUpCopy) so that nothing of it is a duplicate of, or a
      // thread for, the measured messages.
      progress(`smtp: warming the server up with ${serverWarmup} messages to ${warmRcpt}`);
      const marked = messages.slice(warmup + count).concat(messages.slice(0, warmup + count));
      let i = 0;
      await Promise.all(
        Array.from({ length: 4 }, async () => {
          while (i < serverWarmup) {
            const m = marked[i++ % marked.length];
            await send({ from: m.from, raw: warmUpCopy(m.raw, i) }, warmRcpt);
          }
        }),
      );
    }
    progress(`smtp: sending ${count} messages over 4 pooled connections`);
    // Four senders keep the pool's four connections busy: each hands the pool its next
    // message as soon as its previous one got its 250, so the latency is the server's.
    const batch = messages.slice(warmup, warmup + count);
    const latencies: number[] = [];
    let next = 0;
    const cpu0 = processCpuMs(platform.pid);
    const pg0 = database.cpuMs();
    const client0 = process.cpuUsage();
    const instrPlatform = countInstructions([platform.pid]);
    const instrPg = await countTreeInstructions(() => database.pids() ?? []);
    await instrPlatform.ready();
    const t0 = performance.now();
    await Promise.all(
      Array.from({ length: 4 }, async () => {
        while (next < batch.length && performance.now() - t0 < limitMs) {
          const m = batch[next++];
          const s = performance.now();
          await send(m);
          latencies.push(performance.now() - s);
          if (latencies.length % 500 === 0) progress(`smtp: ${latencies.length}/${count} answered 250`);
        }
      }),
    );
    const elapsed = (performance.now() - t0) / 1000;
    const sent = latencies.length;
    const cpuMs = processCpuMs(platform.pid) - cpu0;
    const pg1 = database.cpuMs();
    const client = process.cpuUsage(client0);
    const [platformInstr, pgInstr] = await Promise.all([instrPlatform.stop(), instrPg.stop()]);
    if (sent < count) progress(`smtp: time limit (${limitMs / 1000} s) reached after ${sent} of ${count} messages`);
    latencies.sort((a, b) => a - b);
    const c = new pg.Client({ connectionString: url });
    await c.connect();
    const stored = (await c.query('select count(*)::int as n from messages')).rows[0].n as number;
    await c.end();
    progress(`smtp: ${sent} messages in ${elapsed.toFixed(1)} s; ${stored} messages stored`);
    return {
      smtp_receive_msgs_per_s: round(sent / elapsed, 1),
      smtp_receive_messages: sent,
      smtp_receive_p50_ms: round(percentile(latencies, 50)),
      smtp_receive_p99_ms: round(percentile(latencies, 99)),
      smtp_platform_cpu_ms_per_msg: round(cpuMs / sent, 3),
      ...(pg0 !== null && pg1 !== null ? { smtp_pg_cpu_ms_per_msg: round((pg1 - pg0) / sent, 3) } : {}),
      smtp_client_cpu_ms_per_msg: round((client.user + client.system) / 1000 / sent, 3),
      ...(Number.isFinite(platformInstr) ? { smtp_platform_minstr_per_msg: round(platformInstr / 1e6 / sent, 3) } : {}),
      ...(Number.isFinite(pgInstr) ? { smtp_pg_minstr_per_msg: round(pgInstr / 1e6 / sent, 3) } : {}),
      smtp_messages_stored: stored,
      smtp_platform_bundled: bundled ? 1 : 0,
    };
  } finally {
    transport.close();
    await platform.stop();
    data.rm();
  }
}
