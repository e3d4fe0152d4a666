import { sql } from 'kysely';
import type { Action } from '../core/actions.ts';
import type { Queryable } from '../store/db.ts';

/**
 * One event of a user's stream as clients receive it (websocket frame `event`, and
 * `GET /api/events`): `seq` is the cursor to resume after it.
 */
export interface StreamEvent {
  seq: number;
  kind: 'action' | 'flags' | 'labels';
  /** Conversation key (current: a published draft shows its published key). */
  conv: string;
  action?: Action;
  payload?: unknown;
}

/** Events of `userId` after `cursor`, oldest first, at most `limit`. */
export async function readEvents(db: Queryable, userId: number, cursor: number, limit: number): Promise<StreamEvent[]> {
  const rows = await sql<{ seq: number; kind: StreamEvent['kind']; payload: unknown; key: string; body: Action | null }>`
    select e.seq, e.kind, e.payload, c.key, a.body
      from user_events e
      join conversations c on c.id = e.conv_id
      left join actions a on a.conv_id = e.conv_id and a.id = e.action_id
     where e.user_id = ${userId} and e.seq > ${cursor}
     order by e.seq
     limit ${limit}`.execute(db);
  return rows.rows.map((r) => ({
    seq: r.seq,
    kind: r.kind,
    conv: r.key,
    ...(r.body ? { action: r.body } : {}),
    ...(r.payload != null ? { payload: r.payload } : {}),
  }));
}

/** The user's current stream position (the cursor of "now"). */
export async function streamHead(db: Queryable, userId: number): Promise<number> {
  const r = await db.selectFrom('user_streams').select('seq').where('user_id', '=', userId).executeTakeFirst();
  return r?.seq ?? 0;
}
