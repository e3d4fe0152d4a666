/**
 * Leader sequencing (issue 3 §4; docs/federation.md, "Proposals").
 *
 * **Follower side.** A local user's actions on a conversation led by another platform are
 * built on the head this platform knows — after its own pending proposals, so several
 * pending proposals chain — numbered, hashed, checked by the core reducer, signed, and
 * stored in `federation_proposals` (the proposals outbox) in the user's transaction
 * ({@link proposeInTx}). They are then sent ({@link attemptProposal}) right away by the API
 * request, or by the federation worker (retries with backoff, email replies):
 *
 * - 200: the leader appended them unchanged; its answer is stored here like a push;
 * - 409 `stale_head`: the head moved; the missing actions are stored, the user's inputs are
 *   rebuilt on the new head (a `follows` no longer the head is the user's own 409, the
 *   proposal fails) and proposed again;
 * - network error, timeout, 5xx, 429, transient 401: the proposal stays pending, retried
 *   after 1 s, 2 s, 4 s … capped at 5 min; so does a proposal to a leader the allow/deny
 *   lists exclude, which is never contacted (`last_error` `platform_denied: …`);
 * - any other refusal: the proposal fails with the leader's reason.
 *
 * **Leader side.** {@link acceptProposal} checks a proposal and appends it unchanged.
 */
import { sql } from 'kysely';
import { type Action, type ActionInput, sealAction } from '../core/actions.ts';
import { applyAction, type ConversationState, referencedMessages } from '../core/reducer.ts';
import { type Deps, primaryDomain } from '../context.ts';
import { isoTime } from '../platform/clock.ts';
import { AppError, conflict, notFound } from '../platform/errors.ts';
import { notifyAfterCommit, transaction, type Tx } from '../store/db.ts';
import { resolveLocalUsers, storeActions } from '../conversations/append.ts';
import { type ConversationRow, loadedParticipantRows, loadState, lockConversation, readActions } from '../conversations/store.ts';
import { cloneState, parseActionSig, signActions } from './action-signatures.ts';
import { CLOCK_SKEW_S, type VerifiedPeer } from './http-signatures.ts';
import { type SignedAnswer, signedRequest } from './client.ts';
import { lockIngests } from '../mail/inbound/ingest-lock.ts';
import { MAX_PUSH_ACTIONS } from './hooks.ts';
import { FEDERATION_CHANNEL, samePlatform } from './outbox.ts';
import { invalidLog, platformUrl, receiveOrCatchUp } from './replication.ts';
import { verifyReceivedLog } from './runtime.ts';

/** How long the API request that created a proposal owns it before the worker may send it, in ms. */
export const INLINE_LEASE_MS = 30_000;
/** Longest wait for the leader's answer to a proposal, in ms. */
export const PROPOSAL_TIMEOUT_MS = 5_000;
/** Rebuilds on a moved head before the attempt counts as failed for now (and is retried later). */
const MAX_REBUILDS = 5;

/** Backoff of federation retries: 1 s after the first failure, doubling, at most 5 min. */
export function federationBackoffMs(failures: number): number {
  return Math.min(1000 * 2 ** Math.max(0, failures - 1), 300_000);
}

/** A proposal row. */
interface ProposalRow {
  id: number;
  conv_id: number;
  leader: string;
  actor: string;
  inputs: ActionInput[];
  actions: Action[];
  state: 'pending' | 'applied' | 'failed';
  attempts: number;
}

/**
 * Builds `actor`'s actions on the head this platform knows, after the pending proposals of
 * the conversation (those with an id below `before`, when given), which are applied in order
 * as long as they still fit: the ids, `prev` and `ts` the leader will keep if its head has not
 * moved. Every action passes the core reducer, then is signed.
 * @throws AppError from the reducer (the user's error)
 */
async function buildOnHead(tx: Tx, deps: Deps, row: ConversationRow, actor: string, inputs: ActionInput[], before: number | null): Promise<{ actions: Action[]; state: ConversationState }> {
  const pending = await sql<{ actions: Action[] }>`
    select actions from federation_proposals
     where conv_id = ${row.id} and state = 'pending' and (${before}::bigint is null or id < ${before}::bigint)
     order by id`.execute(tx);
  const earlier = pending.rows.map((r) => r.actions);
  let state = await loadState(tx, row, referencedMessages([...inputs, ...earlier.flat()]));
  for (const p of earlier) {
    const next = cloneState(state);
    try {
      for (const a of p) applyAction(next, a);
      state = next;
    } catch {
      // A pending proposal built on an older head: it will be rebuilt when its turn comes.
    }
  }
  const h = state.header!;
  let ts = isoTime(deps.clock.now());
  if (h.last_ts && ts < h.last_ts) ts = h.last_ts;
  const out: Action[] = [];
  for (const input of inputs) {
    const a = sealAction({ ...input, conv: h.key, id: h.last_id + 1, actor, ts, prev: h.last_hash });
    applyAction(state, a);
    out.push(a);
  }
  await signActions(deps, out, tx);
  return { actions: out, state };
}

/**
 * Builds `actor`'s actions on a conversation led elsewhere and stores them as a pending
 * proposal, in the caller's transaction (row locked, actor authorised, inputs cleaned).
 * With `inline` the proposal is left to the caller for {@link INLINE_LEASE_MS} (the API sends
 * it at once, settleProposal); otherwise the federation worker is woken to send it.
 * @returns the proposed actions, the state after them, and the proposal id
 */
export async function proposeInTx(
  tx: Tx,
  deps: Deps,
  row: ConversationRow,
  actor: string,
  inputs: ActionInput[],
  inline: boolean,
): Promise<{ actions: Action[]; state: ConversationState; proposal: number }> {
  const { actions, state } = await buildOnHead(tx, deps, row, actor, inputs, null);
  const r = await sql<{ id: number }>`
    insert into federation_proposals (conv_id, leader, actor, inputs, actions, next_attempt_at)
    values (${row.id}, ${row.leader}, ${actor}, ${JSON.stringify(inputs)}::jsonb, ${JSON.stringify(actions)}::jsonb,
            now() + ${`${inline ? INLINE_LEASE_MS : 0} milliseconds`}::interval)
    returning id`.execute(tx);
  if (!inline) await notifyAfterCommit(tx, FEDERATION_CHANNEL, '');
  return { actions, state, proposal: r.rows[0].id };
}

/** The outcome of an attempt to have a proposal numbered by the leader. */
export type ProposalOutcome =
  | { state: 'applied'; actions: Action[] }
  | { state: 'pending'; actions: Action[]; error: string }
  | { state: 'failed'; error: AppError };

/**
 * Claims proposal `id` for an attempt (a lease of {@link INLINE_LEASE_MS}), unless another
 * process holds it or an earlier proposal of the same conversation is still pending (they
 * are sent in order). `force` ignores `next_attempt_at` (the API's first attempt).
 * @returns whether this process now holds it
 */
export async function claimProposal(deps: Deps, id: number, force: boolean): Promise<boolean> {
  const r = await sql`
    update federation_proposals p set locked_until = now() + ${`${INLINE_LEASE_MS} milliseconds`}::interval, updated_at = now()
     where p.id = ${id} and p.state = 'pending' and (p.locked_until is null or p.locked_until < now())
       and (${force} or p.next_attempt_at <= now())
       and not exists (select 1 from federation_proposals q where q.conv_id = p.conv_id and q.state = 'pending' and q.id < p.id)`.execute(deps.db.kysely);
  return Number(r.numAffectedRows ?? 0) > 0;
}

/**
 * Sends a claimed pending proposal to the leader and handles the answer (see the module
 * comment), rebuilding it on a moved head up to {@link MAX_REBUILDS} times. Releases the claim.
 */
export async function attemptProposal(deps: Deps, id: number): Promise<ProposalOutcome> {
  try {
    return await attemptClaimed(deps, id);
  } catch (e) {
    // Unexpected (a local database error): keep it pending and retry later.
    const p = await loadProposal(deps, id);
    await release(deps, id, (p?.attempts ?? 0) + 1, (e as Error).message);
    return { state: 'pending', actions: p?.actions ?? [], error: (e as Error).message };
  }
}

async function loadProposal(deps: Deps, id: number): Promise<(ProposalRow & { key: string }) | undefined> {
  const r = await sql<ProposalRow & { key: string }>`
    select p.id, p.conv_id, p.leader, p.actor, p.inputs, p.actions, p.state, p.attempts, c.key
      from federation_proposals p join conversations c on c.id = p.conv_id where p.id = ${id}`.execute(deps.db.kysely);
  return r.rows[0];
}

async function release(deps: Deps, id: number, attempts: number, error: string): Promise<void> {
  await sql`
    update federation_proposals set locked_until = null, attempts = ${attempts}, last_error = ${error.slice(0, 2000)},
           next_attempt_at = now() + ${`${federationBackoffMs(attempts)} milliseconds`}::interval, updated_at = now()
     where id = ${id} and state = 'pending'`.execute(deps.db.kysely);
}

async function fail(deps: Deps, id: number, error: AppError): Promise<ProposalOutcome> {
  await sql`
    update federation_proposals set state = 'failed', locked_until = null, last_error = ${error.message.slice(0, 2000)},
           error_code = ${error.code}, updated_at = now()
     where id = ${id} and state = 'pending'`.execute(deps.db.kysely);
  return { state: 'failed', error };
}

async function appliedActions(deps: Deps, p: ProposalRow): Promise<Action[]> {
  const first = p.actions[0];
  return readActions(deps.db.kysely, p.conv_id, first.id, first.id + p.actions.length - 1, p.actions.length);
}

async function attemptClaimed(deps: Deps, id: number): Promise<ProposalOutcome> {
  for (let rebuilds = 0; ; rebuilds++) {
    const p = await loadProposal(deps, id);
    if (!p) return { state: 'failed', error: notFound('proposal') };
    if (p.state === 'applied') return { state: 'applied', actions: await appliedActions(deps, p) };
    if (p.state === 'failed') return { state: 'failed', error: conflict('proposal_failed', 'the proposal was refused') };
    let r: SignedAnswer;
    let text: string;
    try {
      const url = await platformUrl(deps, p.leader);
      r = await signedRequest(deps, `${url}/federation/v1/conversations/${p.key}/proposals`, { json: { actions: p.actions }, timeoutMs: PROPOSAL_TIMEOUT_MS });
      text = r.text;
    } catch (e) {
      // A leader the allow/deny lists exclude is not contacted (platformUrl): pending, like an unreachable one.
      const why = e instanceof AppError && e.code === 'platform_denied' ? `platform_denied: ${e.message}; the proposal waits` : `${p.leader} unreachable: ${(e as Error).message}`;
      await release(deps, id, p.attempts + 1, why);
      return { state: 'pending', actions: p.actions, error: why };
    }
    let body: any = null;
    try {
      body = JSON.parse(text);
    } catch {
      /* not JSON: handled by status */
    }
    if (r.status === 200 && Array.isArray(body?.actions)) {
      await receiveOrCatchUp(deps, p.leader, p.key, body.actions);
      await sql`update federation_proposals set state = 'applied', locked_until = null, updated_at = now() where id = ${id}`.execute(deps.db.kysely);
      return { state: 'applied', actions: body.actions };
    }
    const code: string | undefined = body?.error?.code;
    if (r.status === 409 && code === 'stale_head' && rebuilds < MAX_REBUILDS) {
      const missing: Action[] = Array.isArray(body.error.details?.actions) ? body.error.details.actions : [];
      if (missing.length > 0) await receiveOrCatchUp(deps, p.leader, p.key, missing);
      const rebuilt = await rebuild(deps, p);
      if (rebuilt instanceof AppError) return fail(deps, id, rebuilt);
      continue;
    }
    const transient = r.status >= 500 || r.status === 429 || code === 'clock_skew' || code === 'unknown_key' || code === 'replayed' || code === 'digest_mismatch' || code === 'stale_head';
    if (transient) {
      const why = `${p.leader} answered ${r.status} ${code ?? ''}: ${body?.error?.message ?? text.slice(0, 200)}`;
      await release(deps, id, p.attempts + 1, why);
      return { state: 'pending', actions: p.actions, error: why };
    }
    // Refused: the leader's rule verdict is the user's error.
    const details = body?.error?.details ?? {};
    const status = r.status === 422 && details.reason === 'rule_violation' ? 409 : r.status >= 400 && r.status < 500 ? r.status : 502;
    return fail(deps, id, new AppError(status, details.code ?? code ?? 'proposal_refused', body?.error?.message ?? `the leader ${p.leader} refused the actions (${r.status})`, { leader: p.leader, ...details }));
  }
}

/** Rebuilds a proposal's inputs on the head now known; the reducer's refusal is returned. */
async function rebuild(deps: Deps, p: ProposalRow & { key: string }): Promise<AppError | null> {
  try {
    await transaction(deps.db, async (tx) => {
      const row = await lockConversation(tx, p.key);
      if (!row) throw notFound('conversation');
      const { actions } = await buildOnHead(tx, deps, row, p.actor, p.inputs, p.id);
      await sql`update federation_proposals set actions = ${JSON.stringify(actions)}::jsonb, updated_at = now() where id = ${p.id} and state = 'pending'`.execute(tx);
    });
    return null;
  } catch (e) {
    if (e instanceof AppError) return e;
    throw e;
  }
}

/**
 * The first attempt of a proposal made by an API request, right after it committed: sent at
 * once unless an earlier proposal of the conversation is still pending (then it waits its turn).
 */
export async function settleProposal(deps: Deps, id: number): Promise<ProposalOutcome> {
  if (!(await claimProposal(deps, id, true))) {
    const p = await loadProposal(deps, id);
    if (p?.state === 'applied') return { state: 'applied', actions: await appliedActions(deps, p) };
    await sql`update federation_proposals set next_attempt_at = now() where id = ${id} and state = 'pending'`.execute(deps.db.kysely);
    await sql`select pg_notify(${FEDERATION_CHANNEL}, '')`.execute(deps.db.kysely);
    return { state: 'pending', actions: p?.actions ?? [], error: 'an earlier proposal of this conversation is still pending' };
  }
  return attemptProposal(deps, id);
}

/**
 * The leader's handling of `POST /federation/v1/conversations/{key}/proposals`: in one
 * transaction, checks that this platform leads the published conversation, drops actions it
 * already has (same id and hash — a retried proposal: answered as applied), requires the rest
 * to build on its head (else 409 `stale_head` with the actions the proposer is missing), each
 * signed by the proposing platform, timestamped within ±300 s of this clock, and passing
 * `verifyReceivedLog` from the current state (origin rule, participants, core rules); then
 * appends them unchanged (storeActions: effects, links; the pusher sends them to every
 * replica, the proposer included).
 * @returns the actions as numbered (the proposer's, unchanged)
 * @throws AppError 404, 409 not_leader / stale_head, 422 invalid_log (nothing stored)
 */
export async function acceptProposal(deps: Deps, peer: VerifiedPeer, key: string, proposed: Action[]): Promise<{ actions: Action[]; last_id: number }> {
  return transaction(deps.db, async (tx) => {
    // The emails the proposal brings are taken one at a time with this platform's own SMTP
    // ingest of the same Message-ID (its lock, taken before the conversation's, as the ingest
    // does): whichever commits first records the Message-ID (email_messages) and the other
    // sees it — the ingest as a duplicate, the proposal as 409 duplicate_email. Without it, a
    // reply-all reaching the leader by SMTP while a follower's proposal of it is being applied
    // could be added twice.
    await lockIngests(tx, emailMessageIds(proposed).map((e) => e.message_id));
    const row = await lockConversation(tx, key);
    if (!row || row.key !== key || !row.published) throw notFound('conversation');
    if (row.leader !== primaryDomain(deps)) throw conflict('not_leader', `this platform does not lead conversation ${key}; ${row.leader} does`, { leader: row.leader });
    for (const a of proposed) {
      const signer = parseActionSig(a.sig)?.platform;
      if (!signer || !(await samePlatform(deps, signer, peer.platform)))
        throw invalidLog(a.id, 'wrong_origin', `action ${a.id} is not signed by the proposing platform ${peer.platform}`);
    }
    const known = proposed.filter((a) => a.id <= row.last_id);
    if (known.length > 0) {
      const stored = await readActions(tx, row.id, known[0].id, known.at(-1)!.id, known.length);
      const same = stored.length === known.length && stored.every((s, i) => s.hash === known[i].hash);
      if (same && known.length === proposed.length) return { actions: stored, last_id: row.last_id };
    }
    // An email the conversation already has (its Message-ID recorded: the leader received it
    // too, or another follower proposed it first) — a reply-all reaches several platforms.
    const emails = emailMessageIds(proposed);
    if (emails.length > 0) {
      const had = await sql<{ message_id: string; action_id: number | null }>`
        select message_id, action_id from email_messages
         where conv_id = ${row.id} and message_id = any(${emails.map((e) => e.message_id)}::text[]) limit 1`.execute(tx);
      if (had.rows.length > 0)
        throw conflict('duplicate_email', `conversation ${key} already has the email ${had.rows[0].message_id}`, {
          message_id: had.rows[0].message_id,
          action_id: had.rows[0].action_id,
        });
    }
    const first = proposed[0];
    if (first.id !== row.last_id + 1 || first.prev !== row.last_hash) {
      const since = Math.max(0, Math.min(first.id - 1, row.last_id));
      const missing = await readActions(tx, row.id, since + 1, row.last_id, MAX_PUSH_ACTIONS);
      throw conflict('stale_head', `the head of conversation ${key} is action ${row.last_id}, not ${first.id - 1}`, {
        last_id: row.last_id,
        last_hash: row.last_hash,
        actions: missing,
      });
    }
    const now = deps.clock.now();
    for (const a of proposed) {
      const t = Date.parse(a.ts);
      if (!Number.isFinite(t) || Math.abs(t - now) > CLOCK_SKEW_S * 1000)
        throw invalidLog(a.id, 'clock_skew', `action ${a.id}: ts ${a.ts} is more than ${CLOCK_SKEW_S} s from this platform's clock`);
    }
    const state = await loadState(tx, row, referencedMessages(proposed));
    const check = await verifyReceivedLog(deps, proposed, { from: state, leader: primaryDomain(deps) });
    if (!check.ok) throw invalidLog(check.id, check.reason, check.message, check.code);
    // Adding one of this platform's addresses needs a user behind it, as for a local append (400 unknown_local_address).
    const newUserIds = await resolveLocalUsers(tx, deps, proposed.filter((a) => a.act === 'participant:add').map((a) => a.participant!));
    await storeActions(tx, deps, row, check.state, proposed, true, { rows: loadedParticipantRows.get(state) ?? new Map(), newUserIds });
    // Recorded as received here, so the same email reaching this platform by SMTP is a duplicate.
    if (emails.length > 0)
      await sql`
        insert into email_messages (conv_id, message_id, direction, action_id)
        select ${row.id}, m, 'in', a from unnest(${emails.map((e) => e.message_id)}::text[], ${emails.map((e) => e.action_id)}::int[]) as t(m, a)
        on conflict (conv_id, message_id) do nothing`.execute(tx);
    return { actions: proposed, last_id: check.state.header!.last_id };
  });
}

/** The Message-IDs of the emails that `actions` add as messages (a follower's bridged email replies), with their actions' ids. */
function emailMessageIds(actions: Action[]): { message_id: string; action_id: number }[] {
  return actions.flatMap((a) =>
    a.act === 'message:add' && a.source?.kind === 'email' && typeof a.source.message_id === 'string' ? [{ message_id: a.source.message_id, action_id: a.id }] : [],
  );
}

/** Pending and failed proposals of `actor` in a conversation, for the conversation's state. */
export async function proposalsOf(deps: Deps, convId: number, actor: string): Promise<{ proposal: number; state: string; actions: Action[]; last_error: string | null; error_code: string | null; created_at: string }[]> {
  const r = await sql<{ id: number; state: string; actions: Action[]; last_error: string | null; error_code: string | null; created_at: Date }>`
    select id, state, actions, last_error, error_code, created_at from federation_proposals
     where conv_id = ${convId} and actor = ${actor} and state in ('pending', 'failed') order by id`.execute(deps.db.kysely);
  return r.rows.map((x) => ({ proposal: x.id, state: x.state, actions: x.actions, last_error: x.last_error, error_code: x.error_code, created_at: new Date(x.created_at).toISOString() }));
}
