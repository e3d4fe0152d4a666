import type { Deps } from './context.ts';
import type { Role } from './app.ts';
import { startDeliveryWorker } from './delivery/worker.ts';
import { startFederationWorker } from './federation/pusher.ts';

/** Background services of the worker and smtp roles. */
export interface RoleServices {
  smtpPort: number | null;
  /**
   * Resolves once the federation worker's catch-up at start has had its first answer from a
   * leader (or had nothing to ask); at once without the worker role.
   */
  firstAnswer: Promise<void>;
  stop(): Promise<void>;
}

/**
 * Starts the worker role (federation worker, delivery worker) and the smtp role (inbound SMTP
 * server) as asked. The federation worker starts first: after an outage it asks the leaders
 * of the conversations it replicates for what it missed (src/federation/pusher.ts). The SMTP
 * server's modules are loaded only by a process with the smtp role.
 */
export async function startRoleServices(deps: Deps, roles: readonly Role[]): Promise<RoleServices> {
  const stops: (() => Promise<void>)[] = [];
  let smtpPort: number | null = null;
  let firstAnswer = Promise.resolve();
  try {
    if (roles.includes('worker')) {
      // Replication pushes, proposals and the catch-up at start (docs/federation.md, "Replication").
      const f = await startFederationWorker(deps);
      stops.push(() => f.stop());
      firstAnswer = f.firstAnswer;
      const w = await startDeliveryWorker(deps);
      stops.push(() => w.stop());
    }
    if (roles.includes('smtp')) {
      const { startSmtpServer } = await import('./mail/inbound/smtp-server.ts');
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
    firstAnswer,
    stop: async () => {
      for (const s of stops.reverse()) await s();
    },
  };
}
