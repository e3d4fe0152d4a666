/**
 * Who inbound mail may be addressed to (issue 2 §6, "Inbound"): an existing local user,
 * or the reply address `reply+<conversation key>@<one of our domains>` that outbound
 * emails carry in Reply-To (src/mail/outbound/render.ts `replyAddress`). Everything else
 * is refused — in particular other domains: Parley is never an open relay (RFC 5321 §3.6).
 */
import { type Deps, isLocalAddress } from '../../context.ts';
import type { Queryable } from '../../store/db.ts';
import { normalizeAddress } from '../address.ts';

/** Local part of a reply address: `reply+` and a published conversation key (32 hex digits). */
const REPLY_LOCAL_PART = /^reply\+([0-9a-f]{32})$/;

/** An accepted recipient. */
export type Recipient =
  | { kind: 'user'; address: string; userId: number }
  | { kind: 'reply'; address: string; key: string; convId: number };

/** A refused recipient: the SMTP reply code, enhanced status code (RFC 3463) and reason. */
export interface RecipientRefusal {
  kind: 'refused';
  address: string;
  /** 550 (mailbox unavailable) or 553 (mailbox name not allowed). */
  code: 550 | 553;
  /** RFC 3463 enhanced status code: 5.1.1 bad mailbox, 5.1.3 bad syntax, 5.7.1 relay denied. */
  enhanced: '5.1.1' | '5.1.3' | '5.7.1';
  reason: string;
}

/**
 * The conversation key of a reply address of this platform, or null. The domain may be
 * any of the platform's domains (outbound mail uses the primary one). Never throws.
 */
export function replyKeyOf(deps: Pick<Deps, 'config'>, address: string): string | null {
  let normalized: string;
  try {
    normalized = normalizeAddress(address);
  } catch {
    return null;
  }
  if (!isLocalAddress(deps, normalized)) return null;
  const local = normalized.slice(0, normalized.lastIndexOf('@'));
  return REPLY_LOCAL_PART.exec(local)?.[1] ?? null;
}

/**
 * Decides whether mail for `raw` (an RCPT TO address, without angle brackets) is accepted.
 * Accepted: an existing local user (any status), or the reply address of an existing
 * published conversation. Refused, with the reason: an invalid address (553 5.1.3), a
 * domain this platform does not serve (550 5.7.1, relaying denied), an unknown local user
 * or conversation (550 5.1.1).
 */
export async function checkRecipient(deps: Pick<Deps, 'config'>, db: Queryable, raw: string): Promise<Recipient | RecipientRefusal> {
  let address: string;
  try {
    address = normalizeAddress(raw);
  } catch (e) {
    return { kind: 'refused', address: raw, code: 553, enhanced: '5.1.3', reason: (e as Error).message };
  }
  if (!isLocalAddress(deps, address)) {
    return {
      kind: 'refused',
      address,
      code: 550,
      enhanced: '5.7.1',
      reason: `relaying denied: this server accepts mail only for ${deps.config.domains.join(', ')}`,
    };
  }
  const key = replyKeyOf(deps, address);
  if (key !== null) {
    const conv = await db.selectFrom('conversations').select('id').where('key', '=', key).where('published', '=', true).executeTakeFirst();
    if (!conv) return { kind: 'refused', address, code: 550, enhanced: '5.1.1', reason: `no conversation ${key} here to reply to` };
    return { kind: 'reply', address, key, convId: conv.id };
  }
  const user = await db.selectFrom('users').select('id').where('address', '=', address).executeTakeFirst();
  if (!user) return { kind: 'refused', address, code: 550, enhanced: '5.1.1', reason: `no such user here: ${address}` };
  return { kind: 'user', address, userId: user.id };
}
