import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import WebSocket from 'ws';
import { startPlatform, type Platform, type Role } from '../../src/app.ts';
import { loadConfig, type Config } from '../../src/platform/config.ts';
import { createUser } from '../../src/accounts/users.ts';
import { createTestDatabase } from './db.ts';

/** A platform started in this process on a fresh database, plus helpers to drive its API. */
export interface TestPlatform {
  platform: Platform;
  config: Config;
  base: string;
  /** Creates a user and logs them in; returns an API client acting as them. */
  user(address: string, password?: string): Promise<ApiClient>;
  stop(): Promise<void>;
}

/** The JSON answer of an API call: status and parsed body. */
export interface ApiResponse<T = any> {
  status: number;
  body: T;
  headers: Headers;
}

export class ApiClient {
  constructor(readonly base: string, readonly token: string | null, readonly address: string) {}

  async call<T = any>(method: string, path: string, body?: unknown, headers: Record<string, string> = {}): Promise<ApiResponse<T>> {
    const h: Record<string, string> = { ...headers };
    if (this.token) h.authorization = `Bearer ${this.token}`;
    let payload: BodyInit | undefined;
    if (body instanceof Uint8Array || typeof body === 'string') payload = body as BodyInit;
    else if (body !== undefined) {
      payload = JSON.stringify(body);
      h['content-type'] = 'application/json';
    }
    const r = await fetch(this.base + path, { method, headers: h, body: payload });
    const text = await r.text();
    let parsed: any = text;
    try {
      parsed = text ? JSON.parse(text) : null;
    } catch {
      /* not JSON */
    }
    return { status: r.status, body: parsed, headers: r.headers };
  }
  get = <T = any>(path: string) => this.call<T>('GET', path);
  post = <T = any>(path: string, body?: unknown) => this.call<T>('POST', path, body ?? {});

  /** Opens the websocket stream; `frames` collects every frame, `waitFor` resolves on a matching one. */
  async websocket(cursor?: number): Promise<LiveStream> {
    const url = `${this.base.replace(/^http/, 'ws')}/api/ws${cursor !== undefined ? `?cursor=${cursor}` : ''}`;
    const ws = new WebSocket(url, { headers: this.token ? { authorization: `Bearer ${this.token}` } : {} });
    const stream = new LiveStream(ws);
    await new Promise<void>((res, rej) => {
      ws.once('open', () => res());
      ws.once('error', rej);
    });
    await stream.waitFor((f) => f.type === 'hello');
    return stream;
  }
}

/** Frames received on a websocket, with event-driven waiting (no sleeps). */
export class LiveStream {
  frames: any[] = [];
  private waiters: { pred: (f: any) => boolean; resolve: (f: any) => void }[] = [];
  constructor(readonly ws: WebSocket) {
    ws.on('message', (data) => {
      const f = JSON.parse(String(data));
      this.frames.push(f);
      this.waiters = this.waiters.filter((w) => (w.pred(f) ? (w.resolve(f), false) : true));
    });
  }
  /** Resolves with the first frame (already received or future) matching `pred`; rejects after timeoutMs. */
  waitFor(pred: (f: any) => boolean, timeoutMs = 10_000): Promise<any> {
    const have = this.frames.find(pred);
    if (have) return Promise.resolve(have);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no matching websocket frame within ${timeoutMs} ms; got ${JSON.stringify(this.frames.slice(-5))}`)), timeoutMs);
      this.waiters.push({ pred, resolve: (f) => (clearTimeout(timer), resolve(f)) });
    });
  }
  close(): void {
    this.ws.close();
  }
}

/**
 * Starts a platform on a fresh test database, HTTP and SMTP on free loopback ports,
 * data in a temporary directory. `overrides` adjust the configuration.
 */
export async function startTestPlatform(overrides: Partial<Config> = {}, roles: Role[] = ['web', 'worker', 'smtp']): Promise<TestPlatform> {
  const db = await createTestDatabase();
  const dataDir = mkdtempSync(join(tmpdir(), 'parley-test-'));
  const config = loadConfig({}, undefined, {
    domains: ['alpha.test'],
    httpPort: 0,
    smtpPort: 0,
    databaseUrl: db.url,
    dataDir,
    dnsOffline: true,
    logLevel: (process.env.PARLEY_LOG_LEVEL as any) ?? 'silent',
    ...overrides,
  });
  const platform = await startPlatform(config, roles);
  const base = `http://127.0.0.1:${platform.httpPort}`;
  return {
    platform,
    config,
    base,
    async user(address, password = 'correct horse battery') {
      await createUser(platform.deps, { address, password });
      const anon = new ApiClient(base, null, address);
      const r = await anon.post('/api/login', { address, password });
      if (r.status !== 200) throw new Error(`login failed: ${r.status} ${JSON.stringify(r.body)}`);
      return new ApiClient(base, r.body.token, address);
    },
    async stop() {
      await platform.stop();
      await db.drop();
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
}
