import { createHash } from 'node:crypto';
import nodemailer, { type Transporter } from 'nodemailer';
import { Type } from '@sinclair/typebox';
import { type Deps, primaryDomain } from '../../context.ts';
import { type Delivery, type DeliveryPlugin, type MessagePayload, type SendResult, configProblems, str } from '../../delivery/plugin.ts';
import { isValidAddress } from '../address.ts';
import { type OutboundEmail, composeEmail, renderHtmlFromText } from '../compose.ts';
import { outboundMessageId } from './enqueue.ts';
import { renderEmail } from './render.ts';

const transports = new Map<string, Transporter>();

function transportFor(url: string, timeoutMs: number): { key: string; t: Transporter } {
  const key = `${url} ${timeoutMs}`;
  let t = transports.get(key);
  if (!t) {
    const io = Math.max(500, timeoutMs);
    t = nodemailer.createTransport(url, { pool: true, maxConnections: 4, connectionTimeout: io, greetingTimeout: io, socketTimeout: io } as any);
    transports.set(key, t);
  }
  return { key, t };
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
 * The Message-ID of an email delivery: the payload's `message_id`, else the one the email
 * bridge gives the conversation's action, else one derived from the idempotency key — the
 * same on every attempt, so a repeat after a lost reply is the same message to the recipient.
 */
async function messageIdOf(d: Delivery, deps: Deps, p: MessagePayload): Promise<string> {
  if (p.message_id) return p.message_id;
  const actionId = p.action_id ?? d.action_id;
  if (d.conv_id !== null && actionId != null) {
    const c = await deps.db.kysely.selectFrom('conversations').select('key').where('id', '=', d.conv_id).executeTakeFirst();
    if (c) return outboundMessageId(c.key, actionId, primaryDomain(deps));
  }
  return `${createHash('sha256').update(d.idempotency_key).digest('hex').slice(0, 32)}@${primaryDomain(deps)}`;
}

/**
 * The email of a delivery: the conversation's action rendered by the email bridge (render.ts)
 * when the row has a conversation and an action, else a plain email of the payload's
 * subject and text from `payload.from` (default `parley@<primary domain>`).
 * @returns null when the action or conversation no longer exists
 */
async function emailOf(d: Delivery, deps: Deps): Promise<OutboundEmail | null> {
  const p = (d.payload ?? {}) as MessagePayload;
  const actionId = p.action_id ?? d.action_id;
  const messageId = await messageIdOf(d, deps, p);
  if (d.conv_id !== null && actionId != null) {
    return renderEmail(deps, d.conv_id, { action_id: actionId, message_id: messageId, full: p.full ?? false });
  }
  const text = p.text ?? '';
  const from = p.from && isValidAddress(p.from) ? p.from : `parley@${primaryDomain(deps)}`;
  return {
    from: { address: from, name: '' },
    to: [{ address: d.destination, name: '' }],
    subject: p.subject || '(no subject)',
    messageId,
    date: new Date(d.created_at),
    text,
    html: renderHtmlFromText(text),
  };
}

/**
 * The `smtp` delivery plugin: the email bridge's sender (issue 2 "Outbound", issue 4 §1).
 * Renders the delivery as MIME (see `emailOf`) and submits it to the relay (PARLEY_RELAY_URL)
 * with the delivery's destination as the only envelope recipient. SMTP has no idempotency
 * key: a repeat after a lost reply may arrive twice, with the same Message-ID (dedupe
 * `message-id`). Without a relay configured, mail waits (`retry`). No per-organisation config.
 */
export const smtpPlugin: DeliveryPlugin = {
  name: 'smtp',
  configSchema: Type.Object({}, { additionalProperties: false }),
  needsConfig: false,
  capabilities: { receipts: false, read: false, replies: true, dedupe: 'message-id' },
  async validate(deps, config) {
    if (config !== undefined) {
      const problems = configProblems(smtpPlugin, config);
      if (problems.length) throw new Error(problems.join('; '));
      return;
    }
    const url = deps.config.relayUrl;
    if (!url) return;
    let u: URL;
    try {
      u = new URL(url);
    } catch {
      throw new Error(`PARLEY_RELAY_URL "${url}" is not a URL`);
    }
    if (u.protocol !== 'smtp:' && u.protocol !== 'smtps:') throw new Error(`PARLEY_RELAY_URL must be smtp:// or smtps://, not ${u.protocol}//`);
  },
  checkDestination(destination) {
    return isValidAddress(destination) ? null : `"${destination.slice(0, 80)}" is not an email address`;
  },
  async send(d, deps: Deps, ctx): Promise<SendResult> {
    if (!deps.config.relayUrl) return { outcome: 'retry', error: 'no outbound relay configured (PARLEY_RELAY_URL)' };
    if (!isValidAddress(d.destination)) return { outcome: 'failed', error: `"${d.destination}" is not an email address` };
    const email = await emailOf(d, deps);
    if (!email) return { outcome: 'failed', error: 'the action no longer exists' };
    const raw = await composeEmail(email);
    const { key, t } = transportFor(deps.config.relayUrl, ctx.timeoutMs);
    let onAbort: (() => void) | undefined;
    try {
      const aborted = new Promise<never>((_, reject) => {
        onAbort = () => reject(Object.assign(new Error(`relay timed out after ${ctx.timeoutMs} ms`), { aborted: true }));
        if (ctx.signal.aborted) onAbort();
        else ctx.signal.addEventListener('abort', onAbort, { once: true });
      });
      const info = await Promise.race([t.sendMail({ envelope: { from: email.from.address, to: [d.destination] }, raw }), aborted]);
      if (info.rejected?.length) return { outcome: 'failed', error: `relay rejected ${d.destination}: ${info.response}` };
      return { outcome: 'accepted', providerRef: str(info as any, 'messageId') || `<${email.messageId}>` };
    } catch (e) {
      if ((e as any)?.aborted) {
        // The pooled connection may be stuck on a silent relay: drop it.
        transports.delete(key);
        t.close();
        return { outcome: 'retry', error: (e as Error).message };
      }
      return classifySmtpError(e);
    } finally {
      if (onAbort) ctx.signal.removeEventListener('abort', onAbort);
    }
  },
};

/** Closes pooled relay connections (at shutdown and in tests). */
export function closeSmtpTransports(): void {
  for (const t of transports.values()) t.close();
  transports.clear();
}
