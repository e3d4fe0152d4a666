import { join, resolve } from 'node:path';
import type { FastifyInstance } from 'fastify';
import type { Config } from './platform/config.ts';
import { ensureDirectory } from './platform/data-directory.ts';
import { createLogger, type Logger } from './platform/logger.ts';
import { systemClock, type Clock } from './platform/clock.ts';
import { BlobStore } from './platform/blobs.ts';
import { openDatabase } from './store/open.ts';
import type { Deps } from './context.ts';
import type { Realtime } from './streams/realtime.ts';
import { startRoleServices, type RoleServices } from './roles.ts';
import { ensureSigningKey } from './federation/keys.ts';
import { type EarlyServer, listenEarly } from './http/early.ts';

export { openDatabase };

/**
 * Longest the HTTP API's build waits for the first answer to the federation worker's
 * catch-up at start, ms (see {@link startPlatform}).
 */
export const API_AFTER_CATCHUP_MS = 500;

/** The roles one process can play (ARCHITECTURE.md, "Processes"). */
export const ROLES = ['web', 'worker', 'smtp'] as const;
export type Role = (typeof ROLES)[number];

/** A running platform process. */
export interface Platform {
  deps: Deps;
  http: FastifyInstance | null;
  /** Bound HTTP port (useful when configured as 0). */
  httpPort: number | null;
  /** Bound SMTP port, when the smtp role runs. */
  smtpPort: number | null;
  stop(): Promise<void>;
}

/**
 * Starts a platform process with the given roles: `web` (HTTP API + websocket), `worker`
 * (deliveries, federation), `smtp` (inbound mail). Stops everything it started on `stop()`.
 *
 * Order (issue 3, Done means 5: a replica catching up after an outage counts its own
 * start): the database and the signing key; the web role's port, open at once
 * (src/http/early.ts: it serves the keys document a leader needs to verify this platform's
 * requests, and holds every other request); the worker and smtp roles — the federation
 * worker asks its leaders for what it missed right away; then — once the first of those
 * requests is answered, or after {@link API_AFTER_CATCHUP_MS} — the HTTP API is loaded and
 * built, and takes over the port (the held requests first). Loading the API holds the main
 * thread for a few hundred ms; before the first answer it would delay both the leader's
 * fetch of this platform's keys (to verify the request) and the reading of the answer. The
 * modules only the web role needs (Fastify, the route modules) are loaded after the worker
 * has started.
 */
export async function startPlatform(
  config: Config,
  roles: readonly Role[] = ROLES,
  opts: { clock?: Clock; log?: Logger } = {},
): Promise<Platform> {
  const log = opts.log ?? createLogger('parley', config.logLevel);
  ensureDirectory(config.dataDir);
  const { db, embedded } = await openDatabase(config, log);
  const deps: Deps = {
    db,
    config,
    log,
    clock: opts.clock ?? systemClock,
    blobs: new BlobStore(join(resolve(config.dataDir), 'blobs')),
  };
  let http: FastifyInstance | null = null;
  let early: EarlyServer | null = null;
  let realtime: Realtime | null = null;
  let httpPort: number | null = null;
  let services: RoleServices | null = null;
  try {
    await ensureSigningKey(deps); // the platform identity, generated at first start (docs/federation.md)
    if (roles.includes('web')) {
      early = await listenEarly(deps, config.httpHost, config.httpPort);
      httpPort = early.port;
    }
    services = await startRoleServices(deps, roles);
    if (early) {
      // Loading Fastify and the route modules holds this thread for a few hundred ms: not
      // before the catch-up's first request is answered — the leader fetches this platform's
      // keys from the early port to verify it, and its answer is read here (at most
      // API_AFTER_CATCHUP_MS later).
      await Promise.race([services.firstAnswer, new Promise((r) => setTimeout(r, API_AFTER_CATCHUP_MS).unref())]);
      const [{ buildServer }, { routeModules }, { startRealtime }] = await Promise.all([
        import('./http/server.ts'),
        import('./http/routes.ts'),
        import('./streams/realtime.ts'),
      ]);
      realtime = await startRealtime(deps);
      let handler: ((req: any, res: any) => void) | null = null;
      http = await buildServer(deps, routeModules(realtime), { server: early.server, onHandler: (h) => (handler = h) });
      await http.ready();
      early.handOver(handler!);
      log.info({ url: `http://${config.httpHost}:${httpPort}` }, 'web role listening');
    }
  } catch (e) {
    await services?.stop().catch(() => {});
    await http?.close().catch(() => {});
    await early?.abort().catch(() => {});
    await realtime?.stop().catch(() => {});
    await db.close().catch(() => {});
    await embedded?.stop().catch(() => {});
    throw e;
  }
  return {
    deps,
    http,
    httpPort,
    smtpPort: services.smtpPort,
    stop: async () => {
      await services?.stop();
      await http?.close();
      await early?.close();
      await realtime?.stop();
      await db.close();
      await embedded?.stop();
    },
  };
}
