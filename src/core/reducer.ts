import { AppError, badRequest, conflict, forbidden } from '../platform/errors.ts';
import {
  type Action,
  type ActionSource,
  type FileRef,
  type MessageFormat,
  type Perms,
  LIMITS,
  LOCK_TTL_MS,
  NEEDS_FOLLOWS,
  permsRank,
} from './actions.ts';

/**
 * The conversation as a fold: `state = actions.reduce(applyAction, emptyState())`
 * (ARCHITECTURE.md, "The conversation as a fold"). One reducer serves the leader (validate
 * before appending), replicas (verify a received log) and clients (render).
 *
 * The state may be *partial*: the write path loads the header, all participants and only
 * the messages a batch refers to (see `referencedMessages`). Applying an action that needs
 * an entity that was not loaded is a programming error (`state_incomplete`).
 */

/** A message or subject lock: who holds it, since when, and the lock action's id. */
export interface Lock {
  by: string;
  at: string;
  id: number;
}

export interface ParticipantState {
  address: string;
  perms: Perms;
  added_id: number;
  /** Head of this participant's chain (participant:add/modify ids). */
  head: number;
  /** Id of the participant:remove that removed them, or null while active. */
  removed_id: number | null;
  /** Last action id this participant marked seen. */
  seen_id: number;
}

export interface MessageState {
  /** Id of the message:add action. */
  id: number;
  author: string;
  body: string;
  format: MessageFormat;
  parent: number | null;
  files: FileRef[];
  created_ts: string;
  updated_ts: string | null;
  deleted: boolean;
  /** Head of this message's chain. */
  head: number;
  lock: Lock | null;
  source: ActionSource | null;
}

export interface ConversationHeader {
  key: string;
  creator: string;
  created_at: string;
  published: boolean;
  published_at: string | null;
  subject: string;
  subject_head: number;
  subject_lock: Lock | null;
  expiry: string | null;
  expiry_head: number;
  last_id: number;
  last_hash: string | null;
  last_ts: string | null;
  message_count: number;
}

export interface ConversationState {
  header: ConversationHeader | null;
  participants: Map<string, ParticipantState>;
  messages: Map<number, MessageState>;
  /** action id → id of the message whose chain it belongs to (message actions only). */
  messageOf: Map<number, number>;
  /** What applyAction changed since the state was loaded (the write path persists these). */
  touched: { header: boolean; participants: Set<string>; messages: Set<number> };
}

/** The state before `conv:create`. */
export function emptyState(): ConversationState {
  return {
    header: null,
    participants: new Map(),
    messages: new Map(),
    messageOf: new Map(),
    touched: { header: false, participants: new Set(), messages: new Set() },
  };
}

/** Replays a whole log from scratch. @throws AppError at the first invalid action */
export function replay(actions: Iterable<Action>): ConversationState {
  const s = emptyState();
  for (const a of actions) applyAction(s, a);
  return s;
}

/** Is the lock held (not released, not expired) by someone other than `actor` at time `ts`? */
export function lockedByOther(lock: Lock | null, actor: string, ts: string): boolean {
  if (!lock || lock.by === actor) return false;
  return Date.parse(ts) - Date.parse(lock.at) < LOCK_TTL_MS;
}

function isLive(lock: Lock | null, ts: string): boolean {
  return !!lock && Date.parse(ts) - Date.parse(lock.at) < LOCK_TTL_MS;
}

/** Ids of messages (and of actions whose message must be known) that a batch refers to. */
export function referencedMessages(actions: { act: string; follows?: number; parent?: number }[]): {
  follows: number[];
  parents: number[];
} {
  const follows = new Set<number>();
  const parents = new Set<number>();
  for (const a of actions) {
    if (a.act.startsWith('message:') && a.follows !== undefined) follows.add(a.follows);
    if (a.act === 'message:add' && a.parent !== undefined) parents.add(a.parent);
  }
  return { follows: [...follows], parents: [...parents] };
}

const incomplete = (what: string) => new AppError(500, 'state_incomplete', `conversation state missing ${what}`);

function requireFollows(a: Action): number {
  if (a.follows === undefined) throw badRequest('follows_required', `${a.act} must name the action it follows`);
  if (!Number.isInteger(a.follows) || a.follows < 1 || a.follows >= a.id)
    throw badRequest('follows_unknown', `follows ${a.follows} is not an earlier action of this conversation`, {
      follows: a.follows,
    });
  return a.follows;
}

function requireHead(a: Action, head: number, component: string): void {
  const follows = requireFollows(a);
  if (follows !== head)
    throw conflict('follows_not_head', `follows ${follows} is not the head of ${component}: the head is ${head}`, {
      follows,
      head,
      component,
    });
}

function requirePerms(p: ParticipantState, min: Perms, act: string): void {
  if (permsRank(p.perms) < permsRank(min))
    throw forbidden('insufficient_permissions', `${act} needs "${min}" permissions; ${p.address} has "${p.perms}"`, {
      perms: p.perms,
      needed: min,
    });
}

function checkBody(body: string | undefined, max: number, what: string): string {
  if (typeof body !== 'string') throw badRequest('body_required', `${what} is required`);
  if (body.length > max) throw badRequest('body_too_long', `${what} is longer than ${max} characters`, { max });
  return body;
}

function checkFiles(files: FileRef[] | undefined): FileRef[] {
  if (!files) return [];
  if (files.length > LIMITS.filesPerMessage)
    throw badRequest('too_many_files', `a message may carry at most ${LIMITS.filesPerMessage} files`);
  for (const f of files) {
    if (!/^[0-9a-f]{64}$/.test(f.sha256)) throw badRequest('invalid_file', `file sha256 must be 64 hex digits`);
    if (!f.name || f.name.length > 255) throw badRequest('invalid_file', 'file name must be 1-255 characters');
    if (!Number.isSafeInteger(f.size) || f.size < 0) throw badRequest('invalid_file', 'file size must be bytes');
  }
  return files;
}

function activeCount(s: ConversationState): number {
  let n = 0;
  for (const p of s.participants.values()) if (p.removed_id === null) n++;
  return n;
}

/**
 * Validates `a` against the state and applies it in place.
 * Checks: sequence (`id`, `prev`, non-decreasing `ts`), the actor is an active participant
 * (only the creator acts on a draft), permissions, `follows` names the head of the
 * component's chain, locks, and the per-type fields and limits.
 * @throws AppError 400 malformed, 403 not allowed, 409 conflict with the current state
 */
export function applyAction(s: ConversationState, a: Action): void {
  const h = s.header;
  if (a.act === 'conv:create') {
    if (h !== null || a.id !== 1) throw conflict('already_created', 'conv:create must be the first action');
    if (a.prev !== null) throw conflict('prev_mismatch', 'the first action has no prev');
    const subject = checkBody(a.body ?? '', LIMITS.subjectChars, 'subject');
    s.header = {
      key: a.conv,
      creator: a.actor,
      created_at: a.ts,
      published: false,
      published_at: null,
      subject,
      subject_head: 1,
      subject_lock: null,
      expiry: a.expiry ?? null,
      expiry_head: 1,
      last_id: 1,
      last_hash: a.hash,
      last_ts: a.ts,
      message_count: 0,
    };
    s.participants.set(a.actor, { address: a.actor, perms: 'full', added_id: 1, head: 1, removed_id: null, seen_id: 1 });
    s.touched.header = true;
    s.touched.participants.add(a.actor);
    return;
  }
  if (!h) throw conflict('not_created', 'the conversation has no conv:create');
  if (a.id !== h.last_id + 1)
    throw conflict('sequence_mismatch', `action id ${a.id} does not follow ${h.last_id}`, { expected: h.last_id + 1 });
  if (a.prev !== h.last_hash) throw conflict('prev_mismatch', `action ${a.id} does not chain to the previous hash`);
  if (h.last_ts && a.ts < h.last_ts) throw conflict('time_regression', `action ${a.id} is older than its predecessor`);
  if (a.conv !== h.key) throw conflict('wrong_conversation', `action ${a.id} names conversation ${a.conv}`);

  const actor = s.participants.get(a.actor);
  if (!actor) throw forbidden('not_participant', `${a.actor} is not a participant of this conversation`);
  if (actor.removed_id !== null)
    throw forbidden('removed', `${a.actor} was removed from this conversation at action ${actor.removed_id}`);
  if (!h.published && a.actor !== h.creator) throw forbidden('draft', 'only the creator acts on a draft');
  if (!NEEDS_FOLLOWS.has(a.act) && a.follows !== undefined && a.act !== 'message:add')
    throw badRequest('unexpected_follows', `${a.act} does not take follows`);

  switch (a.act) {
    case 'conv:publish': {
      if (a.actor !== h.creator) throw forbidden('not_creator', 'only the creator publishes');
      if (h.published) throw conflict('already_published', 'the conversation is already published');
      h.published = true;
      h.published_at = a.ts;
      break;
    }
    case 'subject:modify':
    case 'subject:lock':
    case 'subject:release': {
      requirePerms(actor, 'write', a.act);
      requireHead(a, h.subject_head, 'the subject');
      if (lockedByOther(h.subject_lock, a.actor, a.ts))
        throw conflict('locked', `the subject is locked by ${h.subject_lock!.by}`, { lock: h.subject_lock });
      if (a.act === 'subject:modify') {
        h.subject = checkBody(a.body, LIMITS.subjectChars, 'subject');
      } else if (a.act === 'subject:lock') {
        h.subject_lock = { by: a.actor, at: a.ts, id: a.id };
      } else {
        if (!isLive(h.subject_lock, a.ts)) throw conflict('not_locked', 'the subject is not locked');
        h.subject_lock = null;
      }
      h.subject_head = a.id;
      break;
    }
    case 'expiry:modify': {
      requirePerms(actor, 'write', a.act);
      requireHead(a, h.expiry_head, 'the expiry');
      if (a.expiry !== null && (typeof a.expiry !== 'string' || Number.isNaN(Date.parse(a.expiry))))
        throw badRequest('invalid_expiry', 'expiry must be an ISO 8601 time or null');
      h.expiry = a.expiry ?? null;
      h.expiry_head = a.id;
      break;
    }
    case 'message:add': {
      requirePerms(actor, 'write', a.act);
      if (a.follows !== undefined) throw badRequest('unexpected_follows', 'message:add takes parent, not follows');
      const body = checkBody(a.body, LIMITS.bodyChars, 'message body');
      let parent: number | null = null;
      if (a.parent !== undefined) {
        const p = s.messages.get(a.parent);
        // The write path loads every referenced parent, so a missing one does not exist.
        if (!p) throw badRequest('parent_unknown', `parent ${a.parent} is not a message of this conversation`);
        if (p.deleted) throw conflict('parent_deleted', `parent message ${a.parent} is deleted`);
        parent = p.id;
      }
      s.messages.set(a.id, {
        id: a.id,
        author: a.actor,
        body,
        format: a.format ?? 'plain',
        parent,
        files: checkFiles(a.files),
        created_ts: a.ts,
        updated_ts: null,
        deleted: false,
        head: a.id,
        lock: null,
        source: a.source ?? null,
      });
      s.messageOf.set(a.id, a.id);
      s.touched.messages.add(a.id);
      h.message_count++;
      break;
    }
    case 'message:modify':
    case 'message:delete':
    case 'message:recover':
    case 'message:lock':
    case 'message:release': {
      requirePerms(actor, 'write', a.act);
      const follows = requireFollows(a);
      const msgId = s.messageOf.get(follows);
      if (msgId === undefined)
        throw badRequest('follows_not_message', `follows ${follows} is not an action on a message`, { follows });
      const m = s.messages.get(msgId);
      if (!m) throw incomplete(`message ${msgId}`);
      requireHead(a, m.head, `message ${m.id}`);
      if (lockedByOther(m.lock, a.actor, a.ts))
        throw conflict('locked', `message ${m.id} is locked by ${m.lock!.by}`, { lock: m.lock });
      if (a.act === 'message:modify') {
        if (m.deleted) throw conflict('message_deleted', `message ${m.id} is deleted`);
        m.body = checkBody(a.body, LIMITS.bodyChars, 'message body');
        if (a.format) m.format = a.format;
        if (a.files) m.files = checkFiles(a.files);
        m.updated_ts = a.ts;
      } else if (a.act === 'message:delete') {
        if (m.deleted) throw conflict('message_deleted', `message ${m.id} is already deleted`);
        m.deleted = true;
        m.lock = null;
        h.message_count--;
      } else if (a.act === 'message:recover') {
        if (!m.deleted) throw conflict('message_not_deleted', `message ${m.id} is not deleted`);
        m.deleted = false;
        h.message_count++;
      } else if (a.act === 'message:lock') {
        if (m.deleted) throw conflict('message_deleted', `message ${m.id} is deleted`);
        m.lock = { by: a.actor, at: a.ts, id: a.id };
      } else {
        if (!isLive(m.lock, a.ts)) throw conflict('not_locked', `message ${m.id} is not locked`);
        m.lock = null;
      }
      m.head = a.id;
      s.messageOf.set(a.id, m.id);
      s.touched.messages.add(m.id);
      break;
    }
    case 'participant:add': {
      requirePerms(actor, 'write', a.act);
      const address = a.participant;
      if (!address) throw badRequest('participant_required', 'participant:add needs participant');
      const existing = s.participants.get(address);
      if (existing && existing.removed_id === null)
        throw conflict('already_participant', `${address} is already a participant`);
      if (existing) throw conflict('was_removed', `${address} was removed and cannot rejoin; fork the conversation`);
      const perms = a.perms ?? 'write';
      if (permsRank(perms) > permsRank(actor.perms))
        throw forbidden('insufficient_permissions', `cannot grant "${perms}" with "${actor.perms}" permissions`);
      if (activeCount(s) >= LIMITS.participants)
        throw badRequest('too_many_participants', `a conversation has at most ${LIMITS.participants} participants`);
      s.participants.set(address, { address, perms, added_id: a.id, head: a.id, removed_id: null, seen_id: 0 });
      s.touched.participants.add(address);
      break;
    }
    case 'participant:remove':
    case 'participant:modify': {
      const address = a.participant;
      if (!address) throw badRequest('participant_required', `${a.act} needs participant`);
      const p = s.participants.get(address);
      if (!p || p.removed_id !== null) throw conflict('not_participant', `${address} is not an active participant`);
      requireHead(a, p.head, `participant ${address}`);
      if (a.act === 'participant:remove') {
        if (address !== a.actor) {
          requirePerms(actor, 'full', a.act);
          if (address === h.creator) throw forbidden('creator', 'only the creator can remove the creator');
        }
        p.removed_id = a.id;
      } else {
        requirePerms(actor, 'full', a.act);
        if (address === h.creator) throw forbidden('creator', "the creator's permissions cannot change");
        if (!a.perms) throw badRequest('perms_required', 'participant:modify needs perms');
        p.perms = a.perms;
      }
      p.head = a.id;
      s.touched.participants.add(address);
      break;
    }
    case 'seen': {
      actor.seen_id = a.id;
      s.touched.participants.add(actor.address);
      break;
    }
    default:
      throw badRequest('unknown_action', `unknown action type ${(a as Action).act}`);
  }
  h.last_id = a.id;
  h.last_hash = a.hash;
  h.last_ts = a.ts;
  s.touched.header = true;
}
