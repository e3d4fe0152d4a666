import { createHash, randomBytes } from 'node:crypto';
import type { Deps } from '../context.ts';

/** The authenticated caller of a request. */
export interface AuthUser {
  id: number;
  address: string;
  isAdmin: boolean;
  sessionId: string;
}

/** Name of the session cookie of browsers. */
export const SESSION_COOKIE = 'parley_session';

const tokenHash = (token: string) => createHash('sha256').update(token).digest('hex');

/**
 * Creates a session: a random 256-bit secret token (returned once, stored only as its
 * SHA-256) and a public session id for listing and revoking.
 * @param kind 'cookie' for browsers, 'bearer' for API clients
 */
export async function createSession(
  deps: Deps,
  userId: number,
  kind: 'cookie' | 'bearer',
  meta: { device: string; ip: string },
): Promise<{ id: string; token: string; expiresAt: Date }> {
  const id = `ses_${randomBytes(9).toString('base64url')}`;
  const token = `prl_${randomBytes(32).toString('base64url')}`;
  const expiresAt = new Date(deps.clock.now() + deps.config.sessionDays * 86_400_000);
  await deps.db.kysely
    .insertInto('sessions')
    .values({
      id,
      token_hash: tokenHash(token),
      user_id: userId,
      kind,
      device: meta.device.slice(0, 200),
      ip: meta.ip,
      expires_at: expiresAt,
      revoked_at: null,
    })
    .execute();
  return { id, token, expiresAt };
}

/** Resolves a session token to its user, or null when unknown, expired or revoked. */
export async function resolveSession(deps: Deps, token: string): Promise<AuthUser | null> {
  if (!token || token.length > 200) return null;
  const row = await deps.db.kysely
    .selectFrom('sessions')
    .innerJoin('users', 'users.id', 'sessions.user_id')
    .select(['sessions.id as sid', 'sessions.expires_at', 'sessions.revoked_at', 'sessions.last_seen_at', 'users.id', 'users.address', 'users.is_admin', 'users.status'])
    .where('sessions.token_hash', '=', tokenHash(token))
    .executeTakeFirst();
  const now = deps.clock.now();
  if (!row || row.revoked_at || new Date(row.expires_at).getTime() <= now || row.status === 'suspended') return null;
  // Refresh last_seen_at at most once a minute (cheap on the hot path).
  if (now - new Date(row.last_seen_at).getTime() > 60_000) {
    await deps.db.kysely.updateTable('sessions').set({ last_seen_at: new Date(now) }).where('id', '=', row.sid).execute();
  }
  return { id: row.id, address: row.address, isAdmin: row.is_admin, sessionId: row.sid };
}

/** Revokes a session of `userId` by its public id; false when there is no such live session. */
export async function revokeSession(deps: Deps, userId: number, sessionId: string): Promise<boolean> {
  const r = await deps.db.kysely
    .updateTable('sessions')
    .set({ revoked_at: new Date(deps.clock.now()) })
    .where('id', '=', sessionId)
    .where('user_id', '=', userId)
    .where('revoked_at', 'is', null)
    .executeTakeFirst();
  return Number(r.numUpdatedRows) > 0;
}
