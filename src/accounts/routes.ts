import type { FastifyInstance } from 'fastify';
import type { Deps } from '../context.ts';
import { requireUser } from '../http/server.ts';
import { unauthorized } from '../platform/errors.ts';
import { verifyPassword } from './passwords.ts';
import { SESSION_COOKIE, createSession, revokeSession } from './sessions.ts';

/** Account routes: login, logout (issue 2, "Accounts"). */
export async function accountRoutes(app: FastifyInstance, deps: Deps): Promise<void> {
  app.post('/api/login', {
    schema: {
      tags: ['accounts'],
      summary: 'Log in with address and password; returns a bearer token and sets the session cookie',
      body: {
        type: 'object',
        additionalProperties: false,
        required: ['address', 'password'],
        properties: { address: { type: 'string', maxLength: 320 }, password: { type: 'string', maxLength: 512 }, device: { type: 'string', maxLength: 200 } },
      },
      response: { 401: { $ref: 'Error#' }, 429: { $ref: 'Error#' } },
    },
  }, async (req, reply) => {
    const b = req.body as { address: string; password: string; device?: string };
    const address = b.address.trim().toLowerCase();
    const u = await deps.db.kysely.selectFrom('users').select(['id', 'password_hash', 'status']).where('address', '=', address).executeTakeFirst();
    const ok = !!u?.password_hash && u.status !== 'suspended' && (await verifyPassword(u.password_hash, b.password));
    if (!ok || !u) throw unauthorized('wrong address or password', 'invalid_credentials');
    const s = await createSession(deps, u.id, 'bearer', { device: b.device ?? String(req.headers['user-agent'] ?? ''), ip: req.ip });
    reply.setCookie(SESSION_COOKIE, s.token, { path: '/', httpOnly: true, sameSite: 'lax', secure: deps.config.baseUrl.startsWith('https:'), expires: s.expiresAt });
    return { token: s.token, session_id: s.id, expires_at: s.expiresAt.toISOString() };
  });

  app.post('/api/logout', {
    preHandler: requireUser(deps),
    schema: { tags: ['accounts'], summary: 'End the current session', security: [{ bearer: [] }, { cookie: [] }] },
  }, async (req, reply) => {
    await revokeSession(deps, req.user!.id, req.user!.sessionId);
    reply.clearCookie(SESSION_COOKIE, { path: '/' });
    return reply.status(204).send();
  });
}
