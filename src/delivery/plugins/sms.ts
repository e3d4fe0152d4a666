import { Type } from '@sinclair/typebox';
import type { Deps } from '../../context.ts';
import { badRequest, unauthorized } from '../../platform/errors.ts';
import { loadOrgConfigs } from '../org-config.ts';
import { type DeliveryPlugin, E164, type InboundEvent, type MessagePayload, type SendResult, configProblems, str } from '../plugin.ts';
import { twilioSignatureValid } from '../signature.ts';
import { type HttpAnswer, networkError, postOnce } from '../http.ts';

/** Per-organisation config of the `sms` plugin (`organisations.plugin_config.sms`): a Twilio-like gateway. */
export const SmsConfigSchema = Type.Object(
  {
    /** The gateway's API root, e.g. `https://api.twilio.com/2010-04-01`. */
    base_url: Type.String({ pattern: '^https?://[^\\s]+$', maxLength: 2000 }),
    /** Account id (the Basic-auth user and the `/Accounts/{account}` path segment). */
    account: Type.String({ pattern: '^[A-Za-z0-9_-]{1,100}$' }),
    /** Auth token (the Basic-auth password; also signs the gateway's callbacks). */
    token: Type.String({ minLength: 8, maxLength: 500 }),
    /** Sender: an E.164 number or an alphanumeric sender id (1–11 letters, digits, spaces). */
    from: Type.String({ pattern: '^(\\+[1-9][0-9]{1,14}|[A-Za-z0-9 ]{1,11})$' }),
    /** Ask the gateway for delivery receipts (StatusCallback); default true. */
    status_callback: Type.Optional(Type.Boolean()),
  },
  { additionalProperties: false },
);

/**
 * Longest SMS body sent, in Unicode code points: 1600, the usual gateway limit for a
 * concatenated message (Twilio's). Longer texts are cut (docs/delivery.md, "sms").
 */
export const SMS_MAX_CHARS = 1600;

/**
 * The SMS body for a text (the documented truncation rule): line endings become `\n`,
 * surrounding whitespace is trimmed, and a text longer than SMS_MAX_CHARS code points keeps
 * its first SMS_MAX_CHARS − 1 code points (never splitting a surrogate pair) followed by `…`.
 */
export function smsText(text: string): string {
  const t = text.replace(/\r\n?/g, '\n').trim();
  const cps = Array.from(t);
  return cps.length <= SMS_MAX_CHARS ? t : `${cps.slice(0, SMS_MAX_CHARS - 1).join('').trimEnd()}…`;
}

/** The StatusCallback URL given to the gateway for an organisation's messages. */
export function smsHookUrl(deps: Deps, orgId: number): string {
  return `${deps.config.baseUrl.replace(/\/+$/, '')}/api/delivery/hooks/sms?org=${orgId}`;
}

/** Gateway message statuses (Twilio's) and what they mean for a delivery. */
const STATUS_EVENTS: Record<string, InboundEvent['kind'] | null> = {
  delivered: 'delivered',
  read: 'read',
  undelivered: 'failed',
  failed: 'failed',
  queued: null,
  accepted: null,
  scheduled: null,
  sending: null,
  sent: null,
  receiving: null,
  received: null,
  canceled: 'failed',
};

/**
 * The `sms` plugin (issue 4 §1): a Twilio-like HTTP gateway. `POST {base_url}/Accounts/{account}/Messages.json`,
 * form-encoded `To`, `From`, `Body` and `StatusCallback`, HTTP Basic auth (account, token),
 * `Idempotency-Key` = the step's idempotency key so the gateway can fold a repeated attempt.
 * The JSON answer `{sid, status}` gives the provider ref. 4xx (but 408/429) → failed with the
 * gateway's message; 408/429/5xx, network errors and timeouts → retry. Receipts and replies:
 * `POST /api/delivery/hooks/sms?org=<id>` signed with X-Twilio-Signature (see signature.ts).
 */
export function smsPlugin(): DeliveryPlugin {
  const plugin: DeliveryPlugin = {
    name: 'sms',
    configSchema: SmsConfigSchema,
    needsConfig: true,
    capabilities: { receipts: true, read: false, replies: true, dedupe: 'key' },
    async validate(_deps, config) {
      if (config === undefined) return;
      const problems = configProblems(plugin, config);
      if (problems.length === 0) {
        try {
          new URL(str(config, 'base_url'));
        } catch {
          problems.push('sms config /base_url: not a valid URL');
        }
      }
      if (problems.length) throw new Error(problems.join('; '));
    },
    checkDestination(destination) {
      return E164.test(destination) ? null : `"${destination.slice(0, 40)}" is not a phone number in E.164 form (+ and 2 to 15 digits)`;
    },
    async send(d, deps, ctx): Promise<SendResult> {
      const c = ctx.config;
      const base = str(c, 'base_url').replace(/\/+$/, '');
      const account = str(c, 'account');
      const token = str(c, 'token');
      const from = str(c, 'from');
      if (!base || !account || !token || !from) return { outcome: 'failed', error: 'sms is not configured for this organisation (plugin_config.sms: base_url, account, token, from)' };
      const problem = plugin.checkDestination(d.destination);
      if (problem) return { outcome: 'failed', error: problem };
      const body = smsText(((d.payload ?? {}) as MessagePayload).text ?? '');
      if (!body) return { outcome: 'failed', error: 'the message has no text to send by SMS' };
      const form = new URLSearchParams({ To: d.destination, From: from, Body: body });
      if (c.status_callback !== false && ctx.orgId !== null) form.set('StatusCallback', smsHookUrl(deps, ctx.orgId));
      let r: HttpAnswer;
      try {
        r = await postOnce(
          `${base}/Accounts/${encodeURIComponent(account)}/Messages.json`,
          {
            authorization: `Basic ${Buffer.from(`${account}:${token}`).toString('base64')}`,
            'content-type': 'application/x-www-form-urlencoded',
            'idempotency-key': d.idempotency_key,
            'user-agent': 'Parley-SMS/1',
          },
          form.toString(),
          ctx.signal,
        );
      } catch (e) {
        if (ctx.signal.aborted) return { outcome: 'retry', error: `sms gateway timed out after ${ctx.timeoutMs} ms` };
        return { outcome: 'retry', error: `sms gateway unreachable: ${networkError(e)}` };
      }
      // The status line came but the answer was cut short by the deadline: its sid is unknown.
      if (!r.complete && ctx.signal.aborted) return { outcome: 'retry', error: `sms gateway timed out after ${ctx.timeoutMs} ms` };
      const text = r.text;
      let j: any = null;
      try {
        j = JSON.parse(text);
      } catch {
        /* not JSON */
      }
      if (r.status >= 200 && r.status < 300) {
        const sid = typeof j?.sid === 'string' ? j.sid.slice(0, 200) : null;
        const status = typeof j?.status === 'string' ? j.status : '';
        if (status === 'failed' || status === 'undelivered') return { outcome: 'failed', error: `sms gateway reports the message ${status}${j?.error_message ? `: ${j.error_message}` : ''}` };
        return { outcome: 'accepted', providerRef: sid, delivered: status === 'delivered' };
      }
      const msg = typeof j?.message === 'string' ? j.message : text.replace(/\s+/g, ' ').trim();
      const code = j?.code !== undefined ? ` ${String(j.code).slice(0, 20)}` : '';
      const detail = `(${r.status}${code})${msg ? `: ${msg.slice(0, 500)}` : ''}`;
      if (r.status >= 400 && r.status < 500 && r.status !== 408 && r.status !== 429) return { outcome: 'failed', error: `sms gateway refused ${detail}` };
      const raHeader = r.headers['retry-after'];
      const ra = Number(Array.isArray(raHeader) ? raHeader[0] : raHeader);
      return { outcome: 'retry', error: `sms gateway answered ${detail}`, ...(Number.isFinite(ra) && ra > 0 ? { retryAfterMs: Math.min(ra * 1000, 3_600_000) } : {}) };
    },
    inbound: {
      /**
       * `POST /api/delivery/hooks/sms?org=<id>`, form-encoded like Twilio's callbacks, signed
       * with `X-Twilio-Signature` (HMAC-SHA1 with the organisation's sms token over the URL and
       * the sorted parameters). A status callback (`MessageSid`, `MessageStatus`, `ErrorCode`)
       * becomes a receipt; an incoming message (`From`, `Body`, no `MessageStatus`) a reply.
       * @throws AppError 401 (unknown organisation, bad signature), 400 (neither a status nor a message)
       */
      async handle(req, deps: Deps) {
        const org = await loadOrgConfigs(deps, req.query.org ?? '');
        const token = str(org?.configs.sms, 'token');
        const params = new URLSearchParams(req.rawBody.toString('utf8'));
        const header = req.headers['x-twilio-signature'];
        const ok = !!org && !!token && twilioSignatureValid(token, Array.isArray(header) ? header[0] : header, [req.publicUrl, req.requestUrl], params);
        if (!ok || !org) {
          deps.log.warn({ plugin: 'sms', org: req.query.org }, 'unauthenticated delivery hook refused');
          throw unauthorized('the request is not signed with the organisation’s SMS token (X-Twilio-Signature)', 'bad_signature');
        }
        const status = params.get('MessageStatus');
        const sid = params.get('MessageSid') ?? params.get('SmsSid') ?? '';
        if (status !== null) {
          if (!sid) throw badRequest('invalid_event', 'a status callback needs MessageSid');
          const kind = STATUS_EVENTS[status.toLowerCase()];
          if (kind === undefined) throw badRequest('invalid_event', `unknown MessageStatus "${status.slice(0, 40)}"`);
          if (kind === null) return { orgId: org.id, events: [] };
          const errorCode = params.get('ErrorCode');
          const ev: InboundEvent = { kind, providerRef: sid, detail: { status, ...(errorCode ? { error_code: errorCode } : {}) } };
          if (kind === 'failed') ev.error = `the SMS gateway reports the message ${status}${errorCode ? ` (error ${errorCode})` : ''}`;
          return { orgId: org.id, events: [ev] };
        }
        const from = params.get('From');
        const body = params.get('Body');
        if (from === null || body === null) throw badRequest('invalid_event', 'neither a status callback (MessageStatus) nor an incoming message (From, Body)');
        return { orgId: org.id, events: [{ kind: 'replied', from, text: body, detail: { sid, to: params.get('To') ?? '' } }] };
      },
    },
  };
  return plugin;
}
