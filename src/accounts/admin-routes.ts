import type { FastifyInstance, FastifyRequest } from 'fastify';
import type { Deps } from '../context.ts';
import { requireUser } from '../http/server.ts';
import { forbidden } from '../platform/errors.ts';
import { PASSWORD_LIMITS } from './passwords.ts';
import { type UserPatch, createUser, listUsers, updateUser } from './users.ts';

const err = { $ref: 'Error#' };
const secured: { [k: string]: string[] }[] = [{ bearer: [] }, { cookie: [] }];

/** Body and list-item shape of a user in the admin API (see UserInfo in users.ts). */
const UserInfoSchema = {
  type: 'object',
  required: ['id', 'address', 'name', 'is_admin', 'status', 'has_password', 'created_at'],
  properties: {
    id: { type: 'integer' },
    address: { type: 'string' },
    name: { type: 'string' },
    is_admin: { type: 'boolean' },
    status: { type: 'string', enum: ['active', 'away', 'dormant', 'suspended'] },
    has_password: { type: 'boolean', description: 'false: the user cannot log in until a password is set' },
    created_at: { type: 'string', format: 'date-time' },
  },
} as const;

/** The length minimum is checked by users.ts (400 `weak_password`), the maximum here too. */
const password = { type: 'string', maxLength: PASSWORD_LIMITS.max } as const;

/**
 * A preHandler for admin routes: authenticates like `requireUser`, then requires the admin flag.
 * @throws AppError 401 (no valid session), 403 `not_admin`
 */
export function requireAdmin(deps: Deps) {
  const auth = requireUser(deps);
  return async (req: FastifyRequest) => {
    await auth(req);
    if (!req.user!.isAdmin) throw forbidden('not_admin', 'this needs an administrator');
  };
}

/**
 * The admin API (issue 2 §3: "users created by `parley user add` and by an admin API (no
 * public sign-up)"): create, list and change users. Every route answers 401 without a
 * session and 403 `not_admin` to non-admins.
 */
export async function adminRoutes(app: FastifyInstance, deps: Deps): Promise<void> {
  const admin = requireAdmin(deps);

  app.post('/api/admin/users', {
    preHandler: admin,
    schema: {
      tags: ['admin'],
      summary: 'Create a user of one of this platform’s domains (admins only)',
      description:
        `Without \`password\` the user exists (can receive mail and join conversations) but cannot log in until an admin sets one. Passwords are ${PASSWORD_LIMITS.min}-${PASSWORD_LIMITS.max} characters. ` +
        'Errors: 400 `invalid_address` / `foreign_domain` / `weak_password` / `invalid_request`, 403 `not_admin`, 409 `user_exists`.',
      security: secured,
      body: {
        type: 'object',
        additionalProperties: false,
        required: ['address'],
        properties: {
          address: { type: 'string', maxLength: 320 },
          name: { type: 'string', maxLength: 200 },
          password,
          is_admin: { type: 'boolean', default: false },
        },
      },
      response: { 201: UserInfoSchema, 400: err, 401: err, 403: err, 409: err },
    },
  }, async (req, reply) => {
    const b = req.body as { address: string; name?: string; password?: string; is_admin: boolean };
    const u = await createUser(deps, { address: b.address, name: b.name, password: b.password, isAdmin: b.is_admin });
    deps.log.info({ address: u.address, by: req.user!.address, is_admin: u.is_admin }, 'user created');
    return reply.status(201).send(u);
  });

  app.get('/api/admin/users', {
    preHandler: admin,
    schema: {
      tags: ['admin'],
      summary: 'List users in address order, paged: pass the previous page’s `next_after` as `after` (admins only)',
      security: secured,
      querystring: {
        type: 'object',
        additionalProperties: false,
        properties: {
          after: { type: 'string', maxLength: 320, description: 'Exclusive: the last address of the previous page' },
          limit: { type: 'integer', minimum: 1, maximum: 500, default: 100 },
        },
      },
      response: {
        200: {
          type: 'object',
          required: ['items', 'next_after'],
          properties: { items: { type: 'array', items: UserInfoSchema }, next_after: { type: ['string', 'null'], description: 'null on the last page' } },
        },
        400: err,
        401: err,
        403: err,
      },
    },
  }, async (req) => {
    const q = req.query as { after?: string; limit: number };
    const rows = await listUsers(deps, { after: q.after, limit: q.limit + 1 });
    const items = rows.slice(0, q.limit);
    return { items, next_after: rows.length > q.limit ? items[items.length - 1].address : null };
  });

  app.patch('/api/admin/users/:address', {
    preHandler: admin,
    schema: {
      tags: ['admin'],
      summary: 'Change a user: suspend or reactivate, rename, grant or withdraw admin, set or remove the password (admins only)',
      description:
        'Suspending (`status: "suspended"`) stops every session of the user at once and refuses their logins (403 `account_suspended`); `status: "active"` reactivates, ' +
        'and the user logs in afresh. Setting `password` (a reset) or removing it (`null`: no login) also revokes all their sessions. ' +
        'An admin cannot suspend or demote themselves (400 `self_lockout`). Errors: 400, 403 `not_admin`, 404 (no such user).',
      security: secured,
      params: { type: 'object', required: ['address'], additionalProperties: false, properties: { address: { type: 'string', maxLength: 320 } } },
      body: {
        type: 'object',
        additionalProperties: false,
        minProperties: 1,
        properties: {
          status: { type: 'string', enum: ['active', 'suspended'] },
          name: { type: 'string', maxLength: 200 },
          is_admin: { type: 'boolean' },
          // A type list, not anyOf: with coerceTypes, anyOf would turn null into "".
          password: { type: ['string', 'null'], maxLength: PASSWORD_LIMITS.max },
        },
      },
      response: { 200: UserInfoSchema, 400: err, 401: err, 403: err, 404: err },
    },
  }, async (req) => {
    const { address } = req.params as { address: string };
    const u = await updateUser(deps, req.user!.id, address, req.body as UserPatch);
    const changed = Object.keys(req.body as object).map((k) => (k === 'password' ? 'password' : `${k}=${JSON.stringify((req.body as any)[k])}`));
    deps.log.info({ address: u.address, by: req.user!.address, changed }, 'user changed');
    return u;
  });
}
