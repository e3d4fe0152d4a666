/**
 * The leader's side of replication bookkeeping (issue 3 §5–6, §8; docs/federation.md,
 * "Replication"), run inside the transaction that appends actions to a conversation this
 * platform leads:
 *
 * - a participant added whose domain is served by another Parley platform (discovery) is a
 *   **remote participant**: recorded in `federation_participants`, never emailed, and its
 *   platform gets a **link** in `federation_links` — the outbox cursor of replication
 *   (acked id, backoff, lease), pushed by src/federation/pusher.ts;
 * - when the last active participant of a platform is removed, the link's `stop_id` is set to
 *   that removal: the platform gets the removal and nothing after; adding one of its users
 *   again clears it (the platform then receives everything from where it stopped, since a
 *   replica needs an unbroken hash chain);
 * - the pusher is woken after commit (NOTIFY {@link FEDERATION_CHANNEL}, payload: the
 *   conversation's id, or empty when a link was made, reopened or stopped).
 */
import { sql } from 'kysely';
import type { Action } from '../core/actions.ts';
import type { ConversationState } from '../core/reducer.ts';
import { type Deps, isLocalAddress, primaryDomain } from '../context.ts';
import { AppError } from '../platform/errors.ts';
import { notifyAfterCommit, type Queryable, type Tx } from '../store/db.ts';
import { bridgingEmail } from '../mail/outbound/enqueue.ts';
import { DiscoveryUnavailable } from './discovery.ts';
import { discoverPlatform } from './runtime.ts';

/**
 * The realtime channel that wakes the federation worker. Payload: the id of the conversation
 * whose actions were appended, or empty for "claim due links" (a link made or changed, a
 * platform back after an outage).
 */
export const FEDERATION_CHANNEL = 'parley_federation';

const domainOf = (address: string) => address.slice(address.lastIndexOf('@') + 1).toLowerCase();

/**
 * The name of the Parley platform serving `address`'s domain — its well-known `platform` when
 * discovery read one, else the domain itself (static routes, DNS) — or null when the domain
 * has none (an email participant).
 * @throws AppError 503 `discovery_unavailable` when that cannot be told now (the caller retries)
 */
export async function platformOfAddress(deps: Deps, address: string): Promise<string | null> {
  const domain = domainOf(address);
  try {
    const ref = await discoverPlatform(deps, domain);
    if (!ref) return null;
    return ref.platform ?? domain;
  } catch (e) {
    if (e instanceof DiscoveryUnavailable)
      throw new AppError(503, 'discovery_unavailable', `cannot tell now whether ${domain} has a Parley platform; retry later`, { domain });
    throw e;
  }
}

/**
 * Are `a` and `b` names of the same platform? Equal names, or names whose discovery gives the
 * same base URL (a platform known by one of its secondary domains).
 */
export async function samePlatform(deps: Deps, a: string, b: string): Promise<boolean> {
  if (a === b) return true;
  const [ra, rb] = await Promise.all([discoverPlatform(deps, a).catch(() => null), discoverPlatform(deps, b).catch(() => null)]);
  return !!ra && !!rb && ra.url === rb.url;
}

/** Does this platform lead the conversation of `row`? */
export function leadsHere(deps: Deps, row: { leader: string }): boolean {
  return row.leader === primaryDomain(deps);
}

/**
 * Records remote participants and links for new actions of a published conversation this
 * platform leads, in the appending transaction `tx`, and wakes the pusher after commit.
 * Called by src/conversations/append.ts storeActions, create-conversation.ts and
 * publish-draft.ts (every leader-side write path).
 * @throws AppError 503 discovery_unavailable (a participant's domain cannot be classified now)
 */
export async function trackReplication(tx: Tx, deps: Deps, convId: number, s: ConversationState, actions: Action[]): Promise<void> {
  if (!s.header?.published || actions.length === 0) return;
  const remoteAdds = actions.filter((a) => a.act === 'participant:add' && !isLocalAddress(deps, a.participant!));
  const remoteRemovals = actions.filter((a) => a.act === 'participant:remove' && !isLocalAddress(deps, a.participant!));
  const changed = new Set<string>();
  if (remoteAdds.length > 0) {
    const rows: { address: string; platform: string }[] = [];
    // Participants the email bridge adds took part by email: no discovery (no DNS or HTTPS
    // probe of every correspondent's domain while importing an archive).
    for (const a of bridgingEmail(tx) ? [] : remoteAdds) {
      let platform: string | null;
      try {
        platform = await platformOfAddress(deps, a.participant!);
      } catch (e) {
        // Discovery cannot answer now (DNS down, offline machine): the write must not fail for
        // it; the participant is reached by email, as one on a domain without a platform.
        if (!(e instanceof AppError && e.code === 'discovery_unavailable')) throw e;
        deps.log.warn({ address: a.participant, err: e.message }, 'platform discovery unavailable; participant treated as an email participant');
        platform = null;
      }
      if (platform !== null) rows.push({ address: a.participant!, platform });
    }
    if (rows.length > 0) {
      await sql`
        insert into federation_participants (conv_id, address, platform)
        select ${convId}, address, platform from unnest(${rows.map((r) => r.address)}::text[], ${rows.map((r) => r.platform)}::text[]) as t(address, platform)
        on conflict (conv_id, address) do nothing`.execute(tx);
      const platforms = [...new Set(rows.map((r) => r.platform))];
      for (const p of platforms) changed.add(p);
    }
  }
  if (remoteRemovals.length > 0) {
    const known = await participantPlatforms(tx, convId);
    const byPlatform = new Map<string, string[]>();
    for (const [address, platform] of known) byPlatform.set(platform, [...(byPlatform.get(platform) ?? []), address]);
    const stops: { platform: string; stop: number }[] = [];
    for (const a of remoteRemovals) {
      const platform = known.get(a.participant!);
      if (!platform) continue;
      changed.add(platform);
      const stillActive = (byPlatform.get(platform) ?? []).some((addr) => s.participants.get(addr)?.removed_id === null);
      if (!stillActive) stops.push({ platform, stop: a.id });
    }
    for (const { platform, stop } of stops) {
      await sql`update federation_links set stop_id = ${stop}, updated_at = now() where conv_id = ${convId} and platform = ${platform}`.execute(tx);
    }
  }
  // Links for platforms with an active participant again (new, or re-added after a removal).
  // Only platforms in `changed` can reopen: without any (e.g. the email bridge's adds) nothing is read.
  const active = changed.size > 0 ? await participantPlatforms(tx, convId) : new Map<string, string>();
  const reopen = [...new Set([...active].filter(([addr]) => s.participants.get(addr)?.removed_id === null).map(([, p]) => p))].filter((p) => changed.has(p));
  if (reopen.length > 0) {
    await sql`
      insert into federation_links (conv_id, platform)
      select ${convId}, p from unnest(${reopen}::text[]) as t(p)
      on conflict (conv_id, platform) do update set stop_id = null, next_attempt_at = now(), attempts = 0, updated_at = now()`.execute(tx);
  }
  if (remoteAdds.length === 0) await rememberRecipients(tx, deps, convId, s);
  // Wake the pusher when some participant is not ours (an email-only conversation costs it one
  // query). The payload names the conversation, so a pusher already sending its links leaves it
  // to them; a link made or reopened here must be claimed: the payload is then empty.
  if ([...s.participants.keys()].some((a) => !isLocalAddress(deps, a)))
    await notifyAfterCommit(tx, FEDERATION_CHANNEL, reopen.length > 0 || changed.size > 0 ? '' : String(convId));
}

/**
 * What {@link federatedRecipients} answers for conversations of a transaction, when the
 * writing code already knows it: null on a replica (this platform does not lead it), else
 * the remote participants' addresses. Saves its query per append.
 */
const knownRecipients = new WeakMap<object, Map<number, Set<string> | null>>();

/** Tells {@link federatedRecipients} what to answer for conversation `convId` in `tx` (null: this platform does not lead it). */
export function noteRecipients(tx: Queryable, convId: number, remote: Set<string> | null): void {
  let m = knownRecipients.get(tx);
  if (!m) knownRecipients.set(tx, (m = new Map()));
  m.set(convId, remote);
}

/**
 * Per conversation this platform leads: how each of its non-local participants was
 * classified when added — the platform serving it, or null for an email participant — with
 * the id of that `participant:add`. A classification is made once per `participant:add` and
 * never changes (federation_participants rows are never updated), so an entry holds while
 * the participant's `added_id` is the same; a participant added since (here or by another
 * process) is not in it, and the rows are read again.
 */
const classifiedByDb = new WeakMap<object, Map<number, Map<string, { added: number; platform: string | null }>>>();
const CLASSIFIED_MAX = 50_000;

/**
 * Works out, for an append to a conversation this platform leads that adds no remote
 * participant, which of its participants are remote (replicated to, never emailed) — from
 * the per-database cache above, else from federation_participants — and notes it for
 * {@link federatedRecipients} in `tx`.
 */
async function rememberRecipients(tx: Tx, deps: Deps, convId: number, s: ConversationState): Promise<void> {
  const others = [...s.participants.values()].filter((p) => !isLocalAddress(deps, p.address));
  if (others.length === 0) return;
  // Per database: conversation ids are only unique within one (tests run several platforms in a process).
  let classified = classifiedByDb.get(deps.db);
  if (!classified) classifiedByDb.set(deps.db, (classified = new Map()));
  let known = classified.get(convId);
  if (!known || others.some((p) => known!.get(p.address)?.added !== p.added_id)) {
    const rows = await participantPlatforms(tx, convId);
    if (classified.size >= CLASSIFIED_MAX) classified.clear();
    known = new Map(others.map((p) => [p.address, { added: p.added_id, platform: rows.get(p.address) ?? null }]));
    classified.set(convId, known);
  }
  noteRecipients(tx, convId, new Set(others.filter((p) => known!.get(p.address)!.platform !== null).map((p) => p.address)));
}

/** address → platform of a conversation's remote participants. */
export async function participantPlatforms(db: Queryable, convId: number): Promise<Map<string, string>> {
  const r = await sql<{ address: string; platform: string }>`select address, platform from federation_participants where conv_id = ${convId}`.execute(db);
  return new Map(r.rows.map((x) => [x.address, x.platform]));
}

/**
 * Whom the platform may email for a conversation (issue 3 §8): null when it does not lead
 * the conversation (only the leader mails email participants), else the set of remote
 * participants' addresses, which are replicated to and never emailed. Used by
 * src/mail/outbound/enqueue.ts. One query — none when the writing code noted the answer for
 * `tx` ({@link noteRecipients}: a replica storing received actions, a leader's append).
 */
export async function federatedRecipients(tx: Queryable, deps: Deps, convId: number): Promise<Set<string> | null> {
  const known = knownRecipients.get(tx)?.get(convId);
  if (known !== undefined) return known;
  const r = await sql<{ leader: string; address: string | null }>`
    select c.leader, f.address from conversations c left join federation_participants f on f.conv_id = c.id where c.id = ${convId}`.execute(tx);
  if (r.rows.length === 0 || r.rows[0].leader !== primaryDomain(deps)) return null;
  return new Set(r.rows.map((x) => x.address).filter((a): a is string => a !== null));
}
