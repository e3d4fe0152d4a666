/**
 * The federation worker (worker role; issue 3 §4–6; docs/federation.md, "Replication"):
 *
 * - **pusher** — claims due links of `federation_links` (`FOR UPDATE SKIP LOCKED`, a lease of
 *   {@link LINK_LEASE_MS}, so several worker processes never push the same link at once) and
 *   hands them to the **lane** of their destination platform. A lane sends the pending actions
 *   of all the links it holds in one multi-conversation push (`POST /federation/v1/push`: at
 *   most 500 actions and about 4 MiB per request, taken round-robin across conversations),
 *   one request in flight per platform, back to back while anything is pending: actions
 *   appended while a request is in flight go in the next one. A link whose entry fails waits
 *   1 s, 2 s, 4 s … at most 5 min (federationBackoffMs) while the others go on;
 * - **proposals** — sends the due pending proposals of this platform's users to their
 *   conversations' leaders (src/federation/proposals.ts), the oldest of each conversation first.
 *
 * Woken by NOTIFY `parley_federation` after an append commits (no timer on the live path: a
 * new action is claimed, or picked up by the lane holding its link, at once), and by a 1 s
 * poll for retries.
 */
import { sql } from 'kysely';
import type { Action } from '../core/actions.ts';
import type { Deps } from '../context.ts';
import { coalescingRunner } from '../platform/coalesce.ts';
import { AppError } from '../platform/errors.ts';
import { listen } from '../store/listen.ts';
import { readActions } from '../conversations/store.ts';
import { signedRequest } from './client.ts';
import { MAX_PUSH_ACTIONS } from './hooks.ts';
import { FEDERATION_CHANNEL } from './outbox.ts';
import { attemptProposal, claimProposal, federationBackoffMs } from './proposals.ts';
import { backfillFrom, platformUrl } from './replication.ts';
import { warmVerifyWorker } from './verify-pool.ts';
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
  /**
   * Resolves once the catch-up at start has had its first answer from a leader — or had
   * nothing to ask, or failed (src/app.ts builds the HTTP API after it: see there).
   */
  firstAnswer: Promise<void>;
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
      const r = await signedRequest(deps, url, { json: { actions: batch }, timeoutMs: PUSH_TIMEOUT_MS });
      const text = r.text;
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
export async function catchUpReplicas(deps: Deps, isStopped: () => boolean = () => false, onAnswer?: () => void): Promise<number> {
  const r = await sql<{ key: string; leader: string; last_id: number }>`
    select key, leader, last_id from conversations
     where published and leader <> ${primaryDomain(deps)}
     order by last_ts desc nulls last limit ${STARTUP_CATCHUP_CONVERSATIONS}`.execute(deps.db.kysely);
  let got = 0;
  for (const c of r.rows) {
    if (isStopped()) break;
    try {
      got += (await backfillFrom(deps, c.leader, c.key, c.last_id, Infinity, onAnswer)) - c.last_id;
    } catch (e) {
      deps.log.warn({ conv: c.key, leader: c.leader, err: (e as Error).message }, 'catch-up at start failed; the leader pushes later');
    }
  }
  return got;
}

/** Links one claim takes at most (the rest are claimed by the next round). */
const CLAIM_LIMIT = 256;
/** How long the pusher keeps using the single-conversation push for a platform that answered 404 to `POST /federation/v1/push`, in ms. */
export const LEGACY_PUSH_MEMORY_MS = 10 * 60_000;

/** A link held by a {@link Lane}, with what the lane knows of it beyond its row. */
interface HeldLink {
  row: LinkRow;
  /** Acknowledged by the platform (or, after `gap`, its last id). */
  acked: number;
  /** Failed attempts in a row before this lane took it. */
  failures: number;
  /** `gap` answers in a row. */
  gaps: number;
}

/** One conversation's entry of a multi-conversation push, as read from the database. */
interface PendingEntry {
  link: HeldLink;
  /** The actions' JSON text (as stored), oldest first. */
  actions: string[];
  firstId: number;
  lastId: number;
}

/**
 * Reads the next multi-conversation push for `links` of `platform` in one statement: per
 * link, the actions after its acked id up to its target (the conversation's last id, or the
 * link's `stop_id`; a platform new to a conversation longer than a batch gets its last batch,
 * from which it joins), taken round-robin across the links — every link's first pending
 * action, then every link's second … — up to {@link MAX_PUSH_ACTIONS} actions in all and
 * about {@link MAX_PUSH_BYTES} (a single larger action goes alone). Each link's part is a
 * prefix of what it has pending, so every entry continues its link.
 *
 * A link whose next attempt was put off meanwhile — the replica is pulling the conversation
 * page by page (replication-routes.ts), and would be sent the same actions twice — is not
 * read: it is returned in `deferred`, for the lane to let go.
 */
async function readPending(deps: Deps, platform: string, links: HeldLink[]): Promise<{ entries: PendingEntry[]; deferred: HeldLink[] }> {
  if (links.length === 0) return { entries: [], deferred: [] };
  const r = await sql<{ conv_id: string | number; id: number | null; body: string | null }>`
    with l as (select * from unnest(${links.map((l) => l.row.conv_id)}::bigint[], ${links.map((l) => l.acked)}::int[]) as l(conv_id, acked)),
    t as (select l.conv_id, l.acked, least(c.last_id, coalesce(fl.stop_id, c.last_id)) as target, fl.next_attempt_at > now() as deferred
            from l join conversations c on c.id = l.conv_id
            join federation_links fl on fl.conv_id = l.conv_id and fl.platform = ${platform}),
    r as (select conv_id, case when acked = 0 and target > ${MAX_PUSH_ACTIONS} then target - ${MAX_PUSH_ACTIONS - 1} else acked + 1 end as f, target
            from t where acked < target and not deferred)
    (select r.conv_id, a.id, a.body::text as body
      from r cross join lateral (
        select id, body from actions where conv_id = r.conv_id and id between r.f and r.target order by id limit ${MAX_PUSH_ACTIONS}) a
     order by a.id - r.f, r.conv_id
     limit ${MAX_PUSH_ACTIONS})
    union all
    select conv_id, null, null from t where deferred`.execute(deps.db.kysely);
  const byConv = new Map(links.map((l) => [Number(l.row.conv_id), l]));
  const entries = new Map<number, PendingEntry>();
  const deferred: HeldLink[] = [];
  let bytes = 0;
  let full = false;
  for (const row of r.rows) {
    const conv = Number(row.conv_id);
    if (row.id === null || row.body === null) {
      deferred.push(byConv.get(conv)!);
      continue;
    }
    if (full) continue;
    bytes += row.body.length;
    if (entries.size > 0 && bytes > MAX_PUSH_BYTES) {
      full = true;
      continue;
    }
    const e = entries.get(conv);
    if (e) {
      e.actions.push(row.body);
      e.lastId = row.id;
    } else entries.set(conv, { link: byConv.get(conv)!, actions: [row.body], firstId: row.id, lastId: row.id });
  }
  return { entries: [...entries.values()], deferred };
}

/** What the lane records of one link after a push: its new acked id, failures, error, and whether it lets the link go. */
interface LinkUpdate {
  link: HeldLink;
  error: string | null;
  release: boolean;
}

/**
 * Saves the links' cursors in one statement: `acked_id`, the failure count and error, the
 * next attempt (after the backoff of a failure; else now — or later when it was put off
 * meanwhile by a replica pulling the conversation) and the lease (renewed while the lane
 * keeps the link, cleared when it lets it go).
 */
async function saveLinks(deps: Deps, platform: string, updates: LinkUpdate[]): Promise<void> {
  if (updates.length === 0) return;
  await sql`
    update federation_links fl
       set acked_id = u.acked, attempts = u.failures, last_error = u.err,
           next_attempt_at = case when u.delay_ms > 0 then now() + make_interval(secs => u.delay_ms / 1000.0) else greatest(fl.next_attempt_at, now()) end,
           locked_until = case when u.release then null else now() + ${`${LINK_LEASE_MS} milliseconds`}::interval end,
           updated_at = now()
      from unnest(${updates.map((u) => u.link.row.conv_id)}::bigint[], ${updates.map((u) => u.link.acked)}::int[],
                  ${updates.map((u) => u.link.failures)}::int[], ${updates.map((u) => u.error?.slice(0, 2000) ?? null)}::text[],
                  ${updates.map((u) => (u.link.failures > 0 ? federationBackoffMs(u.link.failures) : 0))}::int[],
                  ${updates.map((u) => u.release)}::bool[]) as u(conv_id, acked, failures, err, delay_ms, release)
     where fl.conv_id = u.conv_id and fl.platform = ${platform}`.execute(deps.db.kysely);
}

/** The answer of a multi-conversation push for one conversation, as the sender reads it. */
interface EntryAnswer {
  status: number;
  last_id?: number;
  error?: { code?: string; message?: string; details?: { last_id?: unknown } };
}

/**
 * The pusher of one destination platform: it holds the claimed links of that platform and
 * sends their pending actions **all in one request** per round trip (`POST
 * /federation/v1/push`, docs/federation.md, "Push"), one request in flight at a time, back to
 * back while anything is pending — actions appended while a request is in flight go in the
 * next one. A link whose entry fails backs off alone (the others go on); a platform that does
 * not know the multi-conversation push (404) gets single-conversation pushes
 * ({@link pushLink}) for {@link LEGACY_PUSH_MEMORY_MS}.
 */
class Lane {
  private readonly held = new Map<number, HeldLink>();
  private running: Promise<void> | null = null;
  /** Until when the platform gets single-conversation pushes (it answered 404 to the multi-conversation push). */
  private legacyUntil = 0;

  constructor(
    private readonly deps: Deps,
    readonly platform: string,
    private readonly isStopped: () => boolean,
    /** Called after the lane let links go: a link with actions appended meanwhile is claimed again. */
    private readonly onRelease: () => void,
  ) {}

  /** Does the lane hold the link of conversation `convId`? (Its new actions go in the lane's next request.) */
  holds(convId: number): boolean {
    return this.held.has(convId);
  }

  /** Takes claimed links and starts pushing unless the lane is already running. */
  add(links: LinkRow[]): void {
    for (const row of links)
      if (!this.held.has(Number(row.conv_id))) this.held.set(Number(row.conv_id), { row, acked: row.acked_id, failures: row.attempts, gaps: 0 });
    if (!this.running && this.held.size > 0)
      this.running = this.run()
        .catch((e) => this.deps.log.error({ err: e, platform: this.platform }, 'federation lane failed'))
        .finally(() => {
          this.running = null;
          // Links handed over while the lane was letting the others go: push them now.
          if (this.held.size > 0) this.add([]);
          this.onRelease();
        });
  }

  /** Resolves when the lane is not pushing. */
  async idle(): Promise<void> {
    while (this.running) await this.running;
  }

  private async run(): Promise<void> {
    let url: string;
    try {
      url = await platformUrl(this.deps, this.platform);
    } catch (e) {
      const denied = e instanceof AppError && e.code === 'platform_denied';
      const why = denied ? `platform_denied: ${(e as Error).message}; nothing is sent to it while it is excluded` : (e as Error).message;
      (denied ? this.deps.log.info : this.deps.log.warn).call(this.deps.log, { platform: this.platform, links: this.held.size }, why);
      await this.failAll([...this.held.values()], why);
      return;
    }
    // The cursors saved after a push, while the next one is read (one round trip less per cycle).
    let saving: Promise<void> = Promise.resolve();
    try {
      while (!this.isStopped() && this.held.size > 0) {
        if (Date.now() < this.legacyUntil) {
          await saving;
          await this.pushLegacy();
          break;
        }
        const [{ entries, deferred }] = await Promise.all([readPending(this.deps, this.platform, [...this.held.values()]), saving]);
        if (deferred.length > 0) {
          // The replica pulls these itself for now: let them go (claimed again when due).
          for (const link of deferred) this.held.delete(Number(link.row.conv_id));
          await saveLinks(this.deps, this.platform, deferred.map((link) => ({ link, error: null, release: true })));
        }
        if (entries.length === 0) break;
        ({ saving } = await this.pushEntries(url, entries));
      }
      await saving;
    } finally {
      await saving.catch(() => {});
      const rest = [...this.held.values()];
      this.held.clear();
      await saveLinks(this.deps, this.platform, rest.map((link) => ({ link, error: null, release: true })));
    }
  }

  /**
   * One multi-conversation push of `entries` and what its answers make of their links.
   * @returns the saving of the links' new cursors, under way (failures are saved before it returns)
   */
  private async pushEntries(url: string, entries: PendingEntry[]): Promise<{ saving: Promise<void> }> {
    const body = `{"conversations":[${entries.map((e) => `{"key":${JSON.stringify(e.link.row.key)},"actions":[${e.actions.join(',')}]}`).join(',')}]}`;
    let status = 0;
    let text = '';
    try {
      const r = await signedRequest(this.deps, `${url}/federation/v1/push`, { body, headers: { 'content-type': 'application/json' }, timeoutMs: PUSH_TIMEOUT_MS });
      status = r.status;
      text = r.text;
    } catch (e) {
      await this.failAll(entries.map((e) => e.link), `${this.platform}: ${(e as Error).message}`);
      return { saving: Promise.resolve() };
    }
    let answer: { results?: ({ key?: unknown } & EntryAnswer)[] } | null = null;
    try {
      answer = JSON.parse(text);
    } catch {
      /* judged by status */
    }
    if (status === 404 && !Array.isArray(answer?.results)) {
      // A platform without the multi-conversation push (an older implementation).
      this.deps.log.info({ platform: this.platform }, 'the platform has no multi-conversation push; pushing one conversation per request');
      this.legacyUntil = Date.now() + LEGACY_PUSH_MEMORY_MS;
      return { saving: Promise.resolve() };
    }
    if (status !== 200 || !Array.isArray(answer?.results)) {
      await this.failAll(entries.map((e) => e.link), `${this.platform} answered ${status}: ${text.slice(0, 500)}`);
      return { saving: Promise.resolve() };
    }
    const byKey = new Map(answer!.results.map((x) => [x.key, x]));
    const updates: LinkUpdate[] = [];
    for (const e of entries) {
      const link = e.link;
      const a = byKey.get(link.row.key);
      if (a?.status === 200 && Number.isInteger(a.last_id)) {
        // The replica's last id: beyond the entry when it joined by fetching the whole log.
        link.acked = Math.max(link.acked, a.last_id!);
        link.failures = 0;
        link.gaps = 0;
        updates.push({ link, error: null, release: false });
      } else if (a?.status === 409 && a.error?.code === 'gap' && Number.isInteger(a.error.details?.last_id) && link.gaps < 3) {
        link.gaps++;
        link.acked = Math.max(0, a.error.details!.last_id as number);
        updates.push({ link, error: null, release: false });
      } else {
        const why = a ? `${this.platform} answered ${a.status} for ${link.row.key}: ${JSON.stringify(a.error ?? null).slice(0, 500)}` : `${this.platform} gave no answer for ${link.row.key}`;
        updates.push(this.failure(link, why));
      }
    }
    const saving = saveLinks(this.deps, this.platform, updates);
    saving.catch(() => {}); // awaited by the lane; not an unhandled rejection meanwhile
    return { saving };
  }

  /** The single-conversation push of every held link, one after the other (a platform without `POST /federation/v1/push`). */
  private async pushLegacy(): Promise<void> {
    for (const link of [...this.held.values()]) {
      if (this.isStopped()) break;
      this.held.delete(Number(link.row.conv_id));
      await pushLink(this.deps, { ...link.row, acked_id: link.acked, attempts: link.failures });
    }
  }

  /** A failed attempt for `link`: it leaves the lane and waits its backoff. */
  private failure(link: HeldLink, why: string): LinkUpdate {
    link.failures++;
    link.gaps = 0;
    this.held.delete(Number(link.row.conv_id));
    this.deps.log.warn({ conv: link.row.key, platform: this.platform, acked: link.acked, failures: link.failures, err: why }, 'federation push failed; retrying later');
    return { link, error: why, release: true };
  }

  private async failAll(links: HeldLink[], why: string): Promise<void> {
    await saveLinks(this.deps, this.platform, links.map((l) => this.failure(l, why)));
  }
}

/** Starts the federation worker of the worker role. */
export async function startFederationWorker(deps: Deps, opts: { pollMs?: number } = {}): Promise<FederationWorker> {
  let stopped = false;
  const lanes = new Map<string, Lane>();
  const laneOf = (platform: string) => {
    let lane = lanes.get(platform);
    if (!lane) lanes.set(platform, (lane = new Lane(deps, platform, () => stopped, () => runner.kick())));
    return lane;
  };
  // conversation id → the platforms it has links to, as claims showed them.
  const linkedTo = new Map<number, Set<string>>();
  const round = async () => {
    while (!stopped) {
      const links = await claimLinks(deps, CLAIM_LIMIT);
      const byPlatform = new Map<string, LinkRow[]>();
      if (linkedTo.size > 100_000) linkedTo.clear();
      for (const l of links) {
        byPlatform.set(l.platform, [...(byPlatform.get(l.platform) ?? []), l]);
        const conv = Number(l.conv_id);
        linkedTo.set(conv, (linkedTo.get(conv) ?? new Set()).add(l.platform));
      }
      for (const [platform, list] of byPlatform) laneOf(platform).add(list);
      const proposals = await claimProposals(deps, 16);
      for (const id of proposals) {
        if (stopped) break;
        const o = await attemptProposal(deps, id);
        if (o.state === 'pending') deps.log.warn({ proposal: id, err: o.error }, 'proposal still pending');
      }
      if (links.length < CLAIM_LIMIT && proposals.length === 0) break;
    }
  };
  const runner = coalescingRunner(round, (e) => deps.log.error({ err: e }, 'federation round failed'));
  const unlisten = await listen(
    deps,
    FEDERATION_CHANNEL,
    (payload) => {
      // The payload of an append is its conversation's id: a lane that holds the conversation's
      // link sends its new actions with its next request anyway; anything else is a claim.
      // (Links are made or reopened with an empty payload, so the platforms known here are all of them.)
      const conv = Number(payload);
      const platforms = payload ? linkedTo.get(conv) : undefined;
      if (platforms && [...platforms].every((p) => lanes.get(p)?.holds(conv))) return;
      runner.kick();
    },
    runner.kick,
  );
  const timer = setInterval(runner.kick, opts.pollMs ?? 1000);
  runner.kick();
  warmVerifyWorker(); // the catch-up's first page is checked on it
  let answered!: () => void;
  const firstAnswer = new Promise<void>((r) => (answered = r));
  const catchingUp = catchUpReplicas(deps, () => stopped, answered)
    .catch((e) => deps.log.warn({ err: e }, 'catch-up at start failed'))
    .finally(answered);
  const allIdle = async () => {
    await runner.idle();
    for (const l of lanes.values()) await l.idle();
  };
  return {
    kick: runner.kick,
    idle: allIdle,
    firstAnswer,
    stop: async () => {
      stopped = true;
      clearInterval(timer);
      await runner.stop();
      for (const l of lanes.values()) await l.idle();
      await catchingUp;
      await unlisten();
    },
  };
}
