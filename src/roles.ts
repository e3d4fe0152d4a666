import type { Deps } from './context.ts';
import type { Role } from './app.ts';
import { startDeliveryWorker } from './delivery/worker.ts';
import { startSmtpServer } from './mail/inbound/smtp-server.ts';
import { startFederationWorker } from './federation/pusher.ts';

/** Background services of the worker and smtp roles. */
export interface RoleServices {
  smtpPort: number | null;
  stop(): Promise<void>;
}

/** Starts the worker role (delivery worker, federation worker) and the smtp role (inbound SMTP server) as asked. */
export async function startRoleServices(deps: Deps, roles: readonly Role[]): Promise<RoleServices> {
  const stops: (() => Promise<void>)[] = [];
  let smtpPort: number | null = null;
  try {
    if (roles.includes('worker')) {
      const w = await startDeliveryWorker(deps);
      stops.push(() => w.stop());
      // Replication pushes and proposals to other platforms (docs/federation.md, "Replication").
      const f = await startFederationWorker(deps);
      stops.push(() => f.stop());
    }
    if (roles.includes('smtp')) {
      const s = await startSmtpServer(deps);
      smtpPort = s.port;
      stops.push(() => s.stop());
    }
  } catch (e) {
    for (const s of stops.reverse()) await s().catch(() => {});
    throw e;
  }
  return {
    smtpPort,
    stop: async () => {
      for (const s of stops.reverse()) await s();
    },
  };
}
