import { isIP } from 'node:net';
import type { Deps } from '../context.ts';
import { tooManyRequests } from '../platform/errors.ts';

/**
 * Login throttling (issue 2 §3, "login throttling per address and per IP").
 *
 * Within any sliding window of `windowS` seconds, at most `perAddress` failed logins are
 * evaluated for one address and at most `perIp` for one client IP (IPv6 counted per /64).
 * Further attempts are refused with 429 `rate_limited` *before* the password is checked,
 * with `details.retry_after_s` and a `Retry-After` header: the seconds until the oldest
 * failure that keeps the count at its limit leaves the window. A successful login clears
 * the failures of its address (not those of its IP).
 */
export const LOGIN_THROTTLE = { windowS: 15 * 60, perAddress: 5, perIp: 20 } as const;

/**
 * The key under which failures of a client IP are counted: the IPv4 address itself (also for
 * IPv4-mapped IPv6), the /64 prefix of an IPv6 address (one host usually holds a whole /64).
 */
export function ipKey(ip: string): string {
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(ip);
  if (mapped) return mapped[1];
  if (isIP(ip) !== 6) return ip;
  const [head, tail = ''] = ip.toLowerCase().split('::');
  const h = head ? head.split(':') : [];
  const t = tail ? tail.split(':') : [];
  const groups = [...h, ...Array(Math.max(0, 8 - h.length - t.length)).fill('0'), ...t];
  return `${groups.slice(0, 4).map((g) => g.replace(/^0+(?=.)/, '')).join(':')}::/64`;
}

/**
 * Registers a login attempt before its password is checked, as a failure of `address` from
 * `ip`: inserting first and counting after makes concurrent attempts see each other, so a
 * burst of parallel guesses cannot slip past the limits. The caller keeps the row when the
 * password is wrong, or removes it with {@link clearLoginFailures} (success) or
 * {@link forgetLoginAttempt} (an attempt that was not a wrong guess).
 * Also prunes failures older than the window.
 * @returns the id of the attempt's row
 * @throws AppError 429 `rate_limited` (details.retry_after_s) when the address or the IP is over its limit
 */
export async function recordLoginAttempt(deps: Deps, address: string, ip: string): Promise<number> {
  const k = deps.db.kysely;
  const now = deps.clock.now();
  const cutoff = new Date(now - LOGIN_THROTTLE.windowS * 1000);
  const ipk = ipKey(ip);
  await k.deleteFrom('login_failures').where('at', '<=', cutoff).execute();
  const { id } = await k.insertInto('login_failures').values({ address, ip: ipk, at: new Date(now) }).returning('id').executeTakeFirstOrThrow();
  const counts = await k
    .selectFrom('login_failures')
    .select((eb) => [
      eb.fn.countAll<number>().filterWhere('address', '=', address).as('by_address'),
      eb.fn.countAll<number>().filterWhere('ip', '=', ipk).as('by_ip'),
    ])
    .where('at', '>', cutoff)
    .where((eb) => eb.or([eb('address', '=', address), eb('ip', '=', ipk)]))
    .executeTakeFirstOrThrow();
  const overAddress = Number(counts.by_address) > LOGIN_THROTTLE.perAddress;
  const overIp = Number(counts.by_ip) > LOGIN_THROTTLE.perIp;
  if (!overAddress && !overIp) return id;

  await forgetLoginAttempt(deps, id);
  // The attempt is allowed again once the limit-th most recent failure leaves the window.
  const freeAt = async (column: 'address' | 'ip', value: string, limit: number): Promise<number> => {
    const row = await k
      .selectFrom('login_failures')
      .select('at')
      .where(column, '=', value)
      .where('at', '>', cutoff)
      .orderBy('at', 'desc')
      .offset(limit - 1)
      .limit(1)
      .executeTakeFirst();
    return row ? new Date(row.at).getTime() + LOGIN_THROTTLE.windowS * 1000 : now;
  };
  const until = Math.max(
    overAddress ? await freeAt('address', address, LOGIN_THROTTLE.perAddress) : now,
    overIp ? await freeAt('ip', ipk, LOGIN_THROTTLE.perIp) : now,
  );
  const retryAfterS = Math.max(1, Math.ceil((until - now) / 1000));
  deps.log.warn({ address, ip: ipk, by: overAddress ? 'address' : 'ip', retry_after_s: retryAfterS }, 'login throttled');
  throw tooManyRequests(
    overAddress
      ? `too many failed logins for this address; try again in ${retryAfterS} s`
      : `too many failed logins from this network address; try again in ${retryAfterS} s`,
    retryAfterS,
  );
}

/** Clears the failures of `address` (after a successful login). */
export async function clearLoginFailures(deps: Deps, address: string): Promise<void> {
  await deps.db.kysely.deleteFrom('login_failures').where('address', '=', address).execute();
}

/** Removes one attempt's row: it turned out not to be a wrong guess. */
export async function forgetLoginAttempt(deps: Deps, id: number): Promise<void> {
  await deps.db.kysely.deleteFrom('login_failures').where('id', '=', id).execute();
}
