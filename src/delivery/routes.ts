import { createHash } from 'node:crypto';
import type { FastifyInstance, FastifyRequest } from 'fastify';
import type { Deps } from '../context.ts';
import { requireUser } from '../http/server.ts';
import { TOKEN_PREFIX, requireScope, type Scope } from '../organisations/auth.ts';
import { forbidden, notFound, unauthorized } from '../platform/errors.ts';
import { type RetryFrom, MAX_PAGE, cancelDelivery, getDelivery, listFailed, retryDelivery } from './dead-letters.ts';
import { applyInboundEvents } from './inbound.ts';
import type { DeliveryPlugin } from './plugin.ts';
import { knownPlugins } from './registry.ts';
import { validatePlugins } from './worker.ts';

const err = { $ref: 'Error#' };
const secured: { [k: string]: string[] }[] = [{ bearer: [] }, { cookie: [] }];

/** Largest body of a delivery hook (receipts and replies), in bytes. */
export const MAX_HOOK_BODY_BYTES = 256 * 1024;

/**
 * Who may handle deliveries, and of which organisation (issue 4 §5 "dead letters ... through
 * the API"): an application's API token (`pat_…`) with `scope`, for its own organisation; a
 * member's session whose role implies `scope`, for `?org=<slug>`; a platform administrator's
 * session, for `?org=<slug>` or — without it — every organisation (`orgId` null).
 * @throws AppError 401, 403 `insufficient_scope` / `wrong_organisation` / `not_admin`, 404 (unknown organisation)
 */
export async function deliveryAccess(deps: Deps, req: FastifyRequest, scope: Scope): Promise<{ orgId: number | null; by: string }> {
  const h = req.headers.authorization;
  const token = h?.startsWith('Bearer ') ? h.slice(7).trim() : null;
  const org = (req.query as { org?: string } | undefined)?.org;
  const viaOrg = async (slug: string) => {
    // requireScope (src/organisations/auth.ts) reads the organisation from the :slug parameter.
    (req.params as Record<string, string>).slug = slug;
    await requireScope(deps, scope)(req);
    return { orgId: req.orgAuth!.org.id, by: req.orgAuth!.actor };
  };
  if (token?.startsWith(TOKEN_PREFIX)) {
    if (org) return viaOrg(org);
    const t = await deps.db.kysely
      .selectFrom('api_tokens')
      .innerJoin('organisations', 'organisations.id', 'api_tokens.org_id')
      .select('organisations.slug')
      .where('api_tokens.token_hash', '=', createHash('sha256').update(token).digest('hex'))
      .executeTakeFirst();
    if (!t) throw unauthorized('invalid or revoked API token', 'invalid_token');
    return viaOrg(t.slug);
  }
  await requireUser(deps)(req);
  const user = req.user!;
  if (user.isAdmin) {
    if (!org) return { orgId: null, by: user.address };
    const o = await deps.db.kysely.selectFrom('organisations').select('id').where('slug', '=', org).executeTakeFirst();
    if (!o) throw notFound(`organisation ${org}`);
    return { orgId: o.id, by: user.address };
  }
  if (org) return viaOrg(org);
  throw forbidden('not_admin', 'name your organisation (?org=<slug>); the deliveries of every organisation are for platform administrators');
}

const DeliveryInfoSchema = {
  type: 'object',
  properties: {
    id: { type: 'string' },
    org_id: { type: 'string', nullable: true },
    state: { type: 'string', enum: ['pending', 'sending', 'sent', 'delivered', 'read', 'replied', 'failed', 'cancelled'] },
    plugin: { type: 'string' },
    destination: { type: 'string' },
    chain: { type: 'array', items: { type: 'string' }, nullable: true },
    chain_index: { type: 'integer' },
    attempts: { type: 'integer', description: 'attempts at the current chain step' },
    last_error: { type: 'string', nullable: true },
    idempotency_key: { type: 'string' },
    provider_ref: { type: 'string', nullable: true },
    conv_id: { type: 'string', nullable: true },
    action_id: { type: 'integer', nullable: true },
    contact_id: { type: 'string', nullable: true },
    blast_id: { type: 'string', nullable: true },
    outbound_message_id: { type: 'string', nullable: true },
    created_at: { type: 'string', format: 'date-time' },
    updated_at: { type: 'string', format: 'date-time' },
    sent_at: { type: 'string', format: 'date-time', nullable: true },
    delivered_at: { type: 'string', format: 'date-time', nullable: true },
    read_at: { type: 'string', format: 'date-time', nullable: true },
    replied_at: { type: 'string', format: 'date-time', nullable: true },
  },
} as const;

const OrgQuery = { org: { type: 'string', maxLength: 100, description: 'organisation slug (members; platform admins may omit it to see every organisation)' } } as const;
const IdParams = { type: 'object', required: ['id'], properties: { id: { type: 'string', pattern: '^[0-9]{1,15}$' } } } as const;

function firstValues(q: unknown): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries((q ?? {}) as Record<string, unknown>)) {
    const s = Array.isArray(v) ? v[0] : v;
    if (typeof s === 'string') out[k] = s;
  }
  return out;
}

/**
 * Delivery engine routes (issue 4; docs/delivery.md):
 * - `POST /api/delivery/hooks/{plugin}` — receipts and replies from a plugin's counterpart,
 *   authenticated by the plugin (signature with the organisation's secret; 401 otherwise);
 * - `GET /api/delivery/plugins` — the plugins, their capabilities, config schema and status;
 * - `GET /api/deliveries/failed`, `GET /api/deliveries/{id}`, `POST /api/deliveries/{id}/retry`,
 *   `POST /api/deliveries/{id}/cancel` — dead letters (see `deliveryAccess` for who may).
 */
export async function deliveryRoutes(app: FastifyInstance, deps: Deps): Promise<void> {
  const plugins: Map<string, DeliveryPlugin> = knownPlugins();
  const disabled = await validatePlugins(deps, plugins);

  await app.register(async (hooks) => {
    // Signatures are over the raw bytes: keep the body as received, whatever its type.
    hooks.removeAllContentTypeParsers();
    hooks.addContentTypeParser('*', { parseAs: 'buffer', bodyLimit: MAX_HOOK_BODY_BYTES }, (_req, body, done) => done(null, body));
    hooks.post('/api/delivery/hooks/:plugin', {
      bodyLimit: MAX_HOOK_BODY_BYTES,
      schema: {
        tags: ['delivery'],
        summary: 'Delivery receipts and replies from a plugin’s counterpart (webhook receiver, SMS gateway)',
        description:
          '`webhook`: JSON `{"event": "delivered"|"read"|"replied"|"failed", "delivery_id"?, "provider_ref"?, "text"?, "error"?}` with ' +
          '`X-Parley-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "t.body")>` and `?org=<id|slug>`. ' +
          '`sms`: the gateway’s form-encoded status callbacks (`MessageSid`, `MessageStatus`) and incoming messages (`From`, `Body`) to `?org=<id>`, ' +
          'signed with `X-Twilio-Signature`. Errors: 401 `bad_signature`, 400 `invalid_event`, 404 (unknown plugin or delivery). See docs/delivery.md.',
        params: { type: 'object', required: ['plugin'], properties: { plugin: { type: 'string', maxLength: 40 } } },
        response: { 200: { type: 'object', properties: { matched: { type: 'integer' }, unmatched: { type: 'integer' } } }, 400: err, 401: err, 404: err },
      },
    }, async (req) => {
      const name = (req.params as { plugin: string }).plugin;
      const plugin = plugins.get(name);
      if (!plugin?.inbound) throw notFound(`delivery hook for plugin ${name}`);
      const rawBody = Buffer.isBuffer(req.body) ? req.body : Buffer.alloc(0);
      const base = deps.config.baseUrl.replace(/\/+$/, '');
      const { orgId, events } = await plugin.inbound.handle(
        { headers: req.headers, query: firstValues(req.query), rawBody, publicUrl: `${base}${req.url}`, requestUrl: `${req.protocol}://${req.headers.host ?? ''}${req.url}` },
        deps,
      );
      if (events.length === 0) return { matched: 0, unmatched: 0 };
      return applyInboundEvents(deps, plugin, orgId, events);
    });
  });

  app.get('/api/delivery/plugins', {
    preHandler: requireUser(deps),
    schema: {
      tags: ['delivery'],
      summary: 'The delivery plugins: capabilities, the JSON schema of their per-organisation config, and whether they are enabled',
      security: secured,
      response: { 401: err },
    },
  }, async () => ({
    plugins: [...plugins.values()].map((p) => ({
      name: p.name,
      capabilities: p.capabilities,
      needs_config: p.needsConfig,
      config_schema: p.configSchema,
      enabled: !disabled.has(p.name),
      disabled_reason: disabled.get(p.name) ?? null,
      inbound: p.inbound ? `/api/delivery/hooks/${p.name}` : null,
    })),
  }));

  app.get('/api/deliveries/failed', {
    schema: {
      tags: ['delivery'],
      summary: 'Dead letters: deliveries that failed at the last step of their servicechain, newest first',
      description: 'API tokens need the scope `deliveries:read` (their organisation); members `?org=<slug>`; platform admins see every organisation. Errors: 400 `invalid_cursor`, 401, 403 `insufficient_scope` / `not_admin`.',
      security: secured,
      querystring: {
        type: 'object',
        additionalProperties: false,
        properties: { ...OrgQuery, cursor: { type: 'string', maxLength: 200 }, limit: { type: 'integer', minimum: 1, maximum: MAX_PAGE, default: 100 } },
      },
      response: {
        200: { type: 'object', properties: { items: { type: 'array', items: DeliveryInfoSchema }, next_cursor: { type: 'string', nullable: true } } },
        400: err,
        401: err,
        403: err,
      },
    },
  }, async (req) => {
    const q = req.query as { cursor?: string; limit?: number };
    const { orgId } = await deliveryAccess(deps, req, 'deliveries:read');
    return listFailed(deps, { orgId, cursor: q.cursor, limit: q.limit });
  });

  app.get('/api/deliveries/:id', {
    schema: {
      tags: ['delivery'],
      summary: 'One delivery with its attempts (time, plugin, outcome, error, provider ref, worker) and events (receipts, replies, fallbacks)',
      security: secured,
      params: IdParams,
      querystring: { type: 'object', additionalProperties: false, properties: OrgQuery },
      response: { 401: err, 403: err, 404: err },
    },
  }, async (req) => {
    const { orgId } = await deliveryAccess(deps, req, 'deliveries:read');
    return getDelivery(deps, (req.params as { id: string }).id, orgId);
  });

  app.post('/api/deliveries/:id/retry', {
    schema: {
      tags: ['delivery'],
      summary: 'Retry a dead letter: back to pending at the step that failed last (default) or at the first step of its chain',
      description: 'Needs `deliveries:write`. Errors: 404, 409 `not_failed` (only failed deliveries), 409 `no_destination`.',
      security: secured,
      params: IdParams,
      querystring: { type: 'object', additionalProperties: false, properties: OrgQuery },
      body: { type: 'object', additionalProperties: false, properties: { from: { type: 'string', enum: ['failed_step', 'first_step'], default: 'failed_step' } } },
      response: { 200: DeliveryInfoSchema, 400: err, 401: err, 403: err, 404: err, 409: err },
    },
  }, async (req) => {
    const { orgId, by } = await deliveryAccess(deps, req, 'deliveries:write');
    const from = ((req.body ?? {}) as { from?: RetryFrom }).from;
    return retryDelivery(deps, (req.params as { id: string }).id, { orgId, from, by });
  });

  app.post('/api/deliveries/:id/cancel', {
    schema: {
      tags: ['delivery'],
      summary: 'Cancel a pending, in-flight or failed delivery',
      description: 'Needs `deliveries:write`. Errors: 404, 409 `not_cancellable`.',
      security: secured,
      params: IdParams,
      querystring: { type: 'object', additionalProperties: false, properties: OrgQuery },
      response: { 200: DeliveryInfoSchema, 401: err, 403: err, 404: err, 409: err },
    },
  }, async (req) => {
    const { orgId, by } = await deliveryAccess(deps, req, 'deliveries:write');
    return cancelDelivery(deps, (req.params as { id: string }).id, { orgId, by });
  });
}
