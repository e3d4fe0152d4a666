import type { Action, ActionSource, FileRef, MessageFormat, Perms } from '../../core/actions.ts';
import { LIMITS, sealAction } from '../../core/actions.ts';
import { draftKey } from '../../core/keys.ts';
import { publishedLog } from '../../core/publish.ts';
import { applyAction, emptyState, type ConversationState } from '../../core/reducer.ts';
import { isoTime } from '../../platform/clock.ts';
import { badRequest, conflict } from '../../platform/errors.ts';
import { type Deps, primaryDomain } from '../../context.ts';
import { isUniqueViolation, type Tx, transaction } from '../../store/db.ts';
import { checkFiles, cleanInput, resolveLocalUsers } from '../append.ts';
import { recordEffects } from '../effects.ts';
import { insertConversation, persistState } from '../store.ts';
import { signActions } from '../../federation/action-signatures.ts';
import { trackReplication } from '../../federation/outbox.ts';

/** A new conversation, as the client API and the email bridge describe it. */
export interface NewConversation {
  /** Address of the creator (a local user, or an email sender for inbound mail). */
  creator: string;
  subject: string;
  participants: { address: string; perms?: Perms }[];
  messages: {
    body: string;
    format?: MessageFormat;
    /** Index (0-based) of an earlier message of this list that is the parent. */
    parent?: number;
    files?: FileRef[];
    author?: string;
    source?: ActionSource;
  }[];
  /** Publish at once (default) or keep as a draft seen only by the creator. */
  publish: boolean;
  expiry?: string | null;
}

/**
 * Builds and stores a conversation's first actions inside `tx`. A published conversation
 * gets the published log (core/publish.ts); a draft gets conv:create under a draft key,
 * then its participants and messages. Every action passes the reducer.
 * @returns the conversation id, key and actions
 */
export async function insertNewConversation(
  tx: Tx,
  deps: Deps,
  c: NewConversation,
): Promise<{ id: number; key: string; actions: Action[]; state: ConversationState }> {
  const ts = isoTime(deps.clock.now());
  const participants = dedupe(c.participants.map((p) => ({ ...p, address: p.address.trim().toLowerCase() }))).filter(
    (p) => p.address !== c.creator,
  );
  if (participants.length + 1 > LIMITS.participants)
    throw badRequest('too_many_participants', `a conversation has at most ${LIMITS.participants} participants`);
  let log: Action[];
  let draft: string | null = null;
  if (c.publish) {
    log = publishedLog({
      creator: c.creator,
      subject: c.subject,
      publishedAt: ts,
      participants,
      messages: c.messages.map((m, i) => ({ ...m, draftId: i, parent: m.parent ?? null })),
      expiry: c.expiry ?? null,
    });
  } else {
    draft = draftKey();
    log = [];
    let prev: string | null = null;
    const push = (input: Parameters<typeof cleanInput>[0]) => {
      const a = sealAction({ ...cleanInput(input), conv: draft!, id: log.length + 1, actor: c.creator, ts, prev });
      log.push(a);
      prev = a.hash;
    };
    push({ act: 'conv:create', body: c.subject, ...(c.expiry ? { expiry: c.expiry } : {}) });
    for (const p of participants) push({ act: 'participant:add', participant: p.address, perms: p.perms ?? 'write' });
    const idOf: number[] = [];
    for (const m of c.messages) {
      const parent = m.parent !== undefined ? idOf[m.parent] : undefined;
      push({ act: 'message:add', body: m.body, format: m.format, files: m.files, ...(parent ? { parent } : {}) });
      idOf.push(log.length);
    }
  }
  await checkFiles(tx, log);
  const state = emptyState();
  for (const a of log) applyAction(state, a);
  const userIds = await resolveLocalUsers(tx, deps, [c.creator, ...participants.map((p) => p.address)]);
  let id: number;
  try {
    id = await insertConversation(tx, state.header!, primaryDomain(deps), draft);
  } catch (e) {
    if (isUniqueViolation(e)) throw conflict('key_taken', 'a conversation with the same key exists; retry');
    throw e;
  }
  await signActions(deps, log, tx);
  await persistState(tx, id, state, log, userIds);
  // Remote participants get the log by replication (this platform leads what it creates);
  // recorded before the effects, which must not email them.
  await trackReplication(tx, deps, id, state, log);
  // Every participant is new: their rows (default flags) need not be read back.
  await recordEffects(tx, deps, id, state, log, false, { rows: new Map(), newUserIds: userIds });
  return { id, key: state.header!.key, actions: log, state };
}

function dedupe<T extends { address: string }>(list: T[]): T[] {
  const seen = new Set<string>();
  return list.filter((p) => (seen.has(p.address) ? false : (seen.add(p.address), true)));
}

/**
 * `createConversation` — client API `POST /api/conversations`: a draft, or published at once.
 * @throws AppError 400 (limits, unknown local address, unknown file)
 */
export async function createConversation(
  deps: Deps,
  c: NewConversation,
): Promise<{ key: string; actions: Action[] }> {
  if (c.subject.length > LIMITS.subjectChars) throw badRequest('body_too_long', `subject is longer than ${LIMITS.subjectChars} characters`);
  if (c.messages.length > LIMITS.batch) throw badRequest('batch_too_large', `at most ${LIMITS.batch} messages`);
  return transaction(deps.db, async (tx) => {
    const r = await insertNewConversation(tx, deps, c);
    return { key: r.key, actions: r.actions };
  });
}
