import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { Deps } from '../context.ts';
import { requireAdmin } from '../accounts/admin-routes.ts';
import { requireUser } from '../http/server.ts';
import { onInboundReply } from '../delivery/inbound.ts';
import { appendActions } from '../conversations/append.ts';
import { lockConversation } from '../conversations/store.ts';
import { forbidden, notFound, badRequest } from '../platform/errors.ts';
import { createToken, listTokens, orgAuthOf, requireRole, requireScope, revokeToken, SCOPES } from './auth.ts';
import { createBlast, getBlast, listBlasts, startBlastPreparer } from './blasts.ts';
import { chainSchema } from './chains.ts';
import {
  addToGroup,
  type ContactInput,
  CONTACT_LIMITS,
  createContact,
  createGroup,
  deleteContact,
  deleteGroup,
  getContact,
  getGroup,
  listContacts,
  listGroups,
  removeFromGroup,
  renameGroup,
  updateContact,
} from './contacts.ts';
import { IMPORT_MAX_BYTES, IMPORT_MAX_ROWS, importContacts } from './csv-import.ts';
import {
  createOrganisation,
  findOrg,
  listMembers,
  listMyOrganisations,
  type NewOrganisation,
  orgView,
  removeMember,
  ROLES,
  type Role,
  setMember,
  SLUG_PATTERN,
  updateOrganisation,
} from './orgs.ts';
import { pageQuery } from './pagination.ts';
import { usage } from './quota.ts';
import { handleInboundReply } from './replies.ts';
import { getMessage, listMessages, markOrgApiTx, sendMessage } from './send.ts';

/**
 * The organisation / application API (issue 4 §5; docs/organisations.md): organisations,
 * members and roles, API tokens with scopes, contacts, groups, CSV import, messages,
 * blasts. Every route has a JSON schema (unknown fields → 400), 4xx JSON errors and cursor
 * pagination on lists. Also starts, for the web role, the blast preparer and registers the
 * engine's inbound reply handler.
 */

const err = { $ref: 'Error#' };
const secured: { [k: string]: string[] }[] = [{ bearer: [] }, { cookie: [] }];
const TAG = 'organisations';
const E = { 400: err, 401: err, 403: err, 404: err, 409: err, 429: err };

const slugParam = { slug: { type: 'string', pattern: SLUG_PATTERN } } as const;
const idParam = (name: string) => ({ type: 'object', additionalProperties: false, required: ['slug', name], properties: { ...slugParam, [name]: { type: 'integer', minimum: 1 } } });
const SlugParams = { type: 'object', additionalProperties: false, required: ['slug'], properties: slugParam } as const;

const stateCounts = {
  type: 'object',
  additionalProperties: { type: 'integer' },
  properties: Object.fromEntries(['pending', 'sending', 'sent', 'delivered', 'read', 'replied', 'failed', 'cancelled'].map((s) => [s, { type: 'integer' }])),
} as const;
const OrgSchema = {
  type: 'object',
  properties: {
    id: { type: 'integer' },
    slug: { type: 'string' },
    name: { type: 'string' },
    address: { type: 'string', description: 'The organisation’s own address: creator of its conversations with contacts' },
    default_chain: { type: 'array', items: { type: 'string' } },
    fallback: { type: 'object', additionalProperties: true },
    plugin_config: { type: 'object', additionalProperties: true, description: 'Per plugin; secret values shown as "***"' },
    quota_per_day: { type: 'integer' },
    rate_per_minute: { type: 'integer' },
    created_at: { type: 'string', format: 'date-time' },
    role: { type: 'string', enum: [...ROLES] },
    usage: { type: 'object', additionalProperties: true },
  },
} as const;
const MemberSchema = { type: 'object', properties: { address: { type: 'string' }, name: { type: 'string' }, role: { type: 'string', enum: [...ROLES] } } } as const;
const TokenSchema = {
  type: 'object',
  properties: {
    id: { type: 'string' },
    token: { type: 'string', description: 'The secret (`pat_…`), shown once' },
    name: { type: 'string' },
    scopes: { type: 'array', items: { type: 'string' } },
    created_by: { type: ['string', 'null'] },
    created_at: { type: 'string', format: 'date-time' },
    last_used_at: { type: ['string', 'null'], format: 'date-time' },
    revoked_at: { type: ['string', 'null'], format: 'date-time' },
  },
} as const;
const ContactSchema = {
  type: 'object',
  properties: {
    id: { type: 'integer' },
    name: { type: 'string' },
    email: { type: ['string', 'null'] },
    phone: { type: ['string', 'null'], description: 'E.164' },
    preferred_chain: { type: ['array', 'null'], items: { type: 'string' } },
    fields: { type: 'object', additionalProperties: { type: 'string' } },
    conversation: { type: ['string', 'null'], description: 'Key of the conversation with the contact' },
    group_ids: { type: 'array', items: { type: 'integer' } },
    created_at: { type: 'string', format: 'date-time' },
  },
} as const;
const ContactBody = (required: string[]) =>
  ({
    type: 'object',
    additionalProperties: false,
    required,
    minProperties: 1,
    properties: {
      name: { type: 'string', maxLength: CONTACT_LIMITS.nameChars },
      email: { type: ['string', 'null'], maxLength: 320 },
      phone: { type: ['string', 'null'], maxLength: 40, description: 'E.164 (`+447700900123`); spaces, dashes, dots and parentheses are removed' },
      preferred_chain: { ...chainSchema, type: ['array', 'null'] },
      fields: { type: 'object', maxProperties: CONTACT_LIMITS.fields, additionalProperties: { type: 'string', maxLength: CONTACT_LIMITS.fieldChars } },
    },
  }) as const;
const GroupSchema = { type: 'object', properties: { id: { type: 'integer' }, name: { type: 'string' }, size: { type: 'integer' } } } as const;
const DeliverySchema = {
  type: 'object',
  properties: {
    id: { type: 'integer' },
    state: { type: 'string' },
    plugin: { type: 'string' },
    destination: { type: 'string' },
    chain: { type: ['array', 'null'], items: { type: 'string' } },
    chain_index: { type: 'integer' },
    attempts: {
      type: 'array',
      items: {
        type: 'object',
        properties: { at: { type: 'string' }, plugin: { type: 'string' }, outcome: { type: 'string' }, error: { type: ['string', 'null'] }, provider_ref: { type: ['string', 'null'] } },
      },
    },
    last_error: { type: ['string', 'null'] },
    provider_ref: { type: ['string', 'null'] },
    sent_at: { type: ['string', 'null'] },
    delivered_at: { type: ['string', 'null'] },
    read_at: { type: ['string', 'null'] },
    replied_at: { type: ['string', 'null'] },
    updated_at: { type: 'string' },
  },
} as const;
const MessageSchema = {
  type: 'object',
  properties: {
    id: { type: 'integer' },
    contact_id: { type: 'integer' },
    blast_id: { type: ['integer', 'null'] },
    conversation: { type: ['string', 'null'] },
    action_id: { type: ['integer', 'null'] },
    subject: { type: 'string' },
    body: { type: 'string' },
    chain: { type: 'array', items: { type: 'string' } },
    author: { type: 'string' },
    idempotency_key: { type: ['string', 'null'] },
    created_at: { type: 'string' },
    prepared_at: { type: ['string', 'null'] },
    error: { type: ['string', 'null'] },
    state: { type: 'string', description: 'State of its delivery; `preparing` before it has one' },
    delivery_id: { type: ['integer', 'null'] },
    deliveries: { type: 'array', items: DeliverySchema },
  },
} as const;
const BlastSchema = {
  type: 'object',
  properties: {
    id: { type: 'integer' },
    group_id: { type: ['integer', 'null'] },
    subject: { type: 'string' },
    template: { type: 'string' },
    chain: { type: ['array', 'null'], items: { type: 'string' } },
    total: { type: 'integer' },
    created_by: { type: 'string' },
    idempotency_key: { type: ['string', 'null'] },
    created_at: { type: 'string' },
    prepared_at: { type: ['string', 'null'] },
    preparing: { type: 'integer', description: 'Messages without a delivery yet' },
    errors: { type: 'integer', description: 'Messages that could not be prepared (no delivery)' },
    counts: { ...stateCounts, description: 'Deliveries by state, counted from the rows at each request' },
    by_plugin: { type: 'object', additionalProperties: stateCounts },
  },
} as const;
const page = (item: object) => ({ type: 'object', properties: { items: { type: 'array', items: item }, next_cursor: { type: ['string', 'null'] } } });
const PageQuery = { type: 'object', additionalProperties: false, properties: pageQuery } as const;
const templateField = { type: 'string', minLength: 1, maxLength: 100_000, description: 'Template: {{name}}, {{email}}, {{phone}}, {{fields.KEY}}' } as const;
const idempotencyKey = { type: 'string', minLength: 1, maxLength: 200, pattern: '^[\\x21-\\x7e]+$', description: 'Replays with the same key return the first result and send nothing' } as const;

/** The API routes of organisations (see the module comment). */
export async function organisationRoutes(app: FastifyInstance, deps: Deps): Promise<void> {
  const preparer = startBlastPreparer(deps);
  // A closure per platform: stopping one platform of a process never unregisters another's.
  const unregister = onInboundReply((tx, d, reply) => handleInboundReply(tx, d, reply));
  app.addHook('onClose', async () => {
    unregister();
    await preparer.stop();
  });
  const scope = (s: (typeof SCOPES)[number] | null) => requireScope(deps, s);
  const managers = requireRole(deps, ['owner', 'admin']);

  // ---- platform admins ----
  app.post('/api/admin/organisations', {
    preHandler: requireAdmin(deps),
    schema: {
      tags: ['admin', TAG],
      summary: 'Create an organisation with its own address (a new local user of type shared or bot) and its first owner (admins only)',
      description: 'Errors: 400 `invalid_address` / `foreign_domain` / `unknown_owner` / `unknown_plugin`, 403 `not_admin`, 409 `slug_taken` / `user_exists`.',
      security: secured,
      body: {
        type: 'object',
        additionalProperties: false,
        required: ['slug', 'name', 'address', 'owner'],
        properties: {
          slug: { type: 'string', pattern: SLUG_PATTERN },
          name: { type: 'string', minLength: 1, maxLength: 200 },
          address: { type: 'string', maxLength: 320, description: 'A new address of this platform for the organisation' },
          address_type: { type: 'string', enum: ['shared', 'bot'], default: 'shared' },
          owner: { type: 'string', maxLength: 320, description: 'An existing user, the first owner' },
          default_chain: chainSchema,
          quota_per_day: { type: 'integer', minimum: 0, maximum: 100_000_000 },
          rate_per_minute: { type: 'integer', minimum: 1, maximum: 10_000_000 },
        },
      },
      response: { 201: OrgSchema, ...E },
    },
  }, async (req, reply) => {
    const o = await createOrganisation(deps, req.body as NewOrganisation);
    deps.log.info({ org: o.slug, by: req.user!.address }, 'organisation created');
    return reply.status(201).send(o);
  });

  app.patch('/api/admin/organisations/:slug', {
    preHandler: requireAdmin(deps),
    schema: {
      tags: ['admin', TAG],
      summary: 'Change an organisation’s quota and rate limit (admins only)',
      security: secured,
      params: SlugParams,
      body: {
        type: 'object',
        additionalProperties: false,
        minProperties: 1,
        properties: { quota_per_day: { type: 'integer', minimum: 0, maximum: 100_000_000 }, rate_per_minute: { type: 'integer', minimum: 1, maximum: 10_000_000 } },
      },
      response: { 200: OrgSchema, ...E },
    },
  }, async (req) => {
    const org = await findOrg(deps.db.kysely, (req.params as { slug: string }).slug);
    if (!org) throw notFound('organisation');
    return updateOrganisation(deps, org.id, req.body as { quota_per_day?: number; rate_per_minute?: number });
  });

  // ---- organisations ----
  app.get('/api/organisations', {
    preHandler: requireUser(deps),
    schema: { tags: [TAG], summary: 'The organisations the caller is a member of, with their role (by slug, paged)', security: secured, querystring: PageQuery, response: { 200: page(OrgSchema), 400: err, 401: err } },
  }, async (req) => listMyOrganisations(deps, req.user!.id, req.query as { cursor?: string; limit: number }));

  app.get('/api/organisations/:slug', {
    preHandler: scope(null),
    schema: {
      tags: [TAG],
      summary: 'An organisation, with today’s usage of its quota (any member or API token of it)',
      security: secured,
      params: SlugParams,
      response: { 200: OrgSchema, ...E },
    },
  }, async (req) => {
    const a = orgAuthOf(req);
    return { ...orgView(a.org), ...(a.role ? { role: a.role } : {}), usage: await usage(deps.db.kysely, deps, a.org) };
  });

  app.patch('/api/organisations/:slug', {
    preHandler: managers,
    schema: {
      tags: [TAG],
      summary: 'Change an organisation’s name, default servicechain, fallback windows or plugin configuration (owners and admins)',
      description:
        '`plugin_config` replaces the configuration of each plugin named (validated by the plugin; `null` removes it), e.g. ' +
        '`{"sms": {"base_url", "account", "token", "from"}, "webhook": {"url", "secret"}}`. Errors: 400 `unknown_plugin` / `invalid_chain` / `invalid_plugin_config`.',
      security: secured,
      params: SlugParams,
      body: {
        type: 'object',
        additionalProperties: false,
        minProperties: 1,
        properties: {
          name: { type: 'string', minLength: 1, maxLength: 200 },
          default_chain: chainSchema,
          fallback: {
            type: 'object',
            additionalProperties: false,
            properties: { not_delivered_s: { type: 'integer', minimum: 1, maximum: 2_592_000 }, not_read_s: { type: 'integer', minimum: 1, maximum: 2_592_000 } },
          },
          plugin_config: { type: 'object', maxProperties: 20, additionalProperties: { type: ['object', 'null'] } },
        },
      },
      response: { 200: OrgSchema, ...E },
    },
  }, async (req) => updateOrganisation(deps, orgAuthOf(req).org.id, req.body as any));

  // ---- members ----
  app.get('/api/organisations/:slug/members', {
    preHandler: scope(null),
    schema: { tags: [TAG], summary: 'Members and their roles (address order, paged)', security: secured, params: SlugParams, querystring: PageQuery, response: { 200: page(MemberSchema), ...E } },
  }, async (req) => listMembers(deps, orgAuthOf(req).org.id, req.query as { cursor?: string; limit: number }));

  app.put('/api/organisations/:slug/members/:address', {
    preHandler: managers,
    schema: {
      tags: [TAG],
      summary: 'Add a user as a member or change their role (owners and admins; only owners give or take the owner role)',
      description: 'Roles: `owner` and `admin` manage members, tokens and settings and have every scope; `member` has contacts:read, contacts:write, messages:send, deliveries:read. Errors: 400 `unknown_user` / `last_owner`, 403 `owner_only` / `insufficient_role`.',
      security: secured,
      params: { type: 'object', additionalProperties: false, required: ['slug', 'address'], properties: { ...slugParam, address: { type: 'string', maxLength: 320 } } },
      body: { type: 'object', additionalProperties: false, required: ['role'], properties: { role: { type: 'string', enum: [...ROLES] } } },
      response: { 200: MemberSchema, ...E },
    },
  }, async (req) => {
    const a = orgAuthOf(req);
    return setMember(deps, a.org.id, a.role!, (req.params as { address: string }).address, (req.body as { role: Role }).role);
  });

  app.delete('/api/organisations/:slug/members/:address', {
    preHandler: managers,
    schema: {
      tags: [TAG],
      summary: 'Remove a member (owners and admins; only owners remove owners; the last owner stays)',
      security: secured,
      params: { type: 'object', additionalProperties: false, required: ['slug', 'address'], properties: { ...slugParam, address: { type: 'string', maxLength: 320 } } },
      response: { 204: { type: 'null' }, ...E },
    },
  }, async (req, reply) => {
    const a = orgAuthOf(req);
    await removeMember(deps, a.org.id, a.role!, (req.params as { address: string }).address);
    return reply.status(204).send();
  });

  // ---- API tokens ----
  app.post('/api/organisations/:slug/tokens', {
    preHandler: managers,
    schema: {
      tags: [TAG],
      summary: 'Create an API token with scopes (owners and admins); the secret is returned once',
      description: `Scopes: ${SCOPES.join(', ')}. Use it as \`Authorization: Bearer pat_…\` on this organisation’s routes. Errors: 400 \`invalid_scope\`, 403 \`insufficient_role\` (members) / \`session_required\` (tokens).`,
      security: secured,
      params: SlugParams,
      body: {
        type: 'object',
        additionalProperties: false,
        required: ['scopes'],
        properties: { name: { type: 'string', maxLength: 200 }, scopes: { type: 'array', minItems: 1, maxItems: SCOPES.length, items: { type: 'string', maxLength: 40 } } },
      },
      response: { 201: TokenSchema, ...E },
    },
  }, async (req, reply) => {
    const a = orgAuthOf(req);
    const t = await createToken(deps, a.org.id, a.user!.id, req.body as { name?: string; scopes: string[] });
    deps.log.info({ org: a.org.slug, token: t.id, scopes: t.scopes, by: a.actor }, 'API token created');
    return reply.status(201).send(t);
  });

  app.get('/api/organisations/:slug/tokens', {
    preHandler: managers,
    schema: { tags: [TAG], summary: 'API tokens (never their secrets), paged (owners and admins)', security: secured, params: SlugParams, querystring: PageQuery, response: { 200: page(TokenSchema), ...E } },
  }, async (req) => listTokens(deps, orgAuthOf(req).org.id, req.query as { cursor?: string; limit: number }));

  app.delete('/api/organisations/:slug/tokens/:id', {
    preHandler: managers,
    schema: {
      tags: [TAG],
      summary: 'Revoke an API token at once (owners and admins)',
      security: secured,
      params: { type: 'object', additionalProperties: false, required: ['slug', 'id'], properties: { ...slugParam, id: { type: 'string', maxLength: 40 } } },
      response: { 204: { type: 'null' }, ...E },
    },
  }, async (req, reply) => {
    await revokeToken(deps, orgAuthOf(req).org.id, (req.params as { id: string }).id);
    return reply.status(204).send();
  });

  // ---- contacts ----
  app.post('/api/organisations/:slug/contacts', {
    preHandler: scope('contacts:write'),
    schema: {
      tags: [TAG],
      summary: 'Create a contact (email and/or E.164 phone, preferred chain, custom fields)',
      description: 'Errors: 400 `invalid_phone` / `invalid_email` / `no_address` / `invalid_field` / `unknown_plugin`, 409 `contact_exists` (same email or phone).',
      security: secured,
      params: SlugParams,
      body: ContactBody([]),
      response: { 201: ContactSchema, ...E },
    },
  }, async (req, reply) => reply.status(201).send(await createContact(deps, orgAuthOf(req).org.id, req.body as ContactInput)));

  app.get('/api/organisations/:slug/contacts', {
    preHandler: scope('contacts:read'),
    schema: {
      tags: [TAG],
      summary: 'Contacts in id order, paged; filter by group, exact email or phone',
      security: secured,
      params: SlugParams,
      querystring: {
        type: 'object',
        additionalProperties: false,
        properties: { ...pageQuery, group_id: { type: 'integer', minimum: 1 }, email: { type: 'string', maxLength: 320 }, phone: { type: 'string', maxLength: 40 } },
      },
      response: { 200: page(ContactSchema), ...E },
    },
  }, async (req) => listContacts(deps, orgAuthOf(req).org.id, req.query as any));

  await app.register(async (csv) => {
    csv.addContentTypeParser(['text/csv', 'application/csv'], { parseAs: 'string', bodyLimit: IMPORT_MAX_BYTES }, (_req, body, done) => done(null, body));
    csv.post('/api/organisations/:slug/contacts/import', {
    preHandler: scope('contacts:write'),
    bodyLimit: IMPORT_MAX_BYTES,
    schema: {
      tags: [TAG],
      summary: 'Import contacts from CSV (text/csv): header name,email,phone,group + custom field columns',
      description:
        `Rows are matched by email, else phone, and updated, or created. Invalid rows are skipped and reported with their line number. ` +
        `At most ${IMPORT_MAX_ROWS} rows and ${IMPORT_MAX_BYTES} bytes. National numbers need \`default_country_code\`. ` +
        'Errors: 400 `invalid_csv` / `invalid_header` / `too_many_rows` / `invalid_country_code`, 413, 415 (not text/csv).',
      security: secured,
      params: SlugParams,
      querystring: { type: 'object', additionalProperties: false, properties: { default_country_code: { type: 'string', pattern: '^\\+?[1-9][0-9]{0,2}$' } } },
      response: {
        200: {
          type: 'object',
          properties: {
            created: { type: 'integer' },
            updated: { type: 'integer' },
            skipped: { type: 'array', items: { type: 'object', properties: { line: { type: 'integer' }, reason: { type: 'string' } } } },
          },
        },
        ...E,
        413: err,
        415: err,
      },
    },
  }, async (req) => {
    if (typeof req.body !== 'string') throw badRequest('invalid_csv', 'send the CSV as the body with Content-Type: text/csv');
    return importContacts(deps, orgAuthOf(req).org.id, req.body, (req.query as { default_country_code?: string }).default_country_code);
  });
  });

  app.get('/api/organisations/:slug/contacts/:id', {
    preHandler: scope('contacts:read'),
    schema: { tags: [TAG], summary: 'A contact, with its groups and conversation', security: secured, params: idParam('id'), response: { 200: ContactSchema, ...E } },
  }, async (req) => getContact(deps, orgAuthOf(req).org.id, (req.params as { id: number }).id));

  app.patch('/api/organisations/:slug/contacts/:id', {
    preHandler: scope('contacts:write'),
    schema: {
      tags: [TAG],
      summary: 'Change a contact (`null` clears email, phone or preferred_chain; `fields` replaces all custom fields)',
      security: secured,
      params: idParam('id'),
      body: ContactBody([]),
      response: { 200: ContactSchema, ...E },
    },
  }, async (req) => updateContact(deps, orgAuthOf(req).org.id, (req.params as { id: number }).id, req.body as ContactInput));

  app.delete('/api/organisations/:slug/contacts/:id', {
    preHandler: scope('contacts:write'),
    schema: {
      tags: [TAG],
      summary: 'Delete a contact with its outbound messages and their deliveries (the conversation stays)',
      security: secured,
      params: idParam('id'),
      response: { 204: { type: 'null' }, ...E },
    },
  }, async (req, reply) => {
    await deleteContact(deps, orgAuthOf(req).org.id, (req.params as { id: number }).id);
    return reply.status(204).send();
  });

  // ---- groups ----
  const GroupBody = { type: 'object', additionalProperties: false, required: ['name'], properties: { name: { type: 'string', minLength: 1, maxLength: 200 } } } as const;
  app.post('/api/organisations/:slug/groups', {
    preHandler: scope('contacts:write'),
    schema: { tags: [TAG], summary: 'Create a contact group', description: 'Errors: 409 `group_exists`.', security: secured, params: SlugParams, body: GroupBody, response: { 201: GroupSchema, ...E } },
  }, async (req, reply) => reply.status(201).send(await createGroup(deps, orgAuthOf(req).org.id, (req.body as { name: string }).name)));

  app.get('/api/organisations/:slug/groups', {
    preHandler: scope('contacts:read'),
    schema: { tags: [TAG], summary: 'Contact groups with their sizes, paged', security: secured, params: SlugParams, querystring: PageQuery, response: { 200: page(GroupSchema), ...E } },
  }, async (req) => listGroups(deps, orgAuthOf(req).org.id, req.query as { cursor?: string; limit: number }));

  app.get('/api/organisations/:slug/groups/:id', {
    preHandler: scope('contacts:read'),
    schema: { tags: [TAG], summary: 'A contact group', security: secured, params: idParam('id'), response: { 200: GroupSchema, ...E } },
  }, async (req) => getGroup(deps, orgAuthOf(req).org.id, (req.params as { id: number }).id));

  app.patch('/api/organisations/:slug/groups/:id', {
    preHandler: scope('contacts:write'),
    schema: { tags: [TAG], summary: 'Rename a contact group', security: secured, params: idParam('id'), body: GroupBody, response: { 200: GroupSchema, ...E } },
  }, async (req) => renameGroup(deps, orgAuthOf(req).org.id, (req.params as { id: number }).id, (req.body as { name: string }).name));

  app.delete('/api/organisations/:slug/groups/:id', {
    preHandler: scope('contacts:write'),
    schema: { tags: [TAG], summary: 'Delete a contact group (its contacts stay)', security: secured, params: idParam('id'), response: { 204: { type: 'null' }, ...E } },
  }, async (req, reply) => {
    await deleteGroup(deps, orgAuthOf(req).org.id, (req.params as { id: number }).id);
    return reply.status(204).send();
  });

  app.get('/api/organisations/:slug/groups/:id/members', {
    preHandler: scope('contacts:read'),
    schema: { tags: [TAG], summary: 'The contacts of a group, paged', security: secured, params: idParam('id'), querystring: PageQuery, response: { 200: page(ContactSchema), ...E } },
  }, async (req) => {
    const a = orgAuthOf(req);
    const id = (req.params as { id: number }).id;
    await getGroup(deps, a.org.id, id);
    return listContacts(deps, a.org.id, { ...(req.query as { cursor?: string; limit: number }), group_id: id });
  });

  app.post('/api/organisations/:slug/groups/:id/members', {
    preHandler: scope('contacts:write'),
    schema: {
      tags: [TAG],
      summary: `Add contacts to a group (at most ${CONTACT_LIMITS.groupBatch} per request; members already in it are unchanged)`,
      description: 'Errors: 400 `unknown_contact` (nothing added), 404 (no such group).',
      security: secured,
      params: idParam('id'),
      body: {
        type: 'object',
        additionalProperties: false,
        required: ['contact_ids'],
        properties: { contact_ids: { type: 'array', minItems: 1, maxItems: CONTACT_LIMITS.groupBatch, items: { type: 'integer', minimum: 1 } } },
      },
      response: { 200: { type: 'object', properties: { added: { type: 'integer' } } }, ...E },
    },
  }, async (req) => addToGroup(deps, orgAuthOf(req).org.id, (req.params as { id: number }).id, (req.body as { contact_ids: number[] }).contact_ids));

  app.delete('/api/organisations/:slug/groups/:id/members/:contact_id', {
    preHandler: scope('contacts:write'),
    schema: {
      tags: [TAG],
      summary: 'Remove a contact from a group',
      security: secured,
      params: { type: 'object', additionalProperties: false, required: ['slug', 'id', 'contact_id'], properties: { ...slugParam, id: { type: 'integer', minimum: 1 }, contact_id: { type: 'integer', minimum: 1 } } },
      response: { 204: { type: 'null' }, ...E },
    },
  }, async (req, reply) => {
    const p = req.params as { id: number; contact_id: number };
    await removeFromGroup(deps, orgAuthOf(req).org.id, p.id, p.contact_id);
    return reply.status(204).send();
  });

  // ---- messages and blasts ----
  app.post('/api/organisations/:slug/messages', {
    preHandler: scope('messages:send'),
    schema: {
      tags: [TAG],
      summary: 'Send a message to a contact (201, or 200 for an idempotent replay) — or to a group, which starts a blast (202)',
      description:
        'The body (and subject) are templates: {{name}}, {{email}}, {{phone}}, {{fields.KEY}}; a value the contact lacks renders empty; anything else is 400 `unknown_placeholder`. ' +
        'The message is a message:add by the organisation’s address in its conversation with the contact (created on the first message), delivered along `chain`, else the contact’s preferred chain, else the organisation’s. ' +
        'A group needs the blasts:send scope too. Errors: 400 `unknown_placeholder` / `unknown_plugin` / `invalid_chain` / `no_destination`, 403 `insufficient_scope`, 404, 409 `idempotency_key_reused`, 429 `quota_exceeded` / `rate_limited`.',
      security: secured,
      params: SlugParams,
      body: {
        type: 'object',
        additionalProperties: false,
        required: ['body'],
        oneOf: [{ required: ['contact_id'] }, { required: ['group_id'] }],
        properties: {
          contact_id: { type: 'integer', minimum: 1 },
          group_id: { type: 'integer', minimum: 1 },
          subject: { type: 'string', maxLength: 998 },
          body: templateField,
          chain: chainSchema,
          idempotency_key: idempotencyKey,
        },
      },
      response: { 200: MessageSchema, 201: MessageSchema, 202: BlastSchema, ...E },
    },
  }, async (req, reply) => {
    const a = orgAuthOf(req);
    const b = req.body as { contact_id?: number; group_id?: number; subject?: string; body: string; chain?: string[]; idempotency_key?: string };
    if (b.group_id !== undefined) {
      if (!a.scopes.has('blasts:send')) throw forbidden('insufficient_scope', 'sending to a group needs the scope blasts:send', { scope: 'blasts:send' });
      return blastReply(reply, await createBlast(deps, a.org, a.actor, { group_id: b.group_id, subject: b.subject, template: b.body, chain: b.chain, idempotency_key: b.idempotency_key }));
    }
    const r = await sendMessage(deps, a.org, { contact_id: b.contact_id!, subject: b.subject, body: b.body, chain: b.chain, idempotency_key: b.idempotency_key });
    if (!r.replayed) deps.log.info({ org: a.org.slug, message: r.message.id, by: a.actor }, 'organisation message sent');
    return reply.status(r.replayed ? 200 : 201).send(r.message);
  });

  app.get('/api/organisations/:slug/messages', {
    preHandler: scope('deliveries:read'),
    schema: {
      tags: [TAG],
      summary: 'Outbound messages, newest first, paged; filter by contact or blast',
      security: secured,
      params: SlugParams,
      querystring: { type: 'object', additionalProperties: false, properties: { ...pageQuery, contact_id: { type: 'integer', minimum: 1 }, blast_id: { type: 'integer', minimum: 1 } } },
      response: { 200: page(MessageSchema), ...E },
    },
  }, async (req) => listMessages(deps, orgAuthOf(req).org.id, req.query as any));

  app.get('/api/organisations/:slug/messages/:id', {
    preHandler: scope('deliveries:read'),
    schema: { tags: [TAG], summary: 'An outbound message: its delivery’s state along the chain and every attempt', security: secured, params: idParam('id'), response: { 200: MessageSchema, ...E } },
  }, async (req) => getMessage(deps, orgAuthOf(req).org.id, (req.params as { id: number }).id));

  const blastReply = (reply: FastifyReply, r: Awaited<ReturnType<typeof createBlast>>) => {
    if (!r.replayed) preparer.kick();
    return reply.status(r.replayed ? 200 : 202).send(r.blast);
  };

  app.post('/api/organisations/:slug/blasts', {
    preHandler: scope('blasts:send'),
    schema: {
      tags: [TAG],
      summary: 'Start a blast: one templated message to every contact of a group (202; 200 for an idempotent replay)',
      description:
        'Created in one transaction (the group’s contacts at that moment); each message is then prepared in the background (paced by the rate limit) as a message in the contact’s conversation with its delivery. ' +
        'A blast larger than the remaining daily quota is refused with 429 `quota_exceeded` before anything is created. Errors: 400 `unknown_placeholder` / `empty_group` / `unknown_plugin`, 404, 409, 429.',
      security: secured,
      params: SlugParams,
      body: {
        type: 'object',
        additionalProperties: false,
        required: ['group_id', 'template'],
        properties: { group_id: { type: 'integer', minimum: 1 }, subject: { type: 'string', maxLength: 998 }, template: templateField, chain: chainSchema, idempotency_key: idempotencyKey },
      },
      response: { 200: BlastSchema, 202: BlastSchema, ...E },
    },
  }, async (req, reply) => {
    const a = orgAuthOf(req);
    return blastReply(reply, await createBlast(deps, a.org, a.actor, req.body as any));
  });

  app.get('/api/organisations/:slug/blasts', {
    preHandler: scope('deliveries:read'),
    schema: { tags: [TAG], summary: 'Blasts, newest first, with their counts (at most 100 per page)', security: secured, params: SlugParams, querystring: PageQuery, response: { 200: page(BlastSchema), ...E } },
  }, async (req) => listBlasts(deps, orgAuthOf(req).org.id, req.query as { cursor?: string; limit: number }));

  app.get('/api/organisations/:slug/blasts/:id', {
    preHandler: scope('deliveries:read'),
    schema: {
      tags: [TAG],
      summary: 'A blast with live counts by state and by plugin, computed from its deliveries at each request',
      security: secured,
      params: idParam('id'),
      response: { 200: BlastSchema, ...E },
    },
  }, async (req) => getBlast(deps, orgAuthOf(req).org.id, (req.params as { id: number }).id));

  // ---- members in contact conversations ----
  app.post('/api/organisations/:slug/conversations/:key/join', {
    preHandler: requireRole(deps, ROLES),
    schema: {
      tags: [TAG],
      summary: 'Join one of the organisation’s contact conversations as a participant (members), to read and reply through the client API',
      description: 'The organisation’s address adds the member (participant:add, write). Their replies reach the contact along the contact’s servicechain.',
      security: secured,
      params: { type: 'object', additionalProperties: false, required: ['slug', 'key'], properties: { ...slugParam, key: { type: 'string', pattern: '^[0-9a-f]{32}$' } } },
      response: { 200: { type: 'object', properties: { conversation: { type: 'string' }, joined: { type: 'boolean' } } }, ...E },
    },
  }, async (req: FastifyRequest) => {
    const a = orgAuthOf(req);
    const key = (req.params as { key: string }).key;
    return deps.db.kysely.transaction().execute(async (tx) => {
      const row = await lockConversation(tx, key);
      if (!row || row.org_id !== a.org.id) throw notFound('conversation');
      const p = await tx.selectFrom('participants').select('removed_id').where('conv_id', '=', row.id).where('address', '=', a.user!.address).executeTakeFirst();
      if (p && p.removed_id === null) return { conversation: row.key, joined: false };
      markOrgApiTx(tx, 'all');
      await appendActions(tx, deps, row, a.org.address, [{ act: 'participant:add', participant: a.user!.address, perms: 'write' }]);
      return { conversation: row.key, joined: true };
    });
  });
}
