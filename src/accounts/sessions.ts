import { hash, randomBytes } from 'node:crypto';
import type { Deps } from '../context.ts';
import type { Queryable } from '../store/db.ts';

/** The authenticated caller of a request. */
export interface AuthUser {
  id: number;
  address: string;
  isAdmin: boolean;
  sessionId: string;
}

/** Name of the session cookie of browsers. */
export const SESSION_COOKIE = 'parley_session';

const tokenHash = (token: string) => hash('sha256', token, 'hex');

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

/**
 * How long a process reuses a resolved session without reading it again (ms). Revoking a
 * session, logging out, suspending a user or changing their password takes effect at once
 * in the process that did it and within this time in the others (docs/operations.md).
 */
export const SESSION_CACHE_MS = 1000;
const SESSION_CACHE_MAX = 10_000;
/**
 * Resolved sessions by token, per database handle (one platform). Keyed by the token itself,
 * not its SHA-256, so that a hit costs one map lookup: hashing every request's token was the
 * larger part of authenticating it (docs/benchmarks.md). The tokens stay in this process's
 * memory only, where every request's token passes anyway; the database keeps hashes alone.
 */
const sessionCaches = new WeakMap<object, Map<string, { user: AuthUser; until: number }>>();

function sessionCache(deps: Deps): Map<string, { user: AuthUser; until: number }> {
  let c = sessionCaches.get(deps.db);
  if (!c) sessionCaches.set(deps.db, (c = new Map()));
  return c;
}

/** Forgets this process's cached sessions of `userId` (after a change of their rights, e.g. is_admin). */
export function forgetUserSessions(deps: Deps, userId: number): void {
  forgetSessions(deps, (u) => u.id === userId);
}

/** Forgets cached sessions matching `pred` (after a revocation in this process). */
function forgetSessions(deps: Deps, pred: (u: AuthUser) => boolean): void {
  const c = sessionCache(deps);
  for (const [k, v] of c) if (pred(v.user)) c.delete(k);
}

/**
 * Resolves a session token to its user, or null when unknown, expired or revoked. A
 * resolved session is reused for {@link SESSION_CACHE_MS} (one read per second per session
 * instead of one per request).
 */
export async function resolveSession(deps: Deps, token: string): Promise<AuthUser | null> {
  if (!token || token.length > 200) return null;
  const now = deps.clock.now();
  const cache = sessionCache(deps);
  const hit = cache.get(token);
  if (hit && hit.until > now) return hit.user;
  const hash = tokenHash(token);
  const row = await deps.db.kysely
    .selectFrom('sessions')
    .innerJoin('users', 'users.id', 'sessions.user_id')
    .select(['sessions.id as sid', 'sessions.expires_at', 'sessions.revoked_at', 'sessions.last_seen_at', 'users.id', 'users.address', 'users.is_admin', 'users.status'])
    .where('sessions.token_hash', '=', hash)
    .executeTakeFirst();
  if (!row || row.revoked_at || new Date(row.expires_at).getTime() <= now || row.status === 'suspended') {
    cache.delete(token);
    return null;
  }
  // Refresh last_seen_at at most once a minute (cheap on the hot path).
  if (now - new Date(row.last_seen_at).getTime() > 60_000) {
    await deps.db.kysely.updateTable('sessions').set({ last_seen_at: new Date(now) }).where('id', '=', row.sid).execute();
  }
  const user = { id: row.id, address: row.address, isAdmin: row.is_admin, sessionId: row.sid };
  if (cache.size >= SESSION_CACHE_MAX) cache.clear();
  cache.set(token, { user, until: Math.min(now + SESSION_CACHE_MS, new Date(row.expires_at).getTime()) });
  return user;
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
  forgetSessions(deps, (u) => u.sessionId === sessionId);
  return Number(r.numUpdatedRows) > 0;
}

/** A live session as listed to its owner (GET /api/sessions). Times are UTC ISO 8601. */
export interface SessionInfo {
  /** Public id (`ses_…`), used to revoke it. */
  id: string;
  /** 'cookie' for browser logins, 'bearer' for other API clients (see POST /api/login). */
  kind: 'cookie' | 'bearer';
  /** The `device` given at login, else the User-Agent (at most 200 characters). */
  device: string;
  /** Client IP at login. */
  ip: string;
  created_at: string;
  /** Last use, refreshed at most once a minute. */
  last_seen_at: string;
  expires_at: string;
  /** True for the session making the request. */
  current: boolean;
}

/** The live (unrevoked, unexpired) sessions of `userId`, newest first. */
export async function listSessions(deps: Deps, userId: number, currentSessionId: string | null): Promise<SessionInfo[]> {
  const rows = await deps.db.kysely
    .selectFrom('sessions')
    .select(['id', 'kind', 'device', 'ip', 'created_at', 'last_seen_at', 'expires_at'])
    .where('user_id', '=', userId)
    .where('revoked_at', 'is', null)
    .where('expires_at', '>', new Date(deps.clock.now()))
    .orderBy('created_at', 'desc')
    .orderBy('id')
    .execute();
  const iso = (d: Date | string) => new Date(d).toISOString();
  return rows.map((r) => ({
    id: r.id,
    kind: r.kind,
    device: r.device,
    ip: r.ip,
    created_at: iso(r.created_at),
    last_seen_at: iso(r.last_seen_at),
    expires_at: iso(r.expires_at),
    current: r.id === currentSessionId,
  }));
}

/**
 * Revokes every live session of `userId` (suspension, password change); returns how many.
 * @param q a transaction to join, else the pool
 */
export async function revokeAllSessions(deps: Deps, userId: number, q: Queryable = deps.db.kysely): Promise<number> {
  const r = await q
    .updateTable('sessions')
    .set({ revoked_at: new Date(deps.clock.now()) })
    .where('user_id', '=', userId)
    .where('revoked_at', 'is', null)
    .executeTakeFirst();
  forgetSessions(deps, (u) => u.id === userId);
  return Number(r.numUpdatedRows);
}
