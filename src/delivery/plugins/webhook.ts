import { Type } from '@sinclair/typebox';
import type { Deps } from '../../context.ts';
import { badRequest, unauthorized } from '../../platform/errors.ts';
import { loadOrgConfigs } from '../org-config.ts';
import { type DeliveryPlugin, type InboundEvent, type MessagePayload, type SendResult, configProblems, str } from '../plugin.ts';
import { parleySignature, parleySignatureProblem } from '../signature.ts';
import { type HttpAnswer, networkError, postOnce } from '../http.ts';

/** Per-organisation config of the `webhook` plugin (`organisations.plugin_config.webhook`). */
export const WebhookConfigSchema = Type.Object(
  {
    /** Where deliveries are POSTed when the destination is not itself a URL: an http(s) URL of the organisation's application. */
    url: Type.Optional(Type.String({ pattern: '^https?://[^\\s]+$', maxLength: 2000 })),
    /** Shared secret for X-Parley-Signature, both ways (at least 16 characters). */
    secret: Type.String({ minLength: 16, maxLength: 500 }),
  },
  { additionalProperties: false },
);

/** Largest response body read from a webhook receiver, in bytes (the rest is ignored). */
const MAX_RESPONSE_BYTES = 64 * 1024;

/**
 * The JSON body POSTed for one delivery (docs/delivery.md, "webhook"): our delivery id (an
 * opaque string), the step's idempotency key (also the `Idempotency-Key` header), the
 * conversation key and action id, the text, the contact and the destination.
 */
export function webhookBody(d: { id: number; idempotency_key: string; action_id: number | null; destination: string; payload: unknown }): string {
  const p = (d.payload ?? {}) as MessagePayload;
  return JSON.stringify({
    delivery_id: String(d.id),
    idempotency_key: d.idempotency_key,
    conversation_key: p.conversation_key ?? null,
    action_id: d.action_id ?? p.action_id ?? null,
    subject: p.subject ?? '',
    text: p.text ?? '',
    contact: p.contact ?? null,
    destination: d.destination,
  });
}

function headerValue(h: string | string[] | undefined): string | null {
  return (Array.isArray(h) ? h[0] : h) ?? null;
}

function retryAfterMs(h: string | null): number | undefined {
  if (!h) return undefined;
  const s = Number(h);
  if (Number.isFinite(s) && s >= 0) return Math.min(s * 1000, 3_600_000);
  const at = Date.parse(h);
  return Number.isFinite(at) ? Math.max(0, Math.min(at - Date.now(), 3_600_000)) : undefined;
}

const HTTP_URL = /^https?:\/\//i;

const EVENTS = new Set(['delivered', 'read', 'replied', 'failed']);

/**
 * The `webhook` plugin (issue 4 §1): a JSON POST to the destination when it is an http(s)
 * URL (a contact's own hook), else to the organisation's `url` (the destination then names
 * the contact in the body), signed
 * `X-Parley-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "t.body")>`, with
 * `Idempotency-Key` = the step's idempotency key. 2xx → accepted (provider ref: the response's
 * JSON `id`, if any); 4xx other than 408/429 → failed; 408, 429, 5xx, network errors and
 * timeouts → retry (429/503 honour Retry-After). Receipts and replies come back signed the
 * same way to `POST /api/delivery/hooks/webhook?org=<id|slug>`.
 */
export function webhookPlugin(): DeliveryPlugin {
  const plugin: DeliveryPlugin = {
    name: 'webhook',
    configSchema: WebhookConfigSchema,
    needsConfig: true,
    capabilities: { receipts: true, read: true, replies: true, dedupe: 'key' },
    async validate(_deps, config) {
      if (config === undefined) return;
      const problems = configProblems(plugin, config);
      if (problems.length === 0 && str(config, 'url')) {
        try {
          new URL(str(config, 'url'));
        } catch {
          problems.push('webhook config /url: not a valid URL');
        }
      }
      if (problems.length) throw new Error(problems.join('; '));
    },
    checkDestination(destination) {
      if (HTTP_URL.test(destination)) {
        try {
          new URL(destination);
          return destination.length > 2000 ? 'a webhook URL is at most 2000 characters' : null;
        } catch {
          return `"${destination.slice(0, 80)}" is not a valid URL`;
        }
      }
      if (destination.length === 0 || destination.length > 500) return 'a webhook destination is an http(s) URL, or 1 to 500 characters naming the contact for the organisation’s URL';
      return null;
    },
    async send(d, deps, ctx): Promise<SendResult> {
      const url = HTTP_URL.test(d.destination) ? d.destination : str(ctx.config, 'url');
      const secret = str(ctx.config, 'secret');
      if (!url || !secret) return { outcome: 'failed', error: 'webhook is not configured for this organisation (plugin_config.webhook.secret, and .url unless the destination is a URL)' };
      const body = webhookBody(d);
      const t = Math.floor(deps.clock.now() / 1000);
      let r: HttpAnswer;
      try {
        r = await postOnce(
          url,
          {
            'content-type': 'application/json',
            'user-agent': 'Parley-Webhook/1',
            'idempotency-key': d.idempotency_key,
            'x-parley-delivery': String(d.id),
            'x-parley-signature': parleySignature(secret, body, t),
          },
          body,
          ctx.signal,
          MAX_RESPONSE_BYTES,
        );
      } catch (e) {
        if (ctx.signal.aborted) return { outcome: 'retry', error: `webhook timed out after ${ctx.timeoutMs} ms` };
        return { outcome: 'retry', error: `webhook unreachable: ${networkError(e)}` };
      }
      const text = r.text;
      if (r.status >= 200 && r.status < 300) {
        let ref: string | null = null;
        try {
          const j = JSON.parse(text);
          if (j && (typeof j.id === 'string' || typeof j.id === 'number')) ref = String(j.id).slice(0, 200);
        } catch {
          /* a 2xx without JSON is fine */
        }
        return { outcome: 'accepted', providerRef: ref };
      }
      const snippet = text.replace(/\s+/g, ' ').trim().slice(0, 300);
      if (r.status >= 400 && r.status < 500 && r.status !== 408 && r.status !== 429) {
        return { outcome: 'failed', error: `webhook refused (${r.status})${snippet ? `: ${snippet}` : ''}` };
      }
      return { outcome: 'retry', error: `webhook answered ${r.status}${snippet ? `: ${snippet}` : ''}`, retryAfterMs: retryAfterMs(headerValue(r.headers['retry-after'])) };
    },
    inbound: {
      /**
       * `POST /api/delivery/hooks/webhook?org=<id|slug>` with `X-Parley-Signature` over the raw
       * body with the organisation's webhook secret; body
       * `{"event": "delivered"|"read"|"replied"|"failed", "delivery_id"?: string, "provider_ref"?: string, "text"?: string, "error"?: string}`.
       * @throws AppError 401 (unknown organisation, missing/invalid/stale signature), 400 (malformed body)
       */
      async handle(req, deps: Deps) {
        const org = await loadOrgConfigs(deps, req.query.org ?? '');
        const secret = str(org?.configs.webhook, 'secret');
        const header = req.headers['x-parley-signature'];
        const problem = org && secret ? parleySignatureProblem(secret, Array.isArray(header) ? header[0] : header, req.rawBody, deps.clock.now()) : 'unknown organisation or no webhook secret';
        if (problem || !org) {
          deps.log.warn({ plugin: 'webhook', org: req.query.org, problem }, 'unauthenticated delivery hook refused');
          throw unauthorized('the request is not signed with the organisation’s webhook secret (X-Parley-Signature)', 'bad_signature');
        }
        let j: any;
        try {
          j = JSON.parse(req.rawBody.toString('utf8'));
        } catch {
          throw badRequest('invalid_json', 'the body is not valid JSON');
        }
        if (!j || typeof j !== 'object' || !EVENTS.has(j.event)) throw badRequest('invalid_event', 'event must be one of delivered, read, replied, failed');
        const ev: InboundEvent = { kind: j.event };
        if (j.delivery_id !== undefined) {
          if (!/^\d{1,15}$/.test(String(j.delivery_id))) throw badRequest('invalid_event', 'delivery_id is not a delivery id');
          ev.deliveryId = Number(j.delivery_id);
        }
        if (j.provider_ref !== undefined) {
          if (typeof j.provider_ref !== 'string' || j.provider_ref.length > 200) throw badRequest('invalid_event', 'provider_ref must be a string of at most 200 characters');
          ev.providerRef = j.provider_ref;
        }
        if (ev.deliveryId === undefined && ev.providerRef === undefined) throw badRequest('invalid_event', 'name the delivery: delivery_id or provider_ref');
        if (j.text !== undefined && (typeof j.text !== 'string' || j.text.length > 100_000)) throw badRequest('invalid_event', 'text must be a string of at most 100000 characters');
        if (j.error !== undefined && typeof j.error !== 'string') throw badRequest('invalid_event', 'error must be a string');
        if (ev.kind === 'replied') ev.text = j.text ?? '';
        if (ev.kind === 'failed') ev.error = (j.error ?? 'reported failed by the webhook receiver').slice(0, 2000);
        return { orgId: org.id, events: [ev] };
      },
    },
  };
  return plugin;
}
