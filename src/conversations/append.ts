import type { Action, ActionInput, FileRef } from '../core/actions.ts';
import { sealAction } from '../core/actions.ts';
import { applyAction, referencedMessages, type ConversationState } from '../core/reducer.ts';
import { isoTime } from '../platform/clock.ts';
import { badRequest } from '../platform/errors.ts';
import { type Deps, isLocalAddress, primaryDomain } from '../context.ts';
import type { Tx } from '../store/db.ts';
import { type ConversationRow, loadedParticipantRows, loadState, persistState } from './store.ts';
import { type KnownParticipants, recordEffects } from './effects.ts';
import { signActions } from '../federation/action-signatures.ts';
import { trackReplication } from '../federation/outbox.ts';
import { proposeInTx } from '../federation/proposals.ts';

/** Copies only the fields an action may carry (unknown fields never reach the log). */
export function cleanInput(i: ActionInput): ActionInput {
  const out: ActionInput = { act: i.act };
  if (i.follows !== undefined) out.follows = i.follows;
  if (i.parent !== undefined) out.parent = i.parent;
  if (i.participant !== undefined) out.participant = i.participant.trim().toLowerCase();
  if (i.perms !== undefined) out.perms = i.perms;
  if (i.body !== undefined) out.body = i.body;
  if (i.format !== undefined) out.format = i.format;
  if (i.files !== undefined)
    out.files = i.files.map((f) => ({
      sha256: f.sha256,
      name: f.name,
      content_type: f.content_type,
      size: f.size,
      ...(f.content_id ? { content_id: f.content_id } : {}),
      ...(f.inline ? { inline: true } : {}),
    }));
  if (i.expiry !== undefined) out.expiry = i.expiry;
  if (i.source !== undefined) out.source = i.source;
  return out;
}

/** Users a transaction has read already (address → id), per transaction: see {@link noteUsers}. */
const knownUsers = new WeakMap<object, Map<string, number>>();

/**
 * Tells {@link resolveLocalUsers} in `tx` the ids of users that `tx` read itself (inbound
 * mail reads a batch's recipients once), so that it reads none of them again.
 */
export function noteUsers(tx: Tx, users: Iterable<[string, number]>): void {
  let m = knownUsers.get(tx);
  if (!m) knownUsers.set(tx, (m = new Map()));
  for (const [address, id] of users) m.set(address, id);
}

/**
 * Maps local participant addresses to user ids; a local address with no user is refused.
 * @throws AppError 400 unknown_local_address
 */
export async function resolveLocalUsers(tx: Tx, deps: Deps, addresses: string[]): Promise<Map<string, number>> {
  const local = addresses.filter((a) => isLocalAddress(deps, a));
  const map = new Map<string, number>();
  if (local.length === 0) return map;
  const known = knownUsers.get(tx);
  if (known && local.every((a) => known.has(a))) {
    for (const a of local) map.set(a, known.get(a)!);
    return map;
  }
  const rows = await tx.selectFrom('users').select(['id', 'address']).where('address', 'in', local).execute();
  for (const r of rows) map.set(r.address, r.id);
  const missing = local.filter((a) => !map.has(a));
  if (missing.length > 0)
    throw badRequest('unknown_local_address', `no user ${missing.join(', ')} on this platform`, { addresses: missing });
  return map;
}

/**
 * Maps the local addresses among `addresses` to user ids, leaving out those with no user
 * (replicated actions: the leader cannot know this platform's users; such a participant
 * simply has no mailbox here).
 */
export async function localUserIds(tx: Tx, deps: Deps, addresses: string[]): Promise<Map<string, number>> {
  const local = addresses.filter((a) => isLocalAddress(deps, a));
  if (local.length === 0) return new Map();
  const rows = await tx.selectFrom('users').select(['id', 'address']).where('address', 'in', local).execute();
  return new Map(rows.map((r) => [r.address, r.id]));
}

/**
 * Stores sealed, signed actions that the reducer accepted into `state` (which they changed):
 * persists them with the state (store.ts persistState), records their local effects (flags,
 * stream events so local users' websockets see them, outbound email — effects.ts) and, when
 * this platform leads the conversation, its replication bookkeeping (federation/outbox.ts).
 * The one store path of local appends, of actions replicated from a leader and of proposals
 * a leader accepts. Caller holds the conversation's row lock.
 * @param known participants as loaded before the actions, and user ids of added local ones
 */
export async function storeActions(
  tx: Tx,
  deps: Deps,
  row: ConversationRow,
  state: ConversationState,
  actions: Action[],
  wasPublished: boolean,
  known: KnownParticipants,
): Promise<void> {
  await persistState(tx, row.id, state, actions, known.newUserIds);
  // Remote participants are recorded before the effects, which must not email them.
  if (row.leader === primaryDomain(deps)) await trackReplication(tx, deps, row.id, state, actions);
  await recordEffects(tx, deps, row.id, state, actions, wasPublished, known);
}

/**
 * Checks that every file names a stored blob and takes its size from the store.
 * @throws AppError 400 unknown_file
 */
export async function checkFiles(tx: Tx, inputs: ActionInput[]): Promise<void> {
  const files: FileRef[] = inputs.flatMap((i) => i.files ?? []);
  if (files.length === 0) return;
  const shas = [...new Set(files.map((f) => f.sha256))];
  const rows = await tx.selectFrom('blobs').select(['sha256', 'size']).where('sha256', 'in', shas).execute();
  const sizes = new Map(rows.map((r) => [r.sha256, r.size]));
  for (const f of files) {
    const size = sizes.get(f.sha256);
    if (size === undefined) throw badRequest('unknown_file', `no uploaded file ${f.sha256}; upload it first`, { sha256: f.sha256 });
    f.size = size;
  }
}

/**
 * Appends a batch of actions by `actor` to a locked conversation: numbers, timestamps,
 * hash-chains and validates each one with the core reducer (all or nothing), persists them
 * with the state they change, and records their effects (flags, streams, outbound mail).
 * Caller holds the row lock (lockConversation) and has authorised the actor.
 *
 * On a published conversation led by another platform (issue 3 §4) nothing is appended
 * here: the actions are built the same way on the head this platform knows (after its
 * pending proposals), signed, and stored as a pending proposal to the leader
 * (federation/proposals.ts); `proposal` is then its id and `actions` are numbered
 * provisionally — the leader's numbering comes back by replication. With `inline` the
 * caller sends the proposal itself right after the commit (settleProposal); otherwise the
 * federation worker is woken to send it (an email reply arriving at a follower, issue 3 §8).
 * @returns the new actions, sealed (and the proposal id on a follower)
 * @throws AppError from the reducer (400/403/409) — the transaction must then roll back
 */
export async function appendActions(
  tx: Tx,
  deps: Deps,
  row: ConversationRow,
  actor: string,
  inputs: ActionInput[],
  opts: { inline?: boolean } = {},
): Promise<{ actions: Action[]; state: ConversationState; proposal?: number }> {
  const clean = inputs.map(cleanInput);
  await checkFiles(tx, clean);
  if (row.published && row.leader !== primaryDomain(deps)) {
    await resolveLocalUsers(tx, deps, clean.filter((a) => a.act === 'participant:add').map((a) => a.participant!));
    return proposeInTx(tx, deps, row, actor, clean, opts.inline ?? false);
  }
  const state = await loadState(tx, row, referencedMessages(clean));
  const h = state.header!;
  const wasPublished = h.published;
  let ts = isoTime(deps.clock.now());
  if (h.last_ts && ts < h.last_ts) ts = h.last_ts;
  const out: Action[] = [];
  for (const input of clean) {
    const a = sealAction({ ...input, conv: h.key, id: h.last_id + 1, actor, ts, prev: h.last_hash });
    applyAction(state, a);
    out.push(a);
  }
  const added = out.filter((a) => a.act === 'participant:add').map((a) => a.participant!);
  const userIds = await resolveLocalUsers(tx, deps, added);
  await signActions(deps, out, tx);
  await storeActions(tx, deps, row, state, out, wasPublished, {
    rows: loadedParticipantRows.get(state) ?? new Map(),
    newUserIds: userIds,
  });
  return { actions: out, state };
}
