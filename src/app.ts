import { join, resolve } from 'node:path';
import { mkdirSync } from 'node:fs';
import type { FastifyInstance } from 'fastify';
import type { Config } from './platform/config.ts';
import { createLogger, type Logger } from './platform/logger.ts';
import { systemClock, type Clock } from './platform/clock.ts';
import { BlobStore } from './platform/blobs.ts';
import { openDatabase } from './store/open.ts';
import type { Deps } from './context.ts';
import { buildServer } from './http/server.ts';
import { routeModules } from './http/routes.ts';
import { startRealtime, type Realtime } from './streams/realtime.ts';
import { startRoleServices, type RoleServices } from './roles.ts';
import { ensureSigningKey } from './federation/keys.ts';

export { openDatabase };

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
 * (deliveries), `smtp` (inbound mail). Stops everything it started on `stop()`.
 */
export async function startPlatform(
  config: Config,
  roles: readonly Role[] = ROLES,
  opts: { clock?: Clock; log?: Logger } = {},
): Promise<Platform> {
  const log = opts.log ?? createLogger('parley', config.logLevel);
  mkdirSync(resolve(config.dataDir), { recursive: true });
  const { db, embedded } = await openDatabase(config, log);
  const deps: Deps = {
    db,
    config,
    log,
    clock: opts.clock ?? systemClock,
    blobs: new BlobStore(join(resolve(config.dataDir), 'blobs')),
  };
  let http: FastifyInstance | null = null;
  let realtime: Realtime | null = null;
  let httpPort: number | null = null;
  let services: RoleServices | null = null;
  try {
    await ensureSigningKey(deps); // the platform identity, generated at first start (docs/federation.md)
    if (roles.includes('web')) {
      realtime = await startRealtime(deps);
      http = await buildServer(deps, routeModules(realtime));
      await http.listen({ host: config.httpHost, port: config.httpPort });
      const addr = http.server.address();
      httpPort = typeof addr === 'object' && addr ? addr.port : config.httpPort;
      log.info({ url: `http://${config.httpHost}:${httpPort}` }, 'web role listening');
    }
    services = await startRoleServices(deps, roles);
  } catch (e) {
    await http?.close().catch(() => {});
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
      await realtime?.stop();
      await db.close();
      await embedded?.stop();
    },
  };
}
