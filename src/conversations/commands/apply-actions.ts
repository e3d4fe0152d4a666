import { sql } from 'kysely';
import type { Action, ActionInput } from '../../core/actions.ts';
import { LIMITS } from '../../core/actions.ts';
import { type AppError, badRequest, forbidden, notFound } from '../../platform/errors.ts';
import type { Deps } from '../../context.ts';
import { dollarQuoted, type Tx } from '../../store/db.ts';
import { type BatchRead, groupTransactionWith } from '../../store/group-commit.ts';
import { appendActions } from '../append.ts';
import { type ConversationRow, preloadParticipants } from '../store.ts';
import type { Selectable } from 'kysely';
import type { ParticipantsTable } from '../../store/schema.ts';
import { noteActiveKeyId } from '../../federation/keys.ts';
import { settleProposal } from '../../federation/proposals.ts';

/** The acting user as the commands see them. */
export interface Actor {
  id: number;
  address: string;
}

/**
 * What {@link lockConversationsForActors} reads per conversation, as one JSON value: the
 * conversation's columns (`c`, timestamps as JSON strings), every participant (`p`) and the
 * id of the active signing key (`k`).
 */
type LockedRow = { c: ConversationRow; p: Selectable<ParticipantsTable>[]; k: string | null };

/** The timestamp columns of a conversation (JSON strings in {@link LockedRow}, Dates in a ConversationRow). */
const TIMESTAMP_COLUMNS = ['published_at', 'created_at', 'subject_lock_at', 'expiry', 'last_ts'] as const;

/** What locking one conversation for one actor gave: the row, or the actor's error. */
type LockOutcome = { row: ConversationRow } | { error: AppError };

/**
 * Locks the conversations named by `reqs` (published or draft keys) for this transaction,
 * in id order (so concurrent batches never deadlock), and authorises each actor, in one
 * statement: per request, the row or the actor's error — 404 when they cannot see it at all
 * (never a participant, or someone else's draft), 403 `removed` after their removal. The
 * same statement reads every participant (handed to loadState: store.ts
 * preloadParticipants) and the id of the platform's active signing key (federation/keys.ts
 * noteActiveKeyId), so an append needs no other read before it writes.
 *
 * Each conversation comes as ONE json column rather than ~20: node-postgres re-reads the
 * row description of every execution and builds each row as a copy of a dictionary-mode
 * object, per column — more of this statement's CPU in Node than its one JSON.parse. Every
 * column of the conversation but `search_header` is read: that tsvector (of the subject and
 * the participants) is of no use to a write, which recomputes it in SQL when it changes.
 *
 * The statement is the PL/pgSQL function `parley_lock_conversations` (migration
 * 035_lock_function.sql), which keeps one generic plan per connection (its keys are read
 * through a sub-select so that every call is estimated alike: planned afresh, each call cost
 * ≈ 0.45 ms of planning, more than running it), and which a group transaction sends in the
 * same round trip as its BEGIN ({@link lockRead}).
 */
export async function lockConversationsForActors(tx: Tx, reqs: { key: string; user: Actor }[]): Promise<LockOutcome[]> {
  const keys = keysOf(reqs);
  const r = await sql<{ r: LockedRow }>`select r from parley_lock_conversations(${keys}::text[]) as r`.execute(tx);
  return lockOutcomes(tx, reqs, r.rows.map((x) => x.r));
}

/** The distinct keys of `reqs`. */
function keysOf(reqs: { key: string }[]): string[] {
  return [...new Set(reqs.map((r) => r.key))];
}

/** Each request's outcome, from the rows of the lock read (see {@link lockConversationsForActors}). */
function lockOutcomes(tx: Tx, reqs: { key: string; user: Actor }[], rows: LockedRow[]): LockOutcome[] {
  return reqs.map(({ key, user }) => {
    const found = rows.find((x) => x.c.key === key || x.c.draft_key === key);
    const p = found?.p.find((x) => x.address === user.address);
    if (!found || !p || p.user_id !== user.id || (!found.c.published && found.c.creator !== user.address)) return { error: notFound('conversation') };
    if (p.removed_id !== null)
      return { error: forbidden('removed', `you were removed from this conversation at action ${p.removed_id}`, { removed_id: p.removed_id }) };
    const conv = found.c;
    for (const col of TIMESTAMP_COLUMNS) if (typeof conv[col] === 'string') conv[col] = new Date(conv[col]);
    preloadParticipants(conv, found.p);
    if (found.k) noteActiveKeyId(tx, found.k);
    return { row: conv };
  });
}

/**
 * {@link lockConversationsForActors} as a read shared by the units of a group transaction,
 * sent with the transaction's BEGIN as a call of `parley_lock_conversations` (migration
 * 035_lock_function.sql: the same rows, planned once per connection).
 */
const lockRead: BatchRead<{ key: string; user: Actor }, LockOutcome> = {
  name: 'lock conversations for actors',
  read: lockConversationsForActors,
  statement: (reqs) => ({
    select: `select r from parley_lock_conversations(${dollarQuoted(pgTextArray(keysOf(reqs)))}::text[]) as r`,
    results: (tx, rows) => lockOutcomes(tx, reqs, (rows as { r: LockedRow }[]).map((x) => x.r)),
  }),
};

/** A PostgreSQL array literal of `values` (`{"a","b"}`), each element quoted. */
function pgTextArray(values: string[]): string {
  return `{${values.map((v) => `"${v.replace(/["\\]/g, '\\$&')}"`).join(',')}}`;
}

/** The answer of {@link applyActions}. */
export interface AppliedActions {
  /** The actions as numbered — provisionally while `pending`. */
  actions: Action[];
  /**
   * Set when the conversation's leader (another platform) could not be reached: the actions
   * wait in the proposals outbox, are retried, and are applied once the leader numbers them
   * (issue 3 §4; docs/federation.md, "Proposals").
   */
  pending?: { proposal: number; reason: string };
}

/**
 * `applyActions` — a user's batch of actions on a conversation they take part in
 * (client API `POST /api/conversations/{key}/actions`). All or nothing, in one transaction.
 * On a conversation led by another platform the actions are proposed to the leader and the
 * answer waited for (a few seconds at most): the numbered actions when it accepts them, its
 * refusal as the user's error, or `pending` when it cannot be reached now.
 * @returns the new actions with their ids and hashes
 * @throws AppError 400 (malformed, over limits), 403 (permissions, removed), 404, 409 (follows, locks)
 */
export async function applyActions(deps: Deps, user: Actor, key: string, inputs: ActionInput[]): Promise<AppliedActions> {
  if (inputs.length === 0) throw badRequest('empty_batch', 'actions must not be empty');
  if (inputs.length > LIMITS.batch) throw badRequest('batch_too_large', `at most ${LIMITS.batch} actions per request`);
  for (const i of inputs) {
    if (i.act === 'conv:create') throw badRequest('invalid_action', 'create conversations with POST /api/conversations');
    if (i.act === 'conv:publish') throw badRequest('invalid_action', 'publish with POST /api/conversations/{key}/publish');
    if (i.source !== undefined) throw badRequest('invalid_action', 'source is set by the platform');
  }
  const r = await groupTransactionWith(deps.db, key, lockRead, { key, user }, async (tx, locked) => {
    if ('error' in locked) throw locked.error;
    return appendActions(tx, deps, locked.row, user.address, inputs, { inline: true });
  });
  if (r.proposal === undefined) return { actions: r.actions };
  const outcome = await settleProposal(deps, r.proposal);
  if (outcome.state === 'applied') return { actions: outcome.actions };
  if (outcome.state === 'failed') throw outcome.error;
  return { actions: outcome.actions, pending: { proposal: r.proposal, reason: outcome.error } };
}
