import { normalizeAddress } from '../mail/address.ts';
import { badRequest, conflict, notFound } from '../platform/errors.ts';
import { type Deps, isLocalAddress } from '../context.ts';
import { isUniqueViolation } from '../store/db.ts';
import { hashPassword, PASSWORD_LIMITS } from './passwords.ts';
import { revokeAllSessions, forgetUserSessions } from './sessions.ts';

/** A user as listed by the CLI and the admin API. Times are UTC ISO 8601. */
export interface UserInfo {
  id: number;
  /** The user's address (addr-spec, lower-cased). */
  address: string;
  /** Full name ('' when unset). */
  name: string;
  is_admin: boolean;
  /** 'active' | 'away' | 'dormant' | 'suspended'; a suspended user cannot log in or act. */
  status: string;
  /** False until a password is set: such a user cannot log in. */
  has_password: boolean;
  created_at: string;
}

/** The user status values an admin may set (PATCH /api/admin/users/{address}). */
export type AdminStatus = 'active' | 'suspended';

const USER_COLUMNS = ['id', 'address', 'name', 'is_admin', 'status', 'password_hash', 'created_at'] as const;

function toInfo(r: { id: number; address: string; name: string; is_admin: boolean; status: string; password_hash: string | null; created_at: Date | string }): UserInfo {
  return {
    id: r.id,
    address: r.address,
    name: r.name,
    is_admin: r.is_admin,
    status: r.status,
    has_password: r.password_hash !== null,
    created_at: new Date(r.created_at).toISOString(),
  };
}

/** Normalises an address given by a caller. @throws AppError 400 `invalid_address` */
function parseAddress(address: string): string {
  try {
    return normalizeAddress(address);
  } catch (e) {
    throw badRequest('invalid_address', (e as Error).message);
  }
}

/** @throws AppError 400 `weak_password` outside PASSWORD_LIMITS */
function checkPassword(password: string): void {
  if (password.length < PASSWORD_LIMITS.min || password.length > PASSWORD_LIMITS.max)
    throw badRequest('weak_password', `passwords are ${PASSWORD_LIMITS.min}-${PASSWORD_LIMITS.max} characters`, { ...PASSWORD_LIMITS });
}

/**
 * `createUser` — adds a user of one of the platform's domains (no public sign-up:
 * `parley user add` and the admin API call this). Without a password the user exists
 * (receives mail, can be added to conversations) but cannot log in until one is set.
 * @throws AppError 400 (`invalid_address`, `foreign_domain`, `weak_password`), 409 `user_exists`
 */
export async function createUser(
  deps: Deps,
  input: { address: string; name?: string; password?: string | null; isAdmin?: boolean },
): Promise<UserInfo> {
  const address = parseAddress(input.address);
  if (!isLocalAddress(deps, address))
    throw badRequest('foreign_domain', `${address} is not in this platform's domains (${deps.config.domains.join(', ')})`, { domains: deps.config.domains });
  if (input.password != null) checkPassword(input.password);
  const password_hash = input.password != null ? await hashPassword(input.password) : null;
  try {
    const r = await deps.db.kysely
      .insertInto('users')
      .values({ address, name: (input.name ?? '').trim(), password_hash, is_admin: input.isAdmin ?? false })
      .returning([...USER_COLUMNS])
      .executeTakeFirstOrThrow();
    return toInfo(r);
  } catch (e) {
    if (isUniqueViolation(e)) throw conflict('user_exists', `${address} already exists`);
    throw e;
  }
}

/**
 * Users in address order, paged: `after` is the last address of the previous page
 * (exclusive); `limit` defaults to 1000.
 */
export async function listUsers(deps: Deps, opts: { after?: string; limit?: number } = {}): Promise<UserInfo[]> {
  let q = deps.db.kysely.selectFrom('users').select([...USER_COLUMNS]);
  if (opts.after) q = q.where('address', '>', opts.after.trim().toLowerCase());
  const rows = await q.orderBy('address').limit(opts.limit ?? 1000).execute();
  return rows.map(toInfo);
}

/** One user by address. @throws AppError 400 `invalid_address`, 404 when there is no such user */
export async function getUser(deps: Deps, address: string): Promise<UserInfo> {
  const a = parseAddress(address);
  const r = await deps.db.kysely.selectFrom('users').select([...USER_COLUMNS]).where('address', '=', a).executeTakeFirst();
  if (!r) throw notFound(`user ${a}`);
  return toInfo(r);
}

/** What an admin may change of a user. `password: null` removes the password (no login). */
export interface UserPatch {
  status?: AdminStatus;
  name?: string;
  is_admin?: boolean;
  password?: string | null;
}

/**
 * `updateUser` — an admin changes a user: suspend or reactivate, rename, grant or withdraw
 * admin, set, reset or remove the password. Suspending the user, or changing or removing
 * their password, revokes all of their sessions (a reactivated user logs in afresh).
 * An admin cannot suspend or demote themselves, so a platform is never left without an
 * admin by mistake.
 * @param actorId the admin making the change; null for the operator at the machine (`parley user password`), who is no user
 * @throws AppError 400 (`invalid_address`, `weak_password`, `self_lockout`, `empty_patch`), 404 (no such user)
 */
export async function updateUser(deps: Deps, actorId: number | null, address: string, patch: UserPatch): Promise<UserInfo> {
  const a = parseAddress(address);
  if (patch.status === undefined && patch.name === undefined && patch.is_admin === undefined && patch.password === undefined)
    throw badRequest('empty_patch', 'nothing to change: give status, name, is_admin or password');
  if (typeof patch.password === 'string') checkPassword(patch.password);
  // Hash outside the transaction: argon2 is deliberately slow.
  const password_hash = typeof patch.password === 'string' ? await hashPassword(patch.password) : patch.password;
  return deps.db.kysely.transaction().execute(async (tx) => {
    const cur = await tx.selectFrom('users').select(['id']).where('address', '=', a).forUpdate().executeTakeFirst();
    if (!cur) throw notFound(`user ${a}`);
    if (cur.id === actorId && (patch.status === 'suspended' || patch.is_admin === false))
      throw badRequest('self_lockout', 'an admin cannot suspend or demote themselves; ask another admin');
    const r = await tx
      .updateTable('users')
      .set({
        ...(patch.status !== undefined ? { status: patch.status } : {}),
        ...(patch.name !== undefined ? { name: patch.name.trim() } : {}),
        ...(patch.is_admin !== undefined ? { is_admin: patch.is_admin } : {}),
        ...(password_hash !== undefined ? { password_hash } : {}),
      })
      .where('id', '=', cur.id)
      .returning([...USER_COLUMNS])
      .executeTakeFirstOrThrow();
    if (patch.status === 'suspended' || patch.password !== undefined) await revokeAllSessions(deps, cur.id, tx);
    if (patch.is_admin !== undefined) forgetUserSessions(deps, cur.id);
    return toInfo(r);
  });
}

/** The caller's own profile (GET /api/me). */
export interface Profile {
  address: string;
  name: string;
  common_name: string;
  timezone: string;
  is_admin: boolean;
  status: string;
  created_at: string;
  /** The session making the request. */
  session_id: string;
}

/** The profile of user `userId`, for the session `sessionId`. @throws AppError 404 (user deleted meanwhile) */
export async function getProfile(deps: Deps, userId: number, sessionId: string): Promise<Profile> {
  const r = await deps.db.kysely
    .selectFrom('users')
    .select(['address', 'name', 'common_name', 'timezone', 'is_admin', 'status', 'created_at'])
    .where('id', '=', userId)
    .executeTakeFirst();
  if (!r) throw notFound('user');
  return { ...r, created_at: new Date(r.created_at).toISOString(), session_id: sessionId };
}
