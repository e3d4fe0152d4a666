import { sql } from 'kysely';
import type { Tx } from '../../store/db.ts';

/**
 * The transaction lock that serialises everything adding one email to this platform
 * (issue 2 §6 "Inbound", issue 3's proposals of bridged replies): the SMTP/import ingest
 * (ingest-email.ts) and a leader accepting a follower's proposal of the same email
 * (src/federation/proposals.ts) take it before the conversation's lock, so whichever
 * commits first records the Message-ID and the other sees it.
 *
 * @param id the email's Message-ID as stored (`storableText`), or the SHA-256 of its raw
 *   bytes when it has none
 * @returns the key of the PostgreSQL advisory lock (`pg_advisory_xact_lock(hashtextextended(key, 0))`)
 */
export function ingestLockKey(id: string): string {
  return `parley:inbound:${id}`;
}

/**
 * Takes, in `tx`, the ingest locks of the emails `ids` (see {@link ingestLockKey}) in
 * sorted order, as the ingest of a batch does, so two holders of several never deadlock.
 * Held until `tx` ends.
 */
export async function lockIngests(tx: Tx, ids: string[]): Promise<void> {
  const keys = [...new Set(ids)].map(ingestLockKey);
  if (keys.length === 0) return;
  await sql`select count(pg_advisory_xact_lock(hashtextextended(s.k, 0))) from (select k from unnest(${keys}::text[]) as k order by k) s`.execute(tx);
}
