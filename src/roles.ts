import type { Deps } from './context.ts';
import type { Role } from './app.ts';
import { startDeliveryWorker } from './delivery/worker.ts';
import { startSmtpServer } from './mail/inbound/smtp-server.ts';

/** Background services of the worker and smtp roles. */
export interface RoleServices {
  smtpPort: number | null;
  stop(): Promise<void>;
}

/** Starts the worker role (delivery worker) and the smtp role (inbound SMTP server) as asked. */
export async function startRoleServices(deps: Deps, roles: readonly Role[]): Promise<RoleServices> {
  const stops: (() => Promise<void>)[] = [];
  let smtpPort: number | null = null;
  try {
    if (roles.includes('worker')) {
      const w = await startDeliveryWorker(deps);
      stops.push(() => w.stop());
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
