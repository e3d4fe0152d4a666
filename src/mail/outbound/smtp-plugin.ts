import nodemailer, { type Transporter } from 'nodemailer';
import type { Deps } from '../../context.ts';
import type { DeliveryPlugin, SendResult } from '../../delivery/plugin.ts';
import { composeEmail } from '../compose.ts';
import type { EmailDeliveryPayload } from './enqueue.ts';
import { renderEmail } from './render.ts';

const transports = new Map<string, Transporter>();

function transportFor(url: string): Transporter {
  let t = transports.get(url);
  if (!t) {
    t = nodemailer.createTransport(url, { pool: true, maxConnections: 4, connectionTimeout: 10_000, greetingTimeout: 10_000, socketTimeout: 30_000 } as any);
    transports.set(url, t);
  }
  return t;
}

/**
 * Classifies an SMTP failure (RFC 5321 §4.2.1): a 5yz reply is permanent, a 4yz reply or
 * a network failure is transient.
 */
export function classifySmtpError(e: any): SendResult {
  const code: number | undefined = e?.responseCode;
  const msg = `${e?.response ?? e?.message ?? String(e)}`.slice(0, 1000);
  if (code && code >= 500) return { outcome: 'failed', error: `relay refused (${code}): ${msg}` };
  return { outcome: 'retry', error: code ? `relay deferred (${code}): ${msg}` : `relay unreachable: ${msg}` };
}

/**
 * The `smtp` delivery plugin: the email bridge's sender. Renders the action as MIME and
 * submits it to the relay (PARLEY_RELAY_URL) with the delivery's recipient as the only
 * envelope recipient. Retries are harmless: the Message-ID is the same every time.
 */
export const smtpPlugin: DeliveryPlugin = {
  name: 'smtp',
  async send(d, deps: Deps): Promise<SendResult> {
    if (!deps.config.relayUrl) return { outcome: 'retry', error: 'no outbound relay configured (PARLEY_RELAY_URL)' };
    if (d.conv_id === null) return { outcome: 'failed', error: 'delivery has no conversation' };
    const email = await renderEmail(deps, d.conv_id, d.payload as EmailDeliveryPayload);
    if (!email) return { outcome: 'failed', error: 'the action no longer exists' };
    const raw = await composeEmail(email);
    try {
      const info = await transportFor(deps.config.relayUrl).sendMail({
        envelope: { from: email.from.address, to: [d.destination] },
        raw,
      });
      if (info.rejected?.length) return { outcome: 'failed', error: `relay rejected ${d.destination}: ${info.response}` };
      return { outcome: 'accepted', providerRef: String(info.messageId ?? email.messageId) };
    } catch (e) {
      return classifySmtpError(e);
    }
  },
};

/** Closes pooled relay connections (at shutdown and in tests). */
export function closeSmtpTransports(): void {
  for (const t of transports.values()) t.close();
  transports.clear();
}
