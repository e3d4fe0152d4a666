import { sql } from 'kysely';
import type { Deps } from '../context.ts';
import { AppError } from '../platform/errors.ts';
import type { Queryable, Tx } from '../store/db.ts';
import type { Org } from './orgs.ts';

/**
 * Quota and rate limit of an organisation (issue 4 §5; docs/organisations.md "Quota and
 * rate limit"), counted exactly from `outbound_messages` (no counters to drift):
 * - **quota_per_day**: outbound messages created since 00:00 UTC (single messages, every
 *   message of a blast at its creation, members' replies). A request that would pass it is
 *   refused whole with 429 `quota_exceeded` — a blast larger than what remains is refused
 *   before anything is created.
 * - **rate_per_minute**: messages handed to the delivery engine (prepared) in the last 60 s.
 *   A single message over it is refused with 429 `rate_limited`; blasts are not refused but
 *   paced: their messages are prepared at most at this rate.
 * Members' replies through the client API are counted but never refused (the reply is
 * already part of the conversation).
 *
 * Checks run under a per-organisation advisory lock held to commit, so concurrent requests
 * cannot both take the last unit.
 */

/** Advisory lock namespace of the quota check ('ORGQ'). */
const QUOTA_LOCK = 0x4f524751;

/** Serialises quota checks of one organisation until the transaction ends. */
export async function lockQuota(tx: Tx, orgId: number): Promise<void> {
  await sql`select pg_advisory_xact_lock(${QUOTA_LOCK}, ${orgId}::int)`.execute(tx);
}

/** Start of the current UTC day, in ms. */
export function utcDayStart(nowMs: number): number {
  const d = new Date(nowMs);
  return Date.UTC(d.getUTCFullYear(), d.getUTCMonth(), d.getUTCDate());
}

/** The organisation's usage now. */
export interface Usage {
  quota_per_day: number;
  used_today: number;
  remaining_today: number;
  /** When the daily quota starts afresh (next 00:00 UTC). */
  resets_at: string;
  rate_per_minute: number;
  /** Messages prepared in the last 60 s. */
  used_last_minute: number;
}

/** Counts today's messages and the last minute's prepared ones. */
export async function usage(db: Queryable, deps: Deps, org: Pick<Org, 'id' | 'quota_per_day' | 'rate_per_minute'>): Promise<Usage> {
  const now = deps.clock.now();
  const day = utcDayStart(now);
  // Two index range scans (outbound_messages_org_created, outbound_messages_org_prepared).
  const today = await db
    .selectFrom('outbound_messages')
    .select((eb) => eb.fn.countAll<number>().as('n'))
    .where('org_id', '=', org.id)
    .where('created_at', '>=', new Date(day))
    .executeTakeFirstOrThrow();
  const minute = await db
    .selectFrom('outbound_messages')
    .select((eb) => eb.fn.countAll<number>().as('n'))
    .where('org_id', '=', org.id)
    .where('prepared_at', '>', new Date(now - 60_000))
    .executeTakeFirstOrThrow();
  const r = { today: today.n, minute: minute.n };
  const used = Number(r.today);
  return {
    quota_per_day: org.quota_per_day,
    used_today: used,
    remaining_today: Math.max(0, org.quota_per_day - used),
    resets_at: new Date(day + 86_400_000).toISOString(),
    rate_per_minute: org.rate_per_minute,
    used_last_minute: Number(r.minute),
  };
}

/**
 * Refuses `n` more messages today when they would pass the quota (call under lockQuota).
 * @throws AppError 429 `quota_exceeded` with {quota_per_day, used_today, remaining_today, requested, resets_at, retry_after_s}
 */
export async function checkQuota(tx: Tx, deps: Deps, org: Org, n: number): Promise<Usage> {
  const u = await usage(tx, deps, org);
  if (u.used_today + n > org.quota_per_day) {
    const retry = Math.max(1, Math.ceil((Date.parse(u.resets_at) - deps.clock.now()) / 1000));
    throw new AppError(
      429,
      'quota_exceeded',
      `the organisation's daily quota of ${org.quota_per_day} messages would be passed: ${u.used_today} used today, ${n} requested`,
      { quota_per_day: org.quota_per_day, used_today: u.used_today, remaining_today: u.remaining_today, requested: n, resets_at: u.resets_at, retry_after_s: retry },
    );
  }
  return u;
}

/**
 * Refuses one more single message when `rate_per_minute` messages were prepared in the last
 * 60 s (call under lockQuota).
 * @throws AppError 429 `rate_limited` with {rate_per_minute, used_last_minute, retry_after_s}
 */
export async function checkRate(tx: Tx, deps: Deps, org: Org, u: Usage): Promise<void> {
  if (u.used_last_minute + 1 <= org.rate_per_minute) return;
  const now = deps.clock.now();
  // The window frees a slot when its (used - rate + 1)-th oldest message is a minute old.
  const nth = await tx
    .selectFrom('outbound_messages')
    .select('prepared_at')
    .where('org_id', '=', org.id)
    .where('prepared_at', '>', new Date(now - 60_000))
    .orderBy('prepared_at')
    .offset(Math.max(0, u.used_last_minute - org.rate_per_minute))
    .limit(1)
    .executeTakeFirst();
  const free = nth?.prepared_at ? new Date(nth.prepared_at).getTime() + 60_000 : now + 1000;
  const retry = Math.max(1, Math.ceil((free - now) / 1000));
  throw new AppError(429, 'rate_limited', `the organisation's rate limit of ${org.rate_per_minute} messages per minute is reached`, {
    rate_per_minute: org.rate_per_minute,
    used_last_minute: u.used_last_minute,
    retry_after_s: retry,
  });
}

/** How many messages of a blast may be prepared now without passing the rate (≥ 0). */
export async function rateBudget(db: Queryable, deps: Deps, org: Org): Promise<number> {
  const now = deps.clock.now();
  const r = await db
    .selectFrom('outbound_messages')
    .select((eb) => eb.fn.countAll<number>().as('n'))
    .where('org_id', '=', org.id)
    .where('prepared_at', '>', new Date(now - 60_000))
    .executeTakeFirstOrThrow();
  return Math.max(0, org.rate_per_minute - Number(r.n));
}
