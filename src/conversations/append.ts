import type { Action, ActionInput, FileRef } from '../core/actions.ts';
import { sealAction } from '../core/actions.ts';
import { applyAction, referencedMessages, type ConversationState } from '../core/reducer.ts';
import { isoTime } from '../platform/clock.ts';
import { badRequest } from '../platform/errors.ts';
import { type Deps, isLocalAddress } from '../context.ts';
import type { Tx } from '../store/db.ts';
import { type ConversationRow, loadedParticipantRows, loadState, persistState } from './store.ts';
import { recordEffects } from './effects.ts';
import { signActions } from '../federation/action-signatures.ts';

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

/**
 * Maps local participant addresses to user ids; a local address with no user is refused.
 * @throws AppError 400 unknown_local_address
 */
export async function resolveLocalUsers(tx: Tx, deps: Deps, addresses: string[]): Promise<Map<string, number>> {
  const local = addresses.filter((a) => isLocalAddress(deps, a));
  const map = new Map<string, number>();
  if (local.length === 0) return map;
  const rows = await tx.selectFrom('users').select(['id', 'address']).where('address', 'in', local).execute();
  for (const r of rows) map.set(r.address, r.id);
  const missing = local.filter((a) => !map.has(a));
  if (missing.length > 0)
    throw badRequest('unknown_local_address', `no user ${missing.join(', ')} on this platform`, { addresses: missing });
  return map;
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
 * @returns the new actions, sealed
 * @throws AppError from the reducer (400/403/409) — the transaction must then roll back
 */
export async function appendActions(
  tx: Tx,
  deps: Deps,
  row: ConversationRow,
  actor: string,
  inputs: ActionInput[],
): Promise<{ actions: Action[]; state: ConversationState }> {
  const clean = inputs.map(cleanInput);
  await checkFiles(tx, clean);
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
  await persistState(tx, row.id, state, out, userIds);
  await recordEffects(tx, deps, row.id, state, out, wasPublished, {
    rows: loadedParticipantRows.get(state) ?? new Map(),
    newUserIds: userIds,
  });
  return { actions: out, state };
}
