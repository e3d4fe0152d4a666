/**
 * The federation worker (worker role; issue 3 §4–6; docs/federation.md, "Replication"):
 *
 * - **pusher** — claims due links of `federation_links` (`FOR UPDATE SKIP LOCKED`, a lease of
 *   {@link LINK_LEASE_MS}, so several worker processes never push the same link at once) and
 *   sends each platform the actions after its `acked_id`, in batches of at most 500 actions
 *   (and about 4 MiB), in order, back to back while it is behind; on failure the link waits
 *   1 s, 2 s, 4 s … at most 5 min (federationBackoffMs);
 * - **proposals** — sends the due pending proposals of this platform's users to their
 *   conversations' leaders (src/federation/proposals.ts), the oldest of each conversation first.
 *
 * Woken by NOTIFY `parley_federation` after an append commits, and by a 1 s poll for retries.
 */
import pg from 'pg';
import { sql } from 'kysely';
import type { Action } from '../core/actions.ts';
import type { Deps } from '../context.ts';
import { coalescingRunner } from '../platform/coalesce.ts';
import { AppError } from '../platform/errors.ts';
import { readActions } from '../conversations/store.ts';
import { signedFetch } from './client.ts';
import { MAX_PUSH_ACTIONS } from './hooks.ts';
import { FEDERATION_CHANNEL } from './outbox.ts';
import { attemptProposal, claimProposal, federationBackoffMs } from './proposals.ts';
import { backfillFrom, platformUrl } from './replication.ts';
import { primaryDomain } from '../context.ts';

/** Lease of a claimed link, in ms: a worker killed mid-push frees it after this. */
export const LINK_LEASE_MS = 30_000;
/** Most bytes of JSON in one push (a single larger action is sent alone). */
export const MAX_PUSH_BYTES = 4 * 1024 * 1024;
/** Longest wait for a push's answer, in ms. */
export const PUSH_TIMEOUT_MS = 15_000;

interface LinkRow {
  conv_id: number;
  platform: string;
  acked_id: number;
  stop_id: number | null;
  attempts: number;
  key: string;
}

/** A running federation worker. */
export interface FederationWorker {
  /** Runs one round now (push due links, send due proposals). */
  kick(): void;
  /** Resolves when no round is running or pending. */
  idle(): Promise<void>;
  stop(): Promise<void>;
}

async function claimLinks(deps: Deps, limit: number): Promise<LinkRow[]> {
  const r = await sql<LinkRow>`
    with due as (
      select l.conv_id, l.platform from federation_links l join conversations c on c.id = l.conv_id
       where l.acked_id < coalesce(l.stop_id, c.last_id) and l.acked_id < c.last_id and l.next_attempt_at <= now()
         and (l.locked_until is null or l.locked_until < now())
       order by l.next_attempt_at
       limit ${limit}
       for update of l skip locked)
    update federation_links l set locked_until = now() + ${`${LINK_LEASE_MS} milliseconds`}::interval, updated_at = now()
      from due, conversations c
     where l.conv_id = due.conv_id and l.platform = due.platform and c.id = l.conv_id
    returning l.conv_id, l.platform, l.acked_id, l.stop_id, l.attempts, c.key`.execute(deps.db.kysely);
  return r.rows;
}

/** The next batch for a link: actions acked+1 … target, ≤ 500 and ≈ MAX_PUSH_BYTES. */
async function nextBatch(deps: Deps, link: LinkRow, acked: number): Promise<Action[]> {
  const c = await deps.db.kysely.selectFrom('conversations').select('last_id').where('id', '=', link.conv_id).executeTakeFirstOrThrow();
  const stop = await sql<{ stop_id: number | null }>`select stop_id from federation_links where conv_id = ${link.conv_id} and platform = ${link.platform}`.execute(deps.db.kysely);
  const target = Math.min(c.last_id, stop.rows[0]?.stop_id ?? c.last_id);
  if (acked >= target) return [];
  // A platform new to a conversation longer than a batch gets its last batch: it does not know
  // the conversation, so it fetches the whole log (GET …/log) and joins — which a first batch
  // without its participant (added later) would not let it do.
  const from = acked === 0 && target > MAX_PUSH_ACTIONS ? target - MAX_PUSH_ACTIONS + 1 : acked + 1;
  const actions = await readActions(deps.db.kysely, link.conv_id, from, target, MAX_PUSH_ACTIONS);
  let bytes = 0;
  let n = 0;
  for (const a of actions) {
    bytes += JSON.stringify(a).length;
    if (n > 0 && bytes > MAX_PUSH_BYTES) break;
    n++;
  }
  return actions.slice(0, n);
}

async function saveLink(deps: Deps, link: LinkRow, acked: number, failures: number, error: string | null, release: boolean): Promise<void> {
  const delay = failures > 0 ? federationBackoffMs(failures) : 0;
  await sql`
    update federation_links set acked_id = ${acked}, attempts = ${failures}, last_error = ${error?.slice(0, 2000) ?? null},
           next_attempt_at = now() + ${`${delay} milliseconds`}::interval,
           locked_until = ${release ? null : sql`now() + ${`${LINK_LEASE_MS} milliseconds`}::interval`}, updated_at = now()
     where conv_id = ${link.conv_id} and platform = ${link.platform}`.execute(deps.db.kysely);
}

/**
 * Pushes a claimed link until the platform has every action it may have, or a push fails.
 * Answers (docs/federation.md, "Push"): 200 `{last_id}` → acked; 409 `gap` `{last_id}` →
 * resend from there; anything else, a timeout or a network error → backoff. A platform the
 * allow/deny lists exclude is not contacted: the link backs off with `last_error`
 * `platform_denied: …` (issue 3 §9).
 */
export async function pushLink(deps: Deps, link: LinkRow): Promise<void> {
  let acked = link.acked_id;
  let failures = link.attempts;
  let gaps = 0;
  try {
    const url = `${await platformUrl(deps, link.platform)}/federation/v1/conversations/${link.key}/actions`;
    for (;;) {
      const batch = await nextBatch(deps, link, acked);
      if (batch.length === 0) break;
      const r = await signedFetch(deps, url, { json: { actions: batch }, timeoutMs: PUSH_TIMEOUT_MS });
      const text = await r.text();
      let body: any = null;
      try {
        body = JSON.parse(text);
      } catch {
        /* judged by status */
      }
      if (r.status === 200 && Number.isInteger(body?.last_id)) {
        // The replica's last id: beyond the batch when it joined by fetching the whole log.
        acked = Math.max(acked, body.last_id);
        failures = 0;
        gaps = 0;
        await saveLink(deps, link, acked, 0, null, false);
        continue;
      }
      if (r.status === 409 && body?.error?.code === 'gap' && Number.isInteger(body.error.details?.last_id) && gaps < 3) {
        gaps++;
        acked = Math.max(0, body.error.details.last_id);
        continue;
      }
      throw new Error(`${link.platform} answered ${r.status}: ${text.slice(0, 500)}`);
    }
    await saveLink(deps, link, acked, 0, null, true);
  } catch (e) {
    failures++;
    if (e instanceof AppError && e.code === 'platform_denied') {
      // Denied after the link was made: it waits, with no request sent, until the lists change.
      const why = `platform_denied: ${e.message}; nothing is sent to it while it is excluded`;
      deps.log.info({ conv: link.key, platform: link.platform, acked }, why);
      await saveLink(deps, link, acked, failures, why, true);
      return;
    }
    deps.log.warn({ conv: link.key, platform: link.platform, acked, failures, err: (e as Error).message }, 'federation push failed; retrying later');
    await saveLink(deps, link, acked, failures, (e as Error).message, true);
  }
}

async function claimProposals(deps: Deps, limit: number): Promise<number[]> {
  const r = await sql<{ id: number }>`
    select p.id from federation_proposals p
     where p.state = 'pending' and p.next_attempt_at <= now() and (p.locked_until is null or p.locked_until < now())
       and not exists (select 1 from federation_proposals q where q.conv_id = p.conv_id and q.state = 'pending' and q.id < p.id)
     order by p.id limit ${limit}`.execute(deps.db.kysely);
  const mine: number[] = [];
  for (const { id } of r.rows) if (await claimProposal(deps, id, false)) mine.push(id);
  return mine;
}

/** Conversations a starting replica catches up on itself (the most recently active ones). */
export const STARTUP_CATCHUP_CONVERSATIONS = 1000;

/**
 * What a platform does when its worker starts (after a crash, a restart, a long outage):
 * for the conversations it replicates (led elsewhere), most recently active first, it asks
 * each leader for the actions after its last one (backfill), instead of waiting for the
 * leaders' next push attempt, which may be minutes away after a long outage. Its request also
 * tells the leader it is back (the leader resets the link's backoff).
 */
export async function catchUpReplicas(deps: Deps, isStopped: () => boolean = () => false): Promise<number> {
  const r = await sql<{ key: string; leader: string; last_id: number }>`
    select key, leader, last_id from conversations
     where published and leader <> ${primaryDomain(deps)}
     order by last_ts desc nulls last limit ${STARTUP_CATCHUP_CONVERSATIONS}`.execute(deps.db.kysely);
  let got = 0;
  for (const c of r.rows) {
    if (isStopped()) break;
    try {
      got += (await backfillFrom(deps, c.leader, c.key, c.last_id)) - c.last_id;
    } catch (e) {
      deps.log.warn({ conv: c.key, leader: c.leader, err: (e as Error).message }, 'catch-up at start failed; the leader pushes later');
    }
  }
  return got;
}

/** Starts the federation worker of the worker role. */
export async function startFederationWorker(deps: Deps, opts: { pollMs?: number; concurrency?: number } = {}): Promise<FederationWorker> {
  const concurrency = opts.concurrency ?? 8;
  let stopped = false;
  const round = async () => {
    while (!stopped) {
      const links = await claimLinks(deps, 32);
      let i = 0;
      await Promise.all(
        Array.from({ length: Math.min(concurrency, links.length) }, async () => {
          while (i < links.length && !stopped) await pushLink(deps, links[i++]);
        }),
      );
      const proposals = await claimProposals(deps, 16);
      for (const id of proposals) {
        if (stopped) break;
        const o = await attemptProposal(deps, id);
        if (o.state === 'pending') deps.log.warn({ proposal: id, err: o.error }, 'proposal still pending');
      }
      if (links.length === 0 && proposals.length === 0) break;
    }
  };
  const runner = coalescingRunner(round, (e) => deps.log.error({ err: e }, 'federation round failed'));
  const listener = new pg.Client({ connectionString: (deps.db.pool as any).options.connectionString });
  listener.on('notification', runner.kick);
  listener.on('error', (err) => deps.log.warn({ err }, 'federation listener lost; polling continues'));
  await listener.connect();
  await listener.query(`LISTEN ${FEDERATION_CHANNEL}`);
  const timer = setInterval(runner.kick, opts.pollMs ?? 1000);
  runner.kick();
  const catchingUp = catchUpReplicas(deps, () => stopped).catch((e) => deps.log.warn({ err: e }, 'catch-up at start failed'));
  return {
    kick: runner.kick,
    idle: runner.idle,
    stop: async () => {
      stopped = true;
      clearInterval(timer);
      await runner.stop();
      await catchingUp;
      await listener.end().catch(() => {});
    },
  };
}
