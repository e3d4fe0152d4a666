import { randomBytes } from 'node:crypto';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { Deps } from '../context.ts';
import { requireUser } from '../http/server.ts';
import { normalizeAddress } from '../mail/address.ts';
import { forbidden, notFound, unauthorized } from '../platform/errors.ts';
import { adminRoutes } from './admin-routes.ts';
import { hashPassword, verifyPassword } from './passwords.ts';
import { SESSION_COOKIE, createSession, listSessions, revokeSession } from './sessions.ts';
import { LOGIN_THROTTLE, clearLoginFailures, forgetLoginAttempt, recordLoginAttempt } from './throttle.ts';
import { getProfile } from './users.ts';

const err = { $ref: 'Error#' };
const secured: { [k: string]: string[] }[] = [{ bearer: [] }, { cookie: [] }];

/** A hash of a random password, verified when the address has no password so that timing does not reveal which addresses exist. */
let dummyHash: Promise<string> | undefined;
const dummy = () => (dummyHash ??= hashPassword(randomBytes(18).toString('base64url')));

/**
 * The session kind recorded for a login: 'cookie' when the request comes from a browser —
 * it carries the Fetch Metadata header `Sec-Fetch-Site`, which every current browser sends on
 * every request and page scripts cannot set (Node's fetch sends only `Sec-Fetch-Mode`) — else
 * 'bearer'. Both kinds get the token in the body and the
 * cookie; the kind tells the owner which of their sessions is which.
 */
function sessionKind(req: FastifyRequest): 'cookie' | 'bearer' {
  return req.headers['sec-fetch-site'] !== undefined ? 'cookie' : 'bearer';
}

function setSessionCookie(deps: Deps, reply: FastifyReply, token: string, expires: Date): void {
  reply.setCookie(SESSION_COOKIE, token, { path: '/', httpOnly: true, sameSite: 'lax', secure: deps.config.baseUrl.startsWith('https:'), expires });
}

const SessionInfoSchema = {
  type: 'object',
  required: ['id', 'kind', 'device', 'ip', 'created_at', 'last_seen_at', 'expires_at', 'current'],
  properties: {
    id: { type: 'string' },
    kind: { type: 'string', enum: ['cookie', 'bearer'] },
    device: { type: 'string' },
    ip: { type: 'string' },
    created_at: { type: 'string', format: 'date-time' },
    last_seen_at: { type: 'string', format: 'date-time' },
    expires_at: { type: 'string', format: 'date-time' },
    current: { type: 'boolean' },
  },
} as const;

/**
 * Account routes (issue 2 §3, "Accounts"): login with throttling, logout, the caller's
 * profile, listing and revoking one's sessions; and the admin API (./admin-routes.ts).
 */
export async function accountRoutes(app: FastifyInstance, deps: Deps): Promise<void> {
  const auth = requireUser(deps);

  app.post('/api/login', {
    schema: {
      tags: ['accounts'],
      summary: 'Log in with address and password; returns a bearer token and sets the session cookie',
      description:
        'Password login (argon2id). Answers `{token, session_id, expires_at}` and sets the `parley_session` cookie (HttpOnly, SameSite=Lax, Secure on https) with the same token: ' +
        'API clients send `Authorization: Bearer <token>`, browsers use the cookie. The session is recorded as kind `cookie` when the request carries the ' +
        'browser Fetch Metadata header `Sec-Fetch-Site`, else as `bearer`. `device` (else the User-Agent) and the client IP are recorded for GET /api/sessions. ' +
        `Throttling: within any ${LOGIN_THROTTLE.windowS / 60} minutes at most ${LOGIN_THROTTLE.perAddress} failed logins per address and ${LOGIN_THROTTLE.perIp} per client IP ` +
        '(IPv6: per /64) are evaluated; further attempts get 429 `rate_limited` without the password being checked, with `details.retry_after_s` and a `Retry-After` header ' +
        '(seconds until an attempt is allowed again). A successful login clears the failures of its address. ' +
        'Errors: 401 `invalid_credentials` (unknown address, no password set, or wrong password — indistinguishable, also in timing), ' +
        '403 `account_suspended` (right password, suspended account), 429 `rate_limited`.',
      body: {
        type: 'object',
        additionalProperties: false,
        required: ['address', 'password'],
        properties: {
          address: { type: 'string', maxLength: 320 },
          password: { type: 'string', maxLength: 512 },
          device: { type: 'string', maxLength: 200, description: 'A name for this session, e.g. "Alice’s laptop"; defaults to the User-Agent' },
        },
      },
      response: {
        200: {
          type: 'object',
          required: ['token', 'session_id', 'expires_at'],
          properties: {
            token: { type: 'string', description: 'The secret session token; shown once' },
            session_id: { type: 'string', description: 'Public id of the session (listing, revoking)' },
            expires_at: { type: 'string', format: 'date-time' },
          },
        },
        400: err,
        401: err,
        403: err,
        429: err,
      },
    },
  }, async (req, reply) => {
    const b = req.body as { address: string; password: string; device?: string };
    let address: string;
    try {
      address = normalizeAddress(b.address);
    } catch {
      address = b.address.trim().toLowerCase(); // cannot exist; still counted and timed like any other
    }
    const attempt = await recordLoginAttempt(deps, address, req.ip);
    const u = await deps.db.kysely.selectFrom('users').select(['id', 'password_hash', 'status']).where('address', '=', address).executeTakeFirst();
    const matches = await verifyPassword(u?.password_hash ?? (await dummy()), b.password);
    if (!u?.password_hash || !matches) {
      deps.log.info({ address, ip: req.ip }, 'login failed');
      throw unauthorized('wrong address or password', 'invalid_credentials');
    }
    if (u.status === 'suspended') {
      await forgetLoginAttempt(deps, attempt);
      throw forbidden('account_suspended', 'this account is suspended; ask an administrator');
    }
    await clearLoginFailures(deps, address);
    const s = await createSession(deps, u.id, sessionKind(req), { device: b.device ?? String(req.headers['user-agent'] ?? ''), ip: req.ip });
    setSessionCookie(deps, reply, s.token, s.expiresAt);
    return { token: s.token, session_id: s.id, expires_at: s.expiresAt.toISOString() };
  });

  app.post('/api/logout', {
    preHandler: auth,
    schema: {
      tags: ['accounts'],
      summary: 'End the current session (its token stops working) and clear the session cookie',
      security: secured,
      response: { 204: { type: 'null' }, 401: err },
    },
  }, async (req, reply) => {
    await revokeSession(deps, req.user!.id, req.user!.sessionId);
    reply.clearCookie(SESSION_COOKIE, { path: '/' });
    return reply.status(204).send();
  });

  app.get('/api/me', {
    preHandler: auth,
    schema: {
      tags: ['accounts'],
      summary: 'The caller: address, name, admin flag, status and the current session id',
      security: secured,
      response: {
        200: {
          type: 'object',
          required: ['address', 'name', 'common_name', 'timezone', 'is_admin', 'status', 'created_at', 'session_id'],
          properties: {
            address: { type: 'string' },
            name: { type: 'string' },
            common_name: { type: 'string' },
            timezone: { type: 'string' },
            is_admin: { type: 'boolean' },
            status: { type: 'string', enum: ['active', 'away', 'dormant', 'suspended'] },
            created_at: { type: 'string', format: 'date-time' },
            session_id: { type: 'string' },
          },
        },
        401: err,
      },
    },
  }, async (req) => getProfile(deps, req.user!.id, req.user!.sessionId));

  app.get('/api/sessions', {
    preHandler: auth,
    schema: {
      tags: ['accounts'],
      summary: "The caller's live sessions (unrevoked, unexpired), newest first, with device and IP; `current` marks this one",
      security: secured,
      response: { 200: { type: 'object', required: ['items'], properties: { items: { type: 'array', items: SessionInfoSchema } } }, 401: err },
    },
  }, async (req) => ({ items: await listSessions(deps, req.user!.id, req.user!.sessionId) }));

  app.delete('/api/sessions/:id', {
    preHandler: auth,
    schema: {
      tags: ['accounts'],
      summary: "Revoke one of the caller's sessions: its token stops working at once on this process and within a second on the platform's other processes (404 for unknown, already revoked or other users' sessions)",
      security: secured,
      params: { type: 'object', required: ['id'], additionalProperties: false, properties: { id: { type: 'string', maxLength: 100 } } },
      response: { 204: { type: 'null' }, 401: err, 404: err },
    },
  }, async (req, reply) => {
    const { id } = req.params as { id: string };
    if (!(await revokeSession(deps, req.user!.id, id))) throw notFound(`session ${id}`);
    if (id === req.user!.sessionId) reply.clearCookie(SESSION_COOKIE, { path: '/' });
    return reply.status(204).send();
  });

  await adminRoutes(app, deps);
}
