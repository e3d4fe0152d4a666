import type { Deps } from '../../context.ts';

/** The inbound SMTP server (to be completed). */
export async function startSmtpServer(deps: Deps): Promise<{ port: number; stop(): Promise<void> }> {
  return { port: deps.config.smtpPort, stop: async () => {} };
}
