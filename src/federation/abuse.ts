/**
 * Abuse controls of federation (issue 3 §9; docs/federation.md, "Abuse controls"):
 *
 * - **allow and deny lists** of platforms (`PARLEY_FEDERATION_ALLOW`, `PARLEY_FEDERATION_DENY`):
 *   a request whose keyid names a platform that is denied, or not allowed while an allow list
 *   is set, is refused with `403 platform_denied` **before** its signature is verified — so a
 *   denied platform never makes this one discover it or fetch its keys. The lists and the
 *   rate below are read from `deps.config` at each use, so `kill -HUP` (a configuration
 *   reload, src/cli/commands/start.ts) changes them at once;
 * - a **rate limit per remote platform** (`PARLEY_FEDERATION_RATE` requests/s with
 *   `PARLEY_FEDERATION_BURST`): a token bucket in memory, per process. A request is admitted
 *   while the bucket of the platform its keyid names holds a token, and is charged to that
 *   platform only once its signature verified — so a forger cannot spend a real platform's
 *   budget. Beyond it: `429 rate_limited` with `Retry-After` (seconds);
 * - **body size**: federation bodies up to `PARLEY_FEDERATION_MAX_BODY_BYTES` (10 MiB by
 *   default), `413 too_large` beyond, refused from Content-Length before the body is read;
 * - **batches**: at most {@link MAX_BATCH_ACTIONS} actions per push or proposal (`413 batch_too_large`);
 * - **who may submit what** ({@link checkBatch}): a push comes from the conversation's leader
 *   only; a proposal carries only actions whose actors are users of the proposing platform
 *   (the origin rule, runtime.ts actorOriginCheck) and active participants of the
 *   conversation; a conversation joins only if one of this platform's users is in it
 *   ({@link checkJoin}).
 *
 * {@link federationAbuseHooks} installs the first three on the `/federation/v1` scope;
 * the replication handlers call {@link checkBatch} and {@link checkJoin}.
 */
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { type Deps, isLocalAddress, primaryDomain } from '../context.ts';
import type { Action } from '../core/actions.ts';
import type { ConversationState } from '../core/reducer.ts';
import type { Config } from '../platform/config.ts';
import { AppError, badRequest, conflict, forbidden, tooLarge, tooManyRequests } from '../platform/errors.ts';
import { parseActionSig } from './action-signatures.ts';
import { SIGNATURE_LABEL, type VerifiedPeer, parseKeyId } from './http-signatures.ts';
import { StructuredFieldError, isInnerList, parseDictionary } from './structured-fields.ts';
import { actorOriginCheck, federationOf } from './runtime.ts';

/** Most actions in one pushed or proposed batch (issue 3 §9); larger batches get 413 batch_too_large. */
export const MAX_BATCH_ACTIONS = 500;

/** Most remote platforms whose rate-limit buckets one process keeps; the least recently used go first. */
const MAX_BUCKETS = 10_000;

const domainMatches = (pattern: string, domain: string) =>
  pattern.startsWith('*.') ? domain.endsWith(pattern.slice(1)) && domain.length > pattern.length - 1 : domain === pattern;

/**
 * Whether the configuration lets this platform federate with `domain` (a platform name or
 * a mail domain): not on the deny list, and on the allow list when one is set. An entry
 * `example.com` matches that domain exactly; `*.example.com` matches its subdomains (not
 * the domain itself). Matching is case-insensitive. Callers that contact other platforms
 * (pushes, backfill, blob fetches) use it too, so a denied platform is never called.
 */
export function isDomainAllowed(config: Pick<Config, 'federationAllow' | 'federationDeny'>, domain: string): boolean {
  const d = domain.toLowerCase();
  if ((config.federationDeny ?? []).some((p) => domainMatches(p, d))) return false;
  const allow = config.federationAllow ?? [];
  return allow.length === 0 || allow.some((p) => domainMatches(p, d));
}

/**
 * Refuses a remote platform the allow/deny lists exclude — the one check of both directions:
 * inbound requests (its keyid's platform) and every outbound contact (pushes, proposals,
 * backfill and log fetches, through replication.ts platformUrl; blob fetches).
 * @param peer the platform name (primary domain) from a keyid, or the platform to be called
 * @throws AppError 403 platform_denied `{details: {platform}}`
 */
export function checkPeerAllowed(deps: Pick<Deps, 'config'>, peer: string): void {
  if (!isDomainAllowed(deps.config, peer))
    throw forbidden('platform_denied', `this platform does not federate with ${peer} (PARLEY_FEDERATION_DENY / PARLEY_FEDERATION_ALLOW)`, { platform: peer });
}

/** One remote platform's token bucket. `tokens` may go negative: requests admitted together are all charged. */
interface Bucket {
  tokens: number;
  at: number;
}

/**
 * A token bucket per remote platform, in memory (each process limits on its own: with N web
 * processes a platform may send up to N times the rate). `ratePerS` tokens are added per
 * second up to `burst`; each verified request takes one.
 */
export class PeerRateLimiter {
  private readonly buckets = new Map<string, Bucket>();
  /**
   * @param limits read at every request, so a configuration reload (SIGHUP) applies at once:
   *   `ratePerS` tokens per second (0: no limit), at most `burst` in a bucket
   */
  constructor(
    private readonly limits: () => { ratePerS: number; burst: number },
    private readonly now: () => number,
  ) {}

  private get ratePerS(): number {
    return this.limits().ratePerS;
  }

  private get burst(): number {
    return this.limits().burst;
  }

  private bucket(peer: string): Bucket {
    const t = this.now();
    let b = this.buckets.get(peer);
    if (!b) {
      b = { tokens: this.burst, at: t };
      if (this.buckets.size >= MAX_BUCKETS) this.buckets.delete(this.buckets.keys().next().value!);
    } else {
      this.buckets.delete(peer); // re-inserted below: Map order is the LRU order
      b.tokens = Math.min(this.burst, b.tokens + ((t - b.at) / 1000) * this.ratePerS);
      b.at = t;
    }
    this.buckets.set(peer, b);
    return b;
  }

  /**
   * Seconds until `peer` may send again (whole seconds, ≥ 1), or 0 when it may now.
   * Does not take a token (see {@link charge}).
   */
  retryAfterS(peer: string): number {
    if (this.ratePerS <= 0) return 0;
    const b = this.bucket(peer);
    if (b.tokens >= 1) return 0;
    return Math.max(1, Math.ceil((1 - b.tokens) / this.ratePerS));
  }

  /** Takes one token from `peer`'s bucket (after its request verified). */
  charge(peer: string): void {
    if (this.ratePerS <= 0) return;
    this.bucket(peer).tokens -= 1;
  }
}

const limiters = new WeakMap<object, PeerRateLimiter>();

/** The rate limiter of the platform `deps` belongs to (one per database handle, i.e. per process), from its configuration. */
export function rateLimiterOf(deps: Pick<Deps, 'db' | 'config' | 'clock'>): PeerRateLimiter {
  let l = limiters.get(deps.db);
  if (!l) {
    const config = deps.config;
    l = new PeerRateLimiter(
      () => ({ ratePerS: config.federationRatePerS ?? 200, burst: config.federationBurst ?? 400 }),
      () => deps.clock.now(),
    );
    limiters.set(deps.db, l);
  }
  return l;
}

/**
 * The platform a request claims to come from: the platform part of the keyid of the
 * signature `requirePlatform` will verify — parsed as verifyRequest parses it (RFC 8941
 * dictionary; the `parley` member, else the first) so the two cannot disagree — but not yet
 * verified. Null when the request is not signed in a form this can read: `requirePlatform`
 * then refuses it with the precise reason.
 */
export function claimedPeer(req: Pick<FastifyRequest, 'headers'>): string | null {
  const raw = req.headers['signature-input'];
  const input = Array.isArray(raw) ? raw.join(', ') : raw;
  if (!input) return null;
  let inputs;
  try {
    inputs = parseDictionary(input);
  } catch (e) {
    if (e instanceof StructuredFieldError) return null;
    throw e;
  }
  const label = inputs.has(SIGNATURE_LABEL) ? SIGNATURE_LABEL : [...inputs.keys()][0];
  const params = label !== undefined ? inputs.get(label) : undefined;
  if (!params || !isInnerList(params)) return null;
  const keyId = params.params.get('keyid');
  return typeof keyId === 'string' ? (parseKeyId(keyId)?.platform ?? null) : null;
}

/**
 * Installs the request-level abuse controls on the `/federation/v1` route scope (call it
 * inside the scope that requires signed requests, src/federation/routes.ts):
 *
 * - `onRequest`: 413 too_large when Content-Length exceeds `federationMaxBodyBytes`; 403
 *   platform_denied when the keyid's platform is excluded by the allow/deny lists; 429
 *   rate_limited (Retry-After) when that platform's bucket is empty — all before the body is
 *   read or the signature verified;
 * - `onResponse`: charges one token to the verified platform (`req.peer`) of a request.
 */
export function federationAbuseHooks(scope: FastifyInstance, deps: Deps): void {
  const maxBody = deps.config.federationMaxBodyBytes ?? 10 * 1024 * 1024;
  scope.addHook('onRequest', async (req: FastifyRequest) => {
    const length = Number(req.headers['content-length']);
    if (length > maxBody) throw tooLarge(`the body is larger than ${maxBody} bytes`, { max_bytes: maxBody });
    const peer = claimedPeer(req);
    if (peer === null) return;
    checkPeerAllowed(deps, peer);
    const wait = rateLimiterOf(deps).retryAfterS(peer);
    if (wait > 0) throw tooManyRequests(`too many requests from ${peer}; retry in ${wait} s`, wait);
  });
  scope.addHook('onResponse', async (req: FastifyRequest, _reply: FastifyReply) => {
    if (req.peer) rateLimiterOf(deps).charge(req.peer.platform);
  });
}

/** 422 `invalid_log` as the replication endpoints answer it (details `{id, reason, code?}`). */
const invalidLog = (id: number, reason: string, message: string, code?: string) =>
  new AppError(422, 'invalid_log', message, { id, reason, ...(code ? { code } : {}) });

/**
 * Which kind of batch {@link checkBatch} looks at: a `push` (leader → replica), a `proposal`
 * (follower → leader) or a `log` page fetched from the leader while joining (checked like a push).
 */
export type BatchKind = 'push' | 'proposal' | 'log';

/**
 * The checks of a received batch that need no signature work, run before `verifyLog`
 * (issue 3 §9). In order:
 *
 * 1. `actions` is a non-empty array (400 invalid_request) of at most {@link MAX_BATCH_ACTIONS}
 *    (413 batch_too_large, details `{max, actions}`);
 * 2. **push** (`POST …/conversations/{key}/actions`) and **log** pages: `peer` leads the
 *    conversation — the `leader` of the local conversation row, or, for a conversation this
 *    platform does not have yet, the platform whose key signed action 1 (the creator's
 *    platform, which verifyLog's origin rule then proves) — else 403 not_leader, details
 *    `{leader}`; this platform leading it itself is also 403 not_leader;
 * 3. **proposal** (`POST …/conversations/{key}/proposals`): this platform leads the
 *    conversation (404 not_found when it has no such conversation, 409 not_leader when another
 *    platform leads it); every action's actor is a user of `peer` — its domain is `peer` or
 *    discovery finds `peer` for it (runtime.ts actorOriginCheck; an email participant's
 *    action is left to verifyLog, which knows the conversation's state) — else 422
 *    invalid_log, details `{id, reason: "wrong_origin"}`; and
 *    every actor is an active participant of the conversation now, or is added by an earlier
 *    action of the batch — else 422 invalid_log, details `{id, reason: "rule_violation",
 *    code: "not_participant"}`. These are the statuses the replication endpoints give for the
 *    same faults found later (src/federation/replication.ts, proposals.ts): refusing them here
 *    only saves the signature checks and blob fetches.
 *
 * Hashes, the chain, signatures and the core rules are verifyLog's (422 invalid_log).
 * @param conv the conversation key of the URL
 * @param known the local conversation row of `conv` (null: none here) when the caller read it already — a multi-conversation push reads its entries' rows in one statement; else it is read here
 * @throws AppError as listed; nothing is stored by it
 */
export async function checkBatch(
  deps: Deps,
  peer: string,
  conv: string,
  actions: unknown,
  kind: BatchKind,
  known?: { id: number; leader: string; published: boolean } | null,
): Promise<void> {
  if (!Array.isArray(actions) || actions.length === 0) throw badRequest('invalid_request', 'actions must be a non-empty array of actions');
  if (actions.length > MAX_BATCH_ACTIONS)
    throw new AppError(413, 'batch_too_large', `a batch holds at most ${MAX_BATCH_ACTIONS} actions; split it`, { max: MAX_BATCH_ACTIONS, actions: actions.length });
  for (const a of actions)
    if (!a || typeof a !== 'object' || Array.isArray(a) || typeof (a as Action).actor !== 'string' || !Number.isInteger((a as Action).id))
      throw badRequest('invalid_request', 'every entry of actions must be an action object with an integer id and an actor');
  const list = actions as Action[];
  const self = primaryDomain(deps);
  const row =
    known !== undefined
      ? (known ?? undefined)
      : await deps.db.kysely.selectFrom('conversations').select(['id', 'leader', 'published']).where('key', '=', conv).executeTakeFirst();

  if (kind === 'push' || kind === 'log') {
    let leader: string | null;
    if (row) leader = row.leader;
    else {
      const first = list.find((a) => a.id === 1);
      leader = first ? (parseActionSig(first.sig)?.platform ?? null) : peer; // a later batch of an unknown conversation: the handler fetches the log
    }
    if (leader !== peer || leader === self)
      throw forbidden('not_leader', `${peer} does not lead conversation ${conv}; only its leader pushes actions`, { leader });
    return;
  }

  if (!row || !row.published) throw new AppError(404, 'not_found', `conversation ${conv} not found`);
  if (row.leader !== self) throw conflict('not_leader', `${self} does not lead conversation ${conv}; propose to ${row.leader}`, { leader: row.leader });
  const fed = federationOf(deps);
  const origin = actorOriginCheck(fed.discovery, { platform: self, domains: deps.config.domains });
  const actors = [...new Set(list.map((a) => a.actor.toLowerCase()))];
  const rows = await deps.db.kysely
    .selectFrom('participants')
    .select('address')
    .where('conv_id', '=', row.id)
    .where('address', 'in', actors)
    .where('removed_id', 'is', null)
    .execute();
  const active = new Set(rows.map((r) => r.address));
  for (const a of list) {
    const actor = a.actor.toLowerCase();
    const why = await origin(a, peer);
    if (why !== null) throw invalidLog(a.id, 'wrong_origin', `action ${a.id}: ${why}; a platform proposes only its own users' actions`);
    if (!active.has(actor))
      throw invalidLog(a.id, 'rule_violation', `action ${a.id}: ${a.actor} is not a participant of conversation ${conv}`, 'not_participant');
    if (a.act === 'participant:add' && typeof a.participant === 'string') active.add(a.participant.toLowerCase());
    if (a.act === 'participant:remove' && typeof a.participant === 'string') active.delete(a.participant.toLowerCase());
  }
}

/** A batch as the replication endpoints receive it (the `PeerBatch` of src/federation/hooks.ts). */
export interface ReceivedBatch {
  kind: BatchKind;
  /** The conversation key from the URL. */
  key: string;
  /** The actions as received, unverified. */
  actions: Action[];
  /** Size of the request body in bytes (0 for a page this platform fetched). */
  bytes: number;
  /** The local row of the conversation (null: not here), when the caller read it already; else it is read. */
  conversation?: { id: number; leader: string; published: boolean } | null;
}

/**
 * {@link checkBatch} in the shape of the replication endpoints' extension point
 * (src/federation/hooks.ts `checkPeerBatch`): also refuses a body over
 * `federationMaxBodyBytes` (413 too_large) and a peer the allow/deny lists exclude (403
 * platform_denied) — both already refused by {@link federationAbuseHooks} for requests,
 * checked again here for pages this platform fetched itself.
 * @throws AppError 400 | 403 | 404 | 413 as {@link checkBatch}
 */
export async function checkPeerBatch(deps: Deps, peer: VerifiedPeer | { platform: string }, batch: ReceivedBatch): Promise<void> {
  checkPeerRequest(deps, peer.platform, batch.bytes);
  await checkBatch(deps, peer.platform, batch.key, batch.actions, batch.kind, batch.conversation);
}

/**
 * The request-level checks of a received body: the allow/deny lists (403 platform_denied)
 * and `federationMaxBodyBytes` (413 too_large). A multi-conversation push makes them once
 * for the request, then checks each entry's batch with {@link checkPeerBatch} and `bytes` 0.
 * @param bytes the request body's size, bytes (0 for a page this platform fetched)
 * @throws AppError 403 platform_denied | 413 too_large
 */
export function checkPeerRequest(deps: Deps, platform: string, bytes: number): void {
  checkPeerAllowed(deps, platform);
  const maxBody = deps.config.federationMaxBodyBytes ?? 10 * 1024 * 1024;
  if (bytes > maxBody) throw tooLarge(`the body is larger than ${maxBody} bytes`, { max_bytes: maxBody });
}

/**
 * The check before a platform stores a conversation it did not have (a push of a new
 * conversation, a join after fetching its log), on the log and the state verifyLog replayed:
 * `peer` signed action 1 — it is the creator's platform, the leader (else 403 not_leader,
 * details `{leader}`) — and at least one participant, current or removed (who keeps what
 * it saw), is a user of this platform: otherwise the peer is filling this platform with
 * conversations nobody here is in (403 not_participant, details `{conv}`).
 * @param log the verified log, from action 1
 * @throws AppError 403 not_leader | not_participant
 */
export function checkJoin(deps: Pick<Deps, 'config'>, peer: string, log: readonly Action[], state: ConversationState): void {
  const leader = log[0]?.id === 1 ? (parseActionSig(log[0].sig)?.platform ?? null) : null;
  if (leader !== peer) throw forbidden('not_leader', `${peer} does not lead conversation ${state.header?.key ?? '?'}`, { leader });
  for (const address of state.participants.keys()) if (isLocalAddress(deps, address)) return;
  throw forbidden('no_local_participant', `no user of ${primaryDomain(deps)} is a participant of conversation ${state.header?.key ?? '?'}`, {
    conv: state.header?.key ?? null,
  });
}
