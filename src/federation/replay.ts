/**
 * Replay protection of signed requests (issue 3 §2), shared by every process of the
 * platform through PostgreSQL (`federation_replay`, migration 020): a request's (keyid,
 * signature) is remembered until its `created` falls out of the clock-skew window, after
 * which the request would be refused as too old anyway. Expired rows are deleted in the
 * background, at most once a minute per process.
 */
import { sql } from 'kysely';
import type { Db } from '../store/db.ts';
import type { ReplayStore } from './http-signatures.ts';

/** How often one process prunes expired rows, in ms. */
const PRUNE_EVERY_MS = 60_000;

/** A {@link ReplayStore} in PostgreSQL. `now` is the platform clock (ms). */
export function pgReplayStore(db: Db, now: () => number): ReplayStore {
  let lastPrune = 0;
  return {
    async remember(id, expiresAtMs) {
      const t = now();
      // A row that expired may be taken again; a live one makes this a replay.
      const r = await sql<{ id: string }>`
        insert into federation_replay (id, expires_at) values (${id}, ${new Date(expiresAtMs)})
        on conflict (id) do update set expires_at = excluded.expires_at
          where federation_replay.expires_at < ${new Date(t)}
        returning id`.execute(db.kysely);
      if (t - lastPrune > PRUNE_EVERY_MS) {
        lastPrune = t;
        void sql`delete from federation_replay where id in (
            select id from federation_replay where expires_at < ${new Date(t)} limit 10000)`
          .execute(db.kysely)
          .catch(() => {});
      }
      return r.rows.length === 1;
    },
  };
}
