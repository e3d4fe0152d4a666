import { canonicalJsonOmitting, sha256Hex } from './canonical.ts';

/**
 * The action types of a conversation log (PRODUCT.md §1; em2 seeds 000/001 "Event types").
 */
export const ACTION_TYPES = [
  'conv:create',
  'conv:publish',
  'subject:modify',
  'subject:lock',
  'subject:release',
  'message:add',
  'message:modify',
  'message:delete',
  'message:recover',
  'message:lock',
  'message:release',
  'participant:add',
  'participant:remove',
  'participant:modify',
  'seen',
  'expiry:modify',
] as const;
export type ActionType = (typeof ACTION_TYPES)[number];

/**
 * Participant permissions, weakest first: `read` may only mark seen and leave;
 * `write` may add and edit messages, change the subject and expiry, add participants;
 * `full` may also remove others and change their permissions.
 */
export const PERMS = ['read', 'write', 'full'] as const;
export type Perms = (typeof PERMS)[number];
export const permsRank = (p: Perms): number => PERMS.indexOf(p);

/** Message body formats. */
export const FORMATS = ['plain', 'markdown', 'html'] as const;
export type MessageFormat = (typeof FORMATS)[number];

/** A file attached to a message: a blob in the content-addressed store. */
export interface FileRef {
  /** SHA-256 of the content, lowercase hex; the blob's identity. */
  sha256: string;
  name: string;
  content_type: string;
  /** bytes */
  size: number;
  /** Content-ID of an inline MIME part (without angle brackets), if any. */
  content_id?: string;
  inline?: boolean;
}

/** Where a message came from when not typed on a Parley client (e.g. an email). */
export interface ActionSource {
  kind: 'email';
  /** RFC 5322 Message-ID without angle brackets. */
  message_id: string | null;
  /** SPF/DKIM/DMARC and parsing warnings shown to readers. */
  warnings?: string[];
  /** The quoted history separated from the new text of an email reply. */
  quoted?: string | null;
  /** Addresses the email was sent to (To, Cc): they already have it, Parley does not resend it. */
  recipients?: string[];
  /**
   * The email's origination date (RFC 5322 §3.6.1 `Date`) as UTC ISO 8601 with milliseconds;
   * null when it has none or it cannot be read. The action's `ts` is when this platform
   * received or imported the email, never this date (signatures are judged at `ts`).
   */
  date?: string | null;
}

/** What a client proposes: the action without the fields the leader assigns. */
export interface ActionInput {
  act: ActionType;
  /** Id of the head action of the component this action changes (edits, locks, removals). */
  follows?: number;
  /** message:add — id of the parent message (the id of its message:add action). */
  parent?: number;
  /** participant:* — the address concerned. */
  participant?: string;
  /** participant:add|modify — permissions to give. */
  perms?: Perms;
  /** message:add|modify — the text; subject:modify and conv:create — the subject. */
  body?: string;
  format?: MessageFormat;
  files?: FileRef[];
  /** expiry:modify — ISO 8601 time, or null to clear. */
  expiry?: string | null;
  source?: ActionSource;
}

/**
 * One numbered entry of a conversation's log, as stored and sent between platforms.
 * `hash` = SHA-256 (hex) of the canonical JSON of every other field except `sig`;
 * `prev` is the hash of the action numbered `id - 1` (null for 1), so the log is a hash chain.
 */
export interface Action extends ActionInput {
  /** The conversation key. */
  conv: string;
  /** Position in the log, from 1. */
  id: number;
  /** Address of the participant who acted. */
  actor: string;
  /** UTC ISO 8601 with milliseconds, assigned by the leader. */
  ts: string;
  prev: string | null;
  hash: string;
  /** Origin platform's signature over `hash` (federation). */
  sig?: string;
}

export type UnsealedAction = Omit<Action, 'hash' | 'sig'>;

/** The fields of an action its hash does not cover. */
const NOT_HASHED: ReadonlySet<string> = new Set(['hash', 'sig']);

/** The hash of an action: SHA-256 of its canonical JSON without `hash` and `sig`. */
export function hashAction(a: UnsealedAction | Action): string {
  return sha256Hex(canonicalJsonOmitting(a as unknown as Record<string, unknown>, NOT_HASHED));
}

/** Adds `hash` to an action. */
export function sealAction(a: UnsealedAction): Action {
  return { ...a, hash: hashAction(a) };
}

/** Action types whose `follows` is required (they change an existing component). */
export const NEEDS_FOLLOWS: ReadonlySet<ActionType> = new Set<ActionType>([
  'subject:modify',
  'subject:lock',
  'subject:release',
  'message:modify',
  'message:delete',
  'message:recover',
  'message:lock',
  'message:release',
  'participant:remove',
  'participant:modify',
  'expiry:modify',
]);

/** How long a message or subject lock lasts if not released, in ms (documented in the API). */
export const LOCK_TTL_MS = 10 * 60 * 1000;

/** Documented limits on actions. */
export const LIMITS = {
  /** characters of a message body */
  bodyChars: 1_000_000,
  /** characters of a subject */
  subjectChars: 998,
  /** files on one message */
  filesPerMessage: 100,
  /** active participants in one conversation */
  participants: 1000,
  /** actions in one client batch */
  batch: 100,
} as const;
