/**
 * The replica's side of replication (issue 3 §5; docs/federation.md, "Replication"): storing
 * actions numbered by a conversation's leader — pushed by it, fetched from it (backfill, a
 * whole log when joining), or returned by it for this platform's own proposals.
 *
 * A batch is checked against this platform's verified state of the conversation
 * (`verifyReceivedLog(…, {from: state})`: hashes, chain, signatures, origin rule, the core
 * reducer) and stored in one transaction with the state it changes and its local effects
 * (src/conversations/append.ts storeActions) — all of it or nothing. Actions this platform
 * already has (same id and hash) are skipped.
 */
import { sql } from 'kysely';
import type { Action } from '../core/actions.ts';
import { applyAction, emptyState, referencedMessages } from '../core/reducer.ts';
import { type Deps, isLocalAddress, primaryDomain } from '../context.ts';
import { AppError, forbidden } from '../platform/errors.ts';
import { beforeCommit, isUniqueViolation, transaction, type Tx } from '../store/db.ts';
import { type BatchRead, bufferWrites, groupTransactionWith } from '../store/group-commit.ts';
import { localUserIds, storeActions } from '../conversations/append.ts';
import { recordEffects } from '../conversations/effects.ts';
import { type ConversationRow, insertConversation, loadedParticipantRows, loadState, lockConversation, persistState, preloadParticipants } from '../conversations/store.ts';
import { checkPeerAllowed } from './abuse.ts';
import { parseActionSig } from './action-signatures.ts';
import { type SignedAnswer, signedRequest } from './client.ts';
import { checkPeerBatch, fetchMissingBlobs, MAX_PUSH_ACTIONS } from './hooks.ts';
import { noteRecipients, samePlatform } from './outbox.ts';
import { discoverPlatform, preverifyReceived, verifyReceivedLog } from './runtime.ts';
import type { VerifiedPeer } from './http-signatures.ts';

/** Thrown when a batch continues a conversation this platform has never seen: fetch the log first. */
export class UnknownConversation extends Error {
  constructor(readonly key: string) {
    super(`conversation ${key} is not known here`);
    this.name = 'UnknownConversation';
  }
}

/** 409 `gap`: the batch starts after this platform's last action. */
export const gapError = (lastId: number) =>
  new AppError(409, 'gap', `the batch does not continue this platform's log, which ends at action ${lastId}`, { last_id: lastId });

/** 422 `invalid_log`: the batch failed verification (docs/federation.md, "Verifying a log"). */
export const invalidLog = (id: number | null, reason: string, message: string, code?: string) =>
  new AppError(422, 'invalid_log', message, { id, reason, ...(code ? { code } : {}) });

/** What {@link receiveActions} did. */
export interface Received {
  /** The last action id this platform now has. */
  last_id: number;
  /** Actions newly stored (duplicates excluded). */
  stored: Action[];
}

/**
 * Checks the shape of a received batch before anything else looks at it.
 * @throws AppError 400 invalid_request, 413 batch_too_large
 */
export function batchOf(body: unknown, max = MAX_PUSH_ACTIONS): Action[] {
  const actions = (body as { actions?: unknown } | null)?.actions;
  if (!Array.isArray(actions) || actions.length === 0) throw new AppError(400, 'invalid_request', 'the body must be {"actions": [<action>, …]} with at least one action');
  if (actions.length > max) throw new AppError(413, 'batch_too_large', `at most ${max} actions per request`, { max });
  for (const a of actions)
    if (!a || typeof a !== 'object' || Array.isArray(a) || !Number.isInteger(a.id) || a.id < 1 || typeof a.hash !== 'string')
      throw new AppError(400, 'invalid_request', 'every action must be an object with an integer id ≥ 1 and a hash');
  for (let i = 1; i < actions.length; i++)
    if (actions[i].id !== actions[i - 1].id + 1) throw invalidLog(actions[i].id, 'sequence_mismatch', `action ${actions[i].id} does not follow ${actions[i - 1].id} in the batch`);
  return actions as Action[];
}

/**
 * Stores a batch of consecutive actions of conversation `key` numbered by its leader
 * `leader` (the verified platform that sent them, or the leader this platform asked), in one
 * transaction:
 *
 * - unknown conversation: the batch must start at action 1 (else {@link UnknownConversation});
 *   the log must verify from nothing, action 1 must be signed by `leader` (the leader is the
 *   creator's platform, which signs conv:create), and one of this platform's addresses must
 *   take part — then the conversation is created here with `leader` recorded;
 * - known conversation: `leader` must be its recorded leader (403 `not_leader`); actions up to
 *   the local last id must be the ones stored (same hashes — skipped; a different hash is
 *   422 `invalid_log`, reason `fork`); the rest must start right after it (409 `gap`) and
 *   verify against the local state (422 `invalid_log`).
 *
 * Pending proposals of this platform that the batch contains are marked applied.
 * @throws AppError 403, 409, 422 (nothing stored); UnknownConversation
 */
export async function receiveActions(deps: Deps, leader: string, key: string, actions: Action[]): Promise<Received> {
  for (let attempt = 0; ; attempt++) {
    try {
      // A batch continuing a conversation shares a transaction with the other conversations
      // being received or appended at the same time (group commit: one COMMIT and one set of
      // writes for all of them — a multi-conversation push applies its entries this way). A
      // batch from action 1 may create the conversation: alone, as local creations are.
      if (actions[0].id === 1) return await transaction(deps.db, (tx) => receiveInTx(tx, deps, leader, key, actions));
      return await groupTransactionWith(deps.db, key, lockReceived, key, (tx, row) => receiveInTx(tx, deps, leader, key, actions, row));
    } catch (e) {
      // Two batches creating the same conversation at once: the second one sees it next time.
      if (attempt < 2 && isUniqueViolation(e)) continue;
      throw e;
    }
  }
}

/**
 * Locks the conversations of all the batches a shared transaction receives, in one
 * statement (in id order) before any of them runs: each gets its row, or null when it is
 * not known here. Their participants are read in one more statement, under those locks, and
 * handed to each batch's loadState (store.ts preloadParticipants) — instead of one read per
 * batch.
 */
const lockReceived: BatchRead<string, ConversationRow | null> = {
  name: 'lock received conversations',
  async read(tx, keys) {
    const read = await tx
      .selectFrom('conversations')
      .selectAll('conversations')
      .select(sql<boolean>`exists(select 1 from federation_proposals p where p.conv_id = conversations.id and p.state = 'pending')`.as('has_pending_proposals'))
      .where('key', 'in', keys)
      .orderBy('id')
      .forUpdate()
      .execute();
    const rows = read.map(({ has_pending_proposals, ...row }) => {
      pendingProposals.set(row, has_pending_proposals);
      return row;
    });
    if (rows.length > 1) {
      const parts = await tx.selectFrom('participants').selectAll().where('conv_id', 'in', rows.map((r) => r.id)).execute();
      const byConv = new Map<number, (typeof parts)[number][]>(rows.map((r) => [Number(r.id), []]));
      for (const p of parts) byConv.get(Number(p.conv_id))?.push(p);
      for (const r of rows) preloadParticipants(r, byConv.get(Number(r.id)) ?? []);
    }
    const byKey = new Map(rows.map((r) => [r.key, r]));
    return keys.map((k) => byKey.get(k) ?? null);
  },
};

/**
 * Whether a conversation locked by {@link lockReceived} had pending proposals of this
 * platform when it was locked, by its row. A proposal is committed here before it is sent to
 * the leader, so one whose actions a batch brings was visible to that lock; without any, the
 * batch has none to mark applied (one statement less per received push).
 */
const pendingProposals = new WeakMap<object, boolean>();

async function receiveInTx(tx: Tx, deps: Deps, leader: string, key: string, actions: Action[], locked?: ConversationRow | null): Promise<Received> {
  const row = locked !== undefined ? (locked ?? undefined) : await lockConversation(tx, key);
  if (!row) {
    if (actions[0].id !== 1) throw new UnknownConversation(key);
    return createReplica(tx, deps, leader, key, actions);
  }
  if (row.key !== key || !row.published) throw new AppError(404, 'not_found', 'conversation not found');
  if (!(await samePlatform(deps, row.leader, leader)))
    throw forbidden('not_leader', `${leader} does not lead conversation ${key}; ${row.leader} does`, { leader: row.leader });
  let batch = actions;
  const dups = batch.filter((a) => a.id <= row.last_id);
  if (dups.length > 0) {
    const stored = await sql<{ id: number; hash: string }>`
      select id, hash from actions where conv_id = ${row.id} and id = any(${dups.map((a) => a.id)}::int[])`.execute(tx);
    const hashes = new Map(stored.rows.map((r) => [r.id, r.hash]));
    for (const a of dups)
      if (hashes.get(a.id) !== a.hash) throw invalidLog(a.id, 'fork', `action ${a.id} differs from the action ${a.id} this platform has`);
    batch = batch.filter((a) => a.id > row.last_id);
  }
  if (batch.length === 0) return { last_id: row.last_id, stored: [] };
  if (batch[0].id !== row.last_id + 1) throw gapError(row.last_id);
  noteRecipients(tx, row.id, null); // a replica never emails about the conversation (issue 3 §8)
  const state = await loadState(tx, row, referencedMessages(batch));
  const check = await verifyReceivedLog(deps, batch, { from: state, leader: row.leader });
  if (!check.ok) throw invalidLog(check.id, check.reason, check.message, check.code);
  const added = batch.filter((a) => a.act === 'participant:add').map((a) => a.participant!);
  const newUserIds = await localUserIds(tx, deps, added);
  await storeActions(tx, deps, row, check.state, batch, true, { rows: loadedParticipantRows.get(state) ?? new Map(), newUserIds });
  if (pendingProposals.get(row) !== false) await markProposalsApplied(tx, row.id, batch);
  return { last_id: check.state.header!.last_id, stored: batch };
}

async function createReplica(tx: Tx, deps: Deps, leader: string, key: string, actions: Action[]): Promise<Received> {
  if (actions[0].conv !== key) throw invalidLog(1, 'wrong_conversation', `action 1 names conversation ${actions[0].conv}, not ${key}`);
  const check = await verifyReceivedLog(deps, actions);
  if (!check.ok) throw invalidLog(check.id, check.reason, check.message, check.code);
  const s = check.state;
  const h = s.header!;
  if (!h.published) throw invalidLog(null, 'not_published', 'drafts are never replicated: the log has no conv:publish');
  const signer = parseActionSig(actions[0].sig)!.platform;
  if (!(await samePlatform(deps, signer, leader)))
    throw forbidden('not_leader', `${leader} does not lead conversation ${key}: its conv:create was signed by ${signer}`, { leader: signer });
  if (signer === primaryDomain(deps)) throw forbidden('not_leader', `this platform created ${key}; it is not a replica of it`);
  if (![...s.participants.keys()].some((a) => isLocalAddress(deps, a)))
    throw forbidden('no_local_participant', `no address of this platform takes part in conversation ${key}`);
  const id = await insertConversation(tx, h, signer, null);
  noteRecipients(tx, id, null);
  const row = (await lockConversation(tx, key))!;
  const newUserIds = await localUserIds(tx, deps, [...s.participants.keys()]);
  await storeActions(tx, deps, row, s, actions, false, { rows: new Map(), newUserIds });
  await markProposalsApplied(tx, id, actions);
  return { last_id: h.last_id, stored: actions };
}

/** Per transaction: the (conversation, hash) pairs whose pending proposals are marked applied just before it commits. */
const appliedInTx = new WeakMap<object, { conv: number[]; hash: string[] }>();

/**
 * Marks applied the pending proposals whose first action is among `actions` (same hash) —
 * for all the conversations a (shared) transaction stores, in one statement just before it
 * commits.
 */
async function markProposalsApplied(tx: Tx, convId: number, actions: Action[]): Promise<void> {
  let pending = appliedInTx.get(tx);
  if (!pending) {
    const p = (pending = { conv: [] as number[], hash: [] as string[] });
    const deferred = beforeCommit(tx, async () => {
      appliedInTx.delete(tx);
      await sql`
        update federation_proposals p set state = 'applied', locked_until = null, updated_at = now()
          from unnest(${p.conv}::bigint[], ${p.hash}::text[]) as u(conv_id, hash)
         where p.conv_id = u.conv_id and p.state = 'pending' and p.actions->0->>'hash' = u.hash`.execute(tx);
    });
    if (!deferred) {
      await sql`
        update federation_proposals set state = 'applied', locked_until = null, updated_at = now()
         where conv_id = ${convId} and state = 'pending' and actions->0->>'hash' = any(${actions.map((a) => a.hash)}::text[])`.execute(tx);
      return;
    }
    appliedInTx.set(tx, pending);
  }
  for (const a of actions) {
    pending.conv.push(convId);
    pending.hash.push(a.hash);
  }
}

/**
 * The base URL of platform `name` (discovery), for a request this platform is about to send.
 * Every outbound replication request (push, proposal, backfill, log) gets its URL here, so
 * a platform the allow/deny lists exclude is never discovered nor called (issue 3 §9).
 * @throws AppError 403 platform_denied (abuse.ts checkPeerAllowed); 502 peer_unavailable when it has none or cannot be found now
 */
export async function platformUrl(deps: Deps, name: string): Promise<string> {
  checkPeerAllowed(deps, name);
  let ref;
  try {
    ref = await discoverPlatform(deps, name);
  } catch (e) {
    throw new AppError(502, 'peer_unavailable', (e as Error).message);
  }
  if (!ref) throw new AppError(502, 'peer_unavailable', `${name} has no Parley platform`);
  return ref.url;
}

/** Pages a backfill fetches ahead of the one it is storing (each verified as soon as it arrives). */
export const BACKFILL_PAGES_AHEAD = 2;
/** Actions asked for in a backfill's first page: a small page starts verifying and storing sooner. */
export const BACKFILL_FIRST_PAGE = 100;

/** A backfill page fetched and checked, its signatures being verified. */
interface FetchedPage {
  actions: Action[];
  last_id: number;
  /** Resolves when its signatures have been checked ahead of verifyLog (never rejects). */
  verified: Promise<void>;
}

/**
 * Fetches actions of conversation `key` from its leader, `GET …/actions?since=N&limit=M`
 * page by page, and stores each page ({@link receiveActions}) until this platform has
 * action `upTo` (or the leader has nothing more). Used to catch up (at start, after a gap)
 * and to backfill before a proposal's answer.
 *
 * **Pipelined** (issue 3, Done means 5: `catchup_10k_s`): page k + 1 is requested as soon as
 * page k has arrived (`since` = its last id), up to {@link BACKFILL_PAGES_AHEAD} pages ahead
 * of the page being stored; each page's signatures are verified (verify-pool.ts, the worker
 * thread) as soon as it arrives. So the leader's reading, the transfer, the Ed25519 checks
 * and this platform's writes all overlap, and the worker thread is not left idle while a
 * page travels. The first page asks for {@link BACKFILL_FIRST_PAGE} actions only, the
 * others for 500. Every page is still stored in order, each in its own transaction after
 * verifyLog has checked it from the stored state (chain, signatures, rules).
 * @param onAnswer called when the leader answers a page request (the catch-up at start waits for its first one before the API is built: src/app.ts)
 * @returns the last action id stored here
 * @throws AppError 502 peer_unavailable / the leader's refusal; verification errors
 */
export async function backfillFrom(deps: Deps, leader: string, key: string, since: number, upTo = Infinity, onAnswer?: () => void): Promise<number> {
  const base = await platformUrl(deps, leader);
  const fetchPage = async (after: number, limit: number): Promise<FetchedPage> => {
    const t0 = performance.now();
    let r: SignedAnswer;
    try {
      r = await signedRequest(deps, `${base}/federation/v1/conversations/${key}/actions?since=${after}&limit=${limit}`);
    } catch (e) {
      onAnswer?.();
      throw new AppError(502, 'peer_unavailable', `${leader}: ${(e as Error).message}`);
    }
    const text = r.text;
    onAnswer?.();
    if (r.status !== 200) throw new AppError(502, 'peer_refused', `${leader} answered ${r.status} to a backfill: ${text.slice(0, 300)}`);
    const body = JSON.parse(text) as { actions: Action[]; last_id: number };
    if (!Array.isArray(body.actions) || body.actions.length === 0) return { actions: [], last_id: body.last_id, verified: Promise.resolve() };
    const actions = batchOf(body);
    const conversation = (await knownConversations(deps, [key])).get(key) ?? null;
    await checkPeerBatch(deps, { platform: leader }, { kind: 'log', key, actions, bytes: 0, conversation });
    await fetchMissingBlobs(deps, { platform: leader }, actions);
    const t1 = performance.now();
    const verified = preverifyReceived(deps, actions).then(() =>
      deps.log.debug({ up_ms: Math.round(process.uptime() * 1000), conv: key, since: after, n: actions.length, fetch_ms: Math.round(t1 - t0), verify_ms: Math.round(performance.now() - t1) }, 'backfill page verified'),
    );
    return { actions, last_id: body.last_id, verified };
  };

  // Pages fetched and not yet stored, in order; the fetch under way; why fetching stopped.
  const ahead: FetchedPage[] = [];
  let fetching = false;
  let finished = since >= upTo;
  let failure: { error: unknown } | null = null;
  let cursor = since;
  let limit = Math.min(BACKFILL_FIRST_PAGE, MAX_PUSH_ACTIONS);
  let wake: (() => void) | null = null;
  const pump = () => {
    if (fetching || finished || failure || ahead.length >= BACKFILL_PAGES_AHEAD) return;
    fetching = true;
    fetchPage(cursor, limit)
      .then(
        (page) => {
          if (page.actions.length === 0) finished = true;
          else {
            ahead.push(page);
            cursor = page.actions.at(-1)!.id;
            if (cursor >= page.last_id || cursor >= upTo) finished = true;
          }
        },
        (error) => void (failure = { error }),
      )
      .finally(() => {
        fetching = false;
        limit = MAX_PUSH_ACTIONS;
        pump();
        wake?.();
      });
  };
  let last = since;
  try {
    pump();
    for (;;) {
      if (ahead.length === 0) {
        if (failure) throw (failure as { error: unknown }).error;
        if (finished && !fetching) break;
        await new Promise<void>((r) => (wake = r));
        continue;
      }
      const page = ahead.shift()!;
      pump();
      await page.verified;
      const t0 = performance.now();
      const got = await receiveActions(deps, leader, key, page.actions);
      deps.log.debug({ up_ms: Math.round(process.uptime() * 1000), conv: key, last_id: got.last_id, store_ms: Math.round(performance.now() - t0) }, 'backfill page stored');
      if (got.last_id <= last) break;
      last = got.last_id;
      if (last >= page.last_id) break;
    }
  } finally {
    finished = true; // nothing more is fetched; a page under way is dropped
  }
  return last;
}

/** The local last action id of conversation `key` (0 when unknown here). */
export async function localLastId(deps: Deps, key: string): Promise<number> {
  const r = await deps.db.kysely.selectFrom('conversations').select('last_id').where('key', '=', key).executeTakeFirst();
  return r?.last_id ?? 0;
}

/** Most actions a platform joining a conversation takes in (the whole log is held in memory to verify it). */
export const MAX_JOIN_ACTIONS = 200_000;

/**
 * Joins conversation `key`, never seen here, from its leader (issue 3 §5: a participant added
 * later, a missed publish): fetches the whole log (`GET …/log?since=N&limit=500`, page by
 * page, up to the leader's `last_id`), verifies all of it from nothing (hashes, chain,
 * signatures, origin rule, core rules), checks that action 1 is the leader's and that one of
 * this platform's addresses takes part, then stores it in one transaction — in chunks of
 * 500 actions, each with its effects (folders, stream events) — or nothing.
 * @returns the last action id stored
 * @throws AppError 502 peer_unavailable / peer_refused, 403 no_local_participant / not_leader, 422 invalid_log
 */
export async function joinFromLeader(deps: Deps, leader: string, key: string): Promise<number> {
  const base = await platformUrl(deps, leader);
  const log: Action[] = [];
  for (;;) {
    let r: SignedAnswer;
    try {
      r = await signedRequest(deps, `${base}/federation/v1/conversations/${key}/log?since=${log.length}&limit=${MAX_PUSH_ACTIONS}`);
    } catch (e) {
      throw new AppError(502, 'peer_unavailable', `${leader}: ${(e as Error).message}`);
    }
    const text = r.text;
    if (r.status !== 200) throw new AppError(502, 'peer_refused', `${leader} answered ${r.status} to a log request: ${text.slice(0, 300)}`);
    const body = JSON.parse(text) as { actions: unknown; last_id: number };
    if (!Array.isArray(body.actions) || body.actions.length === 0) break;
    const page = batchOf(body);
    await checkPeerBatch(deps, { platform: leader }, { kind: 'log', key, actions: page, bytes: 0 });
    if (page[0].id !== log.length + 1) throw invalidLog(page[0].id, 'sequence_mismatch', `the log page starts at ${page[0].id}, not ${log.length + 1}`);
    log.push(...page);
    if (log.length >= body.last_id) break;
    if (log.length > MAX_JOIN_ACTIONS) throw new AppError(413, 'log_too_large', `conversation ${key} has more than ${MAX_JOIN_ACTIONS} actions`);
  }
  if (log.length === 0) throw new AppError(502, 'peer_refused', `${leader} sent an empty log for ${key}`);
  await fetchMissingBlobs(deps, { platform: leader }, log);
  const check = await verifyReceivedLog(deps, log);
  if (!check.ok) throw invalidLog(check.id, check.reason, check.message, check.code);
  const h = check.state.header!;
  if (!h.published) throw invalidLog(null, 'not_published', 'drafts are never replicated: the log has no conv:publish');
  const signer = parseActionSig(log[0].sig)!.platform;
  if (!(await samePlatform(deps, signer, leader)) || signer === primaryDomain(deps))
    throw forbidden('not_leader', `${leader} does not lead conversation ${key}: its conv:create was signed by ${signer}`, { leader: signer });
  if (![...check.state.participants.keys()].some((a) => isLocalAddress(deps, a)))
    throw forbidden('no_local_participant', `no address of this platform takes part in conversation ${key}`);
  try {
    return await transaction(deps.db, async (tx) => {
      if (await lockConversation(tx, key)) throw new JoinedMeanwhile();
      const id = await insertConversation(tx, h, signer, null);
      const userIds = await localUserIds(tx, deps, [...check.state.participants.keys()]);
      // Replayed chunk by chunk (already verified): each chunk persisted with what it touched.
      const s = emptyState();
      for (let i = 0; i < log.length; i += MAX_PUSH_ACTIONS) {
        const chunk = log.slice(i, i + MAX_PUSH_ACTIONS);
        const wasPublished = s.header?.published ?? false;
        s.touched = { header: false, participants: new Set(), messages: new Set() };
        for (const a of chunk) applyAction(s, a);
        await persistState(tx, id, s, chunk, userIds);
        await recordEffects(tx, deps, id, s, chunk, wasPublished);
      }
      await markProposalsApplied(tx, id, log);
      return h.last_id;
    });
  } catch (e) {
    if (e instanceof JoinedMeanwhile || isUniqueViolation(e)) return localLastId(deps, key);
    throw e;
  }
}

class JoinedMeanwhile extends Error {}

/**
 * Stores actions received from the leader in the answer to a proposal (its actions, or the
 * ones the proposer missed, with `stale_head`), joining (whole log) or backfilling first when
 * they do not continue the local log. The files they name are fetched first (from the leader,
 * else their signer), as for a push: another follower's message with files must not arrive
 * here without its blobs.
 */
export async function receiveOrCatchUp(deps: Deps, leader: string, key: string, actions: Action[]): Promise<Received> {
  await fetchMissingBlobs(deps, { platform: leader }, actions);
  try {
    return await receiveActions(deps, leader, key, actions);
  } catch (e) {
    const unknown = e instanceof UnknownConversation;
    const gap = e instanceof AppError && e.code === 'gap';
    if (!unknown && !gap) throw e;
    if (unknown) await joinFromLeader(deps, leader, key);
    else await backfillFrom(deps, leader, key, (e as AppError).details!.last_id as number, actions[0].id - 1);
    return receiveActions(deps, leader, key, actions);
  }
}

/**
 * Receives one pushed batch of conversation `key` from `peer` (docs/federation.md, "Push"):
 * the abuse checks, the files its actions name, then {@link receiveActions} — or, for a
 * conversation never seen here whose batch starts after action 1, the whole log first
 * ("Joining"). The one code path of `POST …/conversations/{key}/actions`, and of an entry of
 * a multi-conversation push (`POST /federation/v1/push`) that is not applied with the others
 * ({@link receivePushEntries}).
 * @param bytes the request body's size (0 for an entry of a multi-conversation push, whose body was checked once)
 * @param conversation the conversation's local row (null: not here), when the caller read it already
 * @returns the last action id this platform has of the conversation
 * @throws AppError with the status the single-conversation push answers (nothing of the batch stored)
 */
export async function receivePushed(
  deps: Deps,
  peer: VerifiedPeer | { platform: string },
  key: string,
  actions: Action[],
  bytes: number,
  conversation?: { id: number; leader: string; published: boolean } | null,
): Promise<number> {
  await checkPeerBatch(deps, peer, { kind: 'push', key, actions, bytes, conversation });
  await fetchMissingBlobs(deps, peer, actions);
  // Signatures verified before the (shared) transaction: it then holds its locks shorter.
  await preverifyReceived(deps, actions);
  return receiveChecked(deps, peer, key, actions);
}

/** {@link receiveActions} of a pushed batch already checked, joining first when the conversation is not known here. */
async function receiveChecked(deps: Deps, peer: VerifiedPeer | { platform: string }, key: string, actions: Action[]): Promise<number> {
  try {
    return (await receiveActions(deps, peer.platform, key, actions)).last_id;
  } catch (e) {
    if (!(e instanceof UnknownConversation)) throw e;
    // Never seen here (a participant added later, a missed publish): fetch the whole log and join.
    await joinFromLeader(deps, peer.platform, key);
    return (await receiveActions(deps, peer.platform, key, actions)).last_id;
  }
}

/** A published conversation known here: what the checks before its transaction need. */
interface KnownConversation {
  id: number;
  key: string;
  leader: string;
  published: boolean;
}

/** Published conversations read before, by database handle and key (at most {@link KNOWN_MAX} per handle). */
const knownByDb = new WeakMap<object, Map<string, KnownConversation>>();
const KNOWN_MAX = 10_000;

/**
 * The local rows (id, leader, published) of the conversations `keys` that are here — for the
 * abuse checks and the grouping of a push's entries before their transaction. A published
 * conversation's row is remembered: none of these columns changes once it is published (its
 * leader is the platform that signed action 1, which its key derives from), so a live push of
 * conversations seen before needs no statement here; the transaction that stores it locks
 * and reads the row anyway, and checks the leader again.
 */
async function knownConversations(deps: Deps, keys: string[]): Promise<Map<string, KnownConversation>> {
  let cache = knownByDb.get(deps.db);
  if (!cache) knownByDb.set(deps.db, (cache = new Map()));
  const out = new Map<string, KnownConversation>();
  const missing: string[] = [];
  for (const k of keys) {
    const r = cache.get(k);
    if (r) out.set(k, r);
    else missing.push(k);
  }
  if (missing.length === 0) return out;
  const rows = await deps.db.kysely.selectFrom('conversations').select(['id', 'key', 'leader', 'published']).where('key', 'in', missing).execute();
  for (const r of rows) {
    out.set(r.key, r);
    if (!r.published) continue;
    if (cache.size >= KNOWN_MAX) cache.clear();
    cache.set(r.key, r);
  }
  return out;
}

/** Most conversations in one multi-conversation push (`POST /federation/v1/push`). */
export const MAX_PUSH_CONVERSATIONS = 100;

/** One entry of a multi-conversation push: a conversation key and its batch, not yet checked. */
export interface PushEntry {
  key: string;
  /** As received: {@link batchOf} checks it when the entry is processed. */
  actions: unknown;
}

/** The answer for one entry of a multi-conversation push, in request order. */
export type PushResult =
  | { key: string; status: 200; last_id: number }
  | { key: string; status: number; error: { code: string; message: string; details?: Record<string, unknown> } };

/**
 * Checks the envelope of a multi-conversation push, `{"conversations": [{"key", "actions"}, …]}`
 * (docs/federation.md, "Push"): 1 to {@link MAX_PUSH_CONVERSATIONS} entries, each with a
 * conversation key (32 lowercase hex digits) given once and an `actions` array; at most
 * {@link MAX_PUSH_ACTIONS} actions in all. The batches themselves are checked per entry
 * (their faults are answered per entry). Members other than these are ignored.
 * @throws AppError 400 invalid_request (the envelope), 413 batch_too_large (too many conversations or actions)
 */
export function pushEntriesOf(body: unknown): PushEntry[] {
  const list = (body as { conversations?: unknown } | null)?.conversations;
  if (!body || typeof body !== 'object' || !Array.isArray(list) || list.length === 0)
    throw new AppError(400, 'invalid_request', 'the body must be {"conversations": [{"key": <conversation key>, "actions": [<action>, …]}, …]} with at least one entry');
  if (list.length > MAX_PUSH_CONVERSATIONS)
    throw new AppError(413, 'batch_too_large', `at most ${MAX_PUSH_CONVERSATIONS} conversations per push`, { max_conversations: MAX_PUSH_CONVERSATIONS });
  const keys = new Set<string>();
  let total = 0;
  for (const e of list) {
    if (!e || typeof e !== 'object' || Array.isArray(e) || typeof e.key !== 'string' || !/^[0-9a-f]{32}$/.test(e.key) || !Array.isArray(e.actions))
      throw new AppError(400, 'invalid_request', 'every entry of conversations must be {"key": <32 lowercase hex digits>, "actions": [<action>, …]}');
    if (keys.has(e.key)) throw new AppError(400, 'invalid_request', `conversation ${e.key} is given twice; send its actions as one entry`, { key: e.key });
    keys.add(e.key);
    total += e.actions.length;
  }
  if (total > MAX_PUSH_ACTIONS) throw new AppError(413, 'batch_too_large', `at most ${MAX_PUSH_ACTIONS} actions per request`, { max: MAX_PUSH_ACTIONS, actions: total });
  return list as PushEntry[];
}

/** The answer for an entry from the error it failed with (500 `internal` for anything but an AppError, logged). */
function failedEntry(deps: Deps, peer: { platform: string }, key: string, err: unknown): PushResult {
  if (err instanceof AppError) return { key, status: err.status, error: err.toJSON().error };
  deps.log.error({ err, conv: key, peer: peer.platform }, 'pushed entry failed');
  return { key, status: 500, error: { code: 'internal', message: 'internal error' } };
}

/**
 * Applies the entries of a multi-conversation push from `peer`, each exactly as a
 * single-conversation push of it would be ({@link receivePushed}), and answers each: `200`
 * with the conversation's last id here, or the error a single push would have answered. One
 * entry's failure stores nothing of that entry and nothing else changes for the others.
 * Resolves once every stored entry is committed.
 *
 * How (issue 3, Done means 5: replication latency): the signatures of all entries are
 * checked in one job (the worker thread for 64 or more with libsodium, else 8), the entries'
 * conversations read in one statement for the abuse checks — none when this process has seen
 * them all before ({@link knownConversations}) — and the entries that continue conversations known here
 * are stored in **one transaction** ({@link receiveTogether}): one lock statement, their rows
 * written in one statement before one COMMIT. The others (a new conversation, a join) go
 * alone, as a single push would.
 */
export async function receivePushEntries(deps: Deps, peer: VerifiedPeer | { platform: string }, entries: PushEntry[]): Promise<PushResult[]> {
  // The signatures of all entries at once (one job for the worker thread rather than many
  // small ones on this thread), while their conversations are read.
  const [known] = await Promise.all([
    knownConversations(deps, entries.map((e) => e.key)),
    preverifyReceived(deps, entries.flatMap((e) => (Array.isArray(e.actions) ? (e.actions as Action[]) : []))),
  ]);
  const results: PushResult[] = new Array(entries.length);
  const together: { i: number; key: string; actions: Action[] }[] = [];
  const alone: { i: number; key: string; actions: Action[] }[] = [];
  await Promise.all(
    entries.map(async (e, i) => {
      try {
        const actions = batchOf({ actions: e.actions });
        const conversation = known.get(e.key) ?? null;
        await checkPeerBatch(deps, peer, { kind: 'push', key: e.key, actions, bytes: 0, conversation });
        await fetchMissingBlobs(deps, peer, actions);
        (conversation && actions[0].id > 1 ? together : alone).push({ i, key: e.key, actions });
      } catch (err) {
        results[i] = failedEntry(deps, peer, e.key, err);
      }
    }),
  );
  const single = async (x: { i: number; key: string; actions: Action[] }) => {
    try {
      results[x.i] = { key: x.key, status: 200, last_id: await receiveChecked(deps, peer, x.key, x.actions) };
    } catch (err) {
      results[x.i] = failedEntry(deps, peer, x.key, err);
    }
  };
  together.sort((a, b) => a.i - b.i);
  await Promise.all([receiveTogether(deps, peer, together, results, single), ...alone.map(single)]);
  return results;
}

/**
 * Stores the checked entries `todo` (continuing conversations known here) in one
 * transaction: their conversations locked in one statement (in id order), each entry taken
 * in turn exactly as {@link receiveActions} takes a batch, every row buffered and written in
 * one statement before the single COMMIT. An entry that fails rolls the transaction back:
 * it gets its error (or goes alone through `single`, when it must join first) and the others
 * are stored again without it. A failure no entry can be blamed for (the writes, the commit)
 * sends every entry alone. A lone entry goes through `single`.
 */
async function receiveTogether(
  deps: Deps,
  peer: { platform: string },
  todo: { i: number; key: string; actions: Action[] }[],
  results: PushResult[],
  single: (x: { i: number; key: string; actions: Action[] }) => Promise<void>,
): Promise<void> {
  while (todo.length > 1) {
    let failed: { entry: (typeof todo)[number]; error: unknown } | null = null;
    try {
      const stored = await transaction(deps.db, async (tx) => {
        bufferWrites(tx);
        const locked = await lockReceived.read(tx, todo.map((x) => x.key));
        const out: Received[] = [];
        for (const [j, x] of todo.entries()) {
          try {
            out.push(await receiveInTx(tx, deps, peer.platform, x.key, x.actions, locked[j]));
          } catch (error) {
            failed = { entry: x, error };
            throw error;
          }
        }
        return out;
      });
      todo.forEach((x, j) => (results[x.i] = { key: x.key, status: 200, last_id: stored[j].last_id }));
      return;
    } catch {
      const f = failed as { entry: (typeof todo)[number]; error: unknown } | null;
      if (!f) {
        await Promise.all(todo.map(single));
        return;
      }
      todo = todo.filter((x) => x !== f.entry);
      if (f.error instanceof UnknownConversation) await single(f.entry);
      else results[f.entry.i] = failedEntry(deps, peer, f.entry.key, f.error);
    }
  }
  if (todo.length === 1) await single(todo[0]);
}

export type { ConversationRow };
