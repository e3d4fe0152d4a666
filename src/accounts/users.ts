import { normalizeAddress } from '../mail/address.ts';
import { badRequest, conflict } from '../platform/errors.ts';
import { type Deps, isLocalAddress } from '../context.ts';
import { isUniqueViolation } from '../store/db.ts';
import { hashPassword, PASSWORD_LIMITS } from './passwords.ts';

/** A user as listed by the CLI and the admin API. */
export interface UserInfo {
  id: number;
  address: string;
  name: string;
  is_admin: boolean;
  status: string;
  created_at: string;
}

/**
 * `createUser` — adds a user of one of the platform's domains (no public sign-up:
 * `parley user add` and the admin API call this).
 * @throws AppError 400 (invalid address, foreign domain, weak password), 409 (exists)
 */
export async function createUser(
  deps: Deps,
  input: { address: string; name?: string; password?: string | null; isAdmin?: boolean },
): Promise<UserInfo> {
  let address: string;
  try {
    address = normalizeAddress(input.address);
  } catch (e) {
    throw badRequest('invalid_address', (e as Error).message);
  }
  if (!isLocalAddress(deps, address))
    throw badRequest('foreign_domain', `${address} is not in this platform's domains (${deps.config.domains.join(', ')})`);
  if (input.password != null && (input.password.length < PASSWORD_LIMITS.min || input.password.length > PASSWORD_LIMITS.max))
    throw badRequest('weak_password', `passwords are ${PASSWORD_LIMITS.min}-${PASSWORD_LIMITS.max} characters`);
  const password_hash = input.password != null ? await hashPassword(input.password) : null;
  try {
    const r = await deps.db.kysely
      .insertInto('users')
      .values({ address, name: input.name ?? '', password_hash, is_admin: input.isAdmin ?? false })
      .returning(['id', 'address', 'name', 'is_admin', 'status', 'created_at'])
      .executeTakeFirstOrThrow();
    return { ...r, created_at: new Date(r.created_at).toISOString() };
  } catch (e) {
    if (isUniqueViolation(e)) throw conflict('user_exists', `${address} already exists`);
    throw e;
  }
}

/** Users in address order, paged by id. */
export async function listUsers(deps: Deps, opts: { afterId?: number; limit?: number } = {}): Promise<UserInfo[]> {
  const rows = await deps.db.kysely
    .selectFrom('users')
    .select(['id', 'address', 'name', 'is_admin', 'status', 'created_at'])
    .where('id', '>', opts.afterId ?? 0)
    .orderBy('id')
    .limit(opts.limit ?? 1000)
    .execute();
  return rows.map((r) => ({ ...r, created_at: new Date(r.created_at).toISOString() }));
}
