import { type ChildProcess, spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import pg from 'pg';
import { createUser } from '../../src/accounts/users.ts';
import type { Deps } from '../../src/context.ts';
import { loadConfig } from '../../src/platform/config.ts';
import { createLogger } from '../../src/platform/logger.ts';
import { systemClock } from '../../src/platform/clock.ts';
import { openDb } from '../../src/store/db.ts';
import { createTestDatabase } from './db.ts';
import { ApiClient } from './platform.ts';

/**
 * Several Parley platforms as real child processes (`node bin/parley.js start --roles
 * web,worker,smtp`), one per domain, each on its own database of the test PostgreSQL, on
 * loopback ports chosen up front so that every platform's static route table
 * (PARLEY_FEDERATION_ROUTES) names all of them. A platform can be killed (SIGKILL) or stopped
 * and started again on the same database and ports.
 */
export interface FedPlatform {
  /** Its domain, which is also its platform name. */
  domain: string;
  base: string;
  /** A small pool on its database, for the test's own reads. */
  pool: pg.Pool;
  running(): boolean;
  start(): Promise<void>;
  /** Sends `signal` (SIGKILL by default) and waits for the process to exit. */
  kill(signal?: NodeJS.Signals): Promise<void>;
  /** Creates a user (directly in its database) and logs them in through its API. */
  user(address: string): Promise<ApiClient>;
  /** The process's stderr/stdout so far (diagnostics for failed assertions). */
  output(): string;
}

/** A set of running platforms. */
export interface Federation {
  platforms: Map<string, FedPlatform>;
  get(domain: string): FedPlatform;
  stop(): Promise<void>;
}

function freePort(): Promise<number> {
  return new Promise((res, rej) => {
    const s = createServer();
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as { port: number };
      s.close(() => res(port));
    });
    s.on('error', rej);
  });
}

/**
 * Polls `check` until it returns a truthy value, or throws after `timeoutMs` with `what`
 * (and the last value or error). No sleeping to synchronise: each poll asks the real state.
 */
export async function waitUntil<T>(what: string, check: () => Promise<T>, timeoutMs = 30_000, everyMs = 100): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await check();
      if (v) return v;
      last = v;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}; last: ${last instanceof Error ? last.message : JSON.stringify(last)}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

const PASSWORD = 'correct horse battery';

/** Starts one platform process per domain; resolves when every one answers HTTP. */
export async function startFederation(domains: string[]): Promise<Federation> {
  const ports = await Promise.all(domains.map(async () => ({ http: await freePort(), smtp: await freePort() })));
  const routes = domains.map((d, i) => `${d}=http://127.0.0.1:${ports[i].http}`).join(',');
  const platforms = new Map<string, FedPlatform>();
  const cleanups: (() => Promise<void>)[] = [];
  const bin = resolve('bin/parley.js');

  for (const [i, domain] of domains.entries()) {
    const db = await createTestDatabase();
    const dataDir = mkdtempSync(join(tmpdir(), `parley-fed-${domain}-`));
    const base = `http://127.0.0.1:${ports[i].http}`;
    const env: NodeJS.ProcessEnv = {
      ...process.env,
      DATABASE_URL: db.url,
      PARLEY_DOMAINS: domain,
      PARLEY_HTTP_HOST: '127.0.0.1',
      PARLEY_HTTP_PORT: String(ports[i].http),
      PARLEY_SMTP_HOST: '127.0.0.1',
      PARLEY_SMTP_PORT: String(ports[i].smtp),
      PARLEY_BASE_URL: base,
      PARLEY_DATA_DIR: dataDir,
      PARLEY_DNS_OFFLINE: '1',
      PARLEY_FEDERATION_ROUTES: routes,
      PARLEY_LOG_LEVEL: process.env.PARLEY_FED_LOG_LEVEL ?? 'warn',
    };
    const pool = new pg.Pool({ connectionString: db.url, max: 2 });
    pool.on('error', () => {});
    let child: ChildProcess | null = null;
    let exited: Promise<void> = Promise.resolve();
    let out = '';
    let userDeps: Deps | null = null;
    const p: FedPlatform = {
      domain,
      base,
      pool,
      running: () => child !== null,
      async start() {
        if (child) return;
        const c = spawn(process.execPath, [bin, 'start', '--roles', 'web,worker,smtp'], { env, stdio: ['ignore', 'pipe', 'pipe'] });
        child = c;
        const keep = (b: Buffer) => {
          out = (out + b.toString()).slice(-200_000);
        };
        c.stdout!.on('data', keep);
        c.stderr!.on('data', keep);
        exited = new Promise((res) =>
          c.once('exit', () => {
            if (child === c) child = null;
            res();
          }),
        );
        const died = exited.then(() => {
          throw new Error(`${domain} exited while starting:\n${out.slice(-3000)}`);
        });
        await Promise.race([
          died,
          waitUntil(
            `${domain} to answer HTTP`,
            async () => (await fetch(`${base}/.well-known/parley/platform`)).ok,
            // Generous: on a loaded 2-core machine four processes compiling TypeScript at once start slowly.
            180_000,
            250,
          ),
        ]);
        died.catch(() => {});
      },
      async kill(signal = 'SIGKILL') {
        if (!child) return;
        child.kill(signal);
        await exited;
      },
      async user(address) {
        userDeps ??= {
          db: openDb(db.url, 2),
          config: loadConfig({}, undefined, { domains: [domain], databaseUrl: db.url, dataDir, dnsOffline: true }),
          log: createLogger('test', 'silent'),
          clock: systemClock,
          blobs: null as unknown as Deps['blobs'],
        };
        await createUser(userDeps, { address, password: PASSWORD });
        const r = await new ApiClient(base, null, address).post('/api/login', { address, password: PASSWORD });
        if (r.status !== 200) throw new Error(`login of ${address} failed: ${r.status} ${JSON.stringify(r.body)}`);
        return new ApiClient(base, r.body.token, address);
      },
      output: () => out,
    };
    platforms.set(domain, p);
    cleanups.push(async () => {
      await p.kill('SIGTERM');
      await pool.end().catch(() => {});
      await userDeps?.db.close().catch(() => {});
      await db.drop().catch(() => {});
      rmSync(dataDir, { recursive: true, force: true });
    });
  }
  const fed: Federation = {
    platforms,
    get: (d) => platforms.get(d)!,
    stop: async () => {
      await Promise.all(cleanups.map((c) => c()));
    },
  };
  try {
    await Promise.all([...platforms.values()].map((p) => p.start()));
  } catch (e) {
    await fed.stop();
    throw e;
  }
  return fed;
}

/** `[id, hash]` of every action of conversation `key` on a platform, in order (read from its database). */
export async function logOf(p: FedPlatform, key: string): Promise<[number, string][]> {
  const r = await p.pool.query<{ id: number; hash: string }>(
    'select a.id, a.hash from actions a join conversations c on c.id = a.conv_id where c.key = $1 order by a.id',
    [key],
  );
  return r.rows.map((x) => [x.id, x.hash]);
}
