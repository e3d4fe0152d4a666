import type { Action } from './actions.ts';

/**
 * Per-user folders and flags (em2 seed 000, "Conversation Flags"). Flags are stored per
 * participant; folders are derived from them — a conversation can be in several folders
 * (sent and inbox), and marking spam or deleted keeps `inbox`, so restoring brings it back.
 */
export const FOLDERS = ['inbox', 'draft', 'sent', 'archive', 'spam', 'deleted'] as const;
export type Folder = (typeof FOLDERS)[number];

export interface UserFlags {
  inbox: boolean;
  deleted: boolean;
  spam: boolean;
  seen: boolean;
  muted: boolean;
}

/** What else decides the folders: is the user the creator, is the conversation published. */
export interface FolderContext {
  isCreator: boolean;
  published: boolean;
}

/** Is a conversation with these flags in `folder`? The SQL in conversations/list.ts mirrors this. */
export function inFolder(folder: Folder, f: UserFlags, c: FolderContext): boolean {
  switch (folder) {
    case 'inbox':
      return f.inbox && !f.deleted && !f.spam;
    case 'draft':
      return c.isCreator && !c.published && !f.deleted;
    case 'sent':
      return c.isCreator && c.published && !f.deleted;
    case 'archive':
      return !f.inbox && !f.spam && !f.deleted && !c.isCreator;
    case 'spam':
      return f.spam && !f.deleted;
    case 'deleted':
      return f.deleted;
  }
}

/** The user's operations on a conversation's flags (client API `POST …/flags`). */
export const FLAG_OPS = ['archive', 'inbox', 'delete', 'restore', 'spam', 'ham', 'mute', 'unmute', 'seen', 'unseen'] as const;
export type FlagOp = (typeof FLAG_OPS)[number];

/** Applies a user's flag operation. `seen` here is the local flag; the `seen` action also sets it. */
export function applyFlagOp(f: UserFlags, op: FlagOp): UserFlags {
  switch (op) {
    case 'archive':
      return { ...f, inbox: false };
    case 'inbox':
      return { ...f, inbox: true, spam: false, deleted: false };
    case 'delete':
      return { ...f, deleted: true };
    case 'restore':
      return { ...f, deleted: false };
    case 'spam':
      return { ...f, spam: true };
    case 'ham':
      return { ...f, spam: false, inbox: true };
    case 'mute':
      return { ...f, muted: true, inbox: false };
    case 'unmute':
      return { ...f, muted: false };
    case 'seen':
      return { ...f, seen: true };
    case 'unseen':
      return { ...f, seen: false };
  }
}

/** Actions that bring a conversation back to a participant's attention. */
const NOTIFYING = new Set(['conv:publish', 'message:add', 'message:modify', 'subject:modify']);

/**
 * How an action changes the flags of one local participant `user`:
 * - the user's own actions mark the conversation seen;
 * - others' publish, new or edited messages and subject changes, and being added, set
 *   `inbox` and clear `seen` — unless the user muted the conversation;
 * - actions in a draft change nothing (only the creator sees a draft).
 */
export function flagsAfterAction(f: UserFlags, a: Action, user: string, published: boolean): UserFlags {
  if (!published && a.act !== 'conv:publish') return f;
  if (a.actor === user) return f.seen ? f : { ...f, seen: true };
  const concernsUser = NOTIFYING.has(a.act) || (a.act === 'participant:add' && a.participant === user);
  if (!concernsUser || f.muted) return f;
  return { ...f, inbox: true, seen: false };
}
