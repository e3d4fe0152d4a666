/**
 * Signed actions (issue 3 §3). Every action carries its origin platform's Ed25519
 * signature over its hash:
 *
 *     sig = "<platform>#<key id>:" + base64url(Ed25519(private key, UTF-8("parley-action-v1:" + hash)))
 *
 * where `hash` is the action's 64 lowercase hex digits (core/actions.ts hashAction — `sig`
 * is not part of what is hashed) and base64url has no padding (86 characters). A signature
 * is valid when the key is published by that platform and was valid at the action's `ts`
 * (created_at − 300 s ≤ ts ≤ not_after): signatures are judged at the time they were made,
 * so a log stays verifiable after its keys expire. docs/federation.md, "Action signatures".
 *
 * `verifyLog` is what a replica runs on a received log before storing any of it.
 */
import type { KeyObject } from 'node:crypto';
import { type Action, hashAction } from '../core/actions.ts';
import { applyAction, emptyState, type ConversationState } from '../core/reducer.ts';
import { conversationKey } from '../core/keys.ts';
import { AppError } from '../platform/errors.ts';
import type { Deps } from '../context.ts';
import type { Queryable } from '../store/db.ts';
import { CLOCK_SKEW_S, type KeyResolver, parseKeyId } from './http-signatures.ts';
import { type SigningKey, activeSigningKey } from './keys.ts';
import { type SignatureJob, verifyOnWorker } from './verify-pool.ts';
import { fastEd25519, publicKeyBytes, signEd25519, verifyEd25519 } from './ed25519.ts';

/** The context string signed before the hash (domain separation from request signatures). */
export const ACTION_SIG_CONTEXT = 'parley-action-v1:';

/** The bytes an action signature signs: UTF-8 of `parley-action-v1:<hash>`. */
export function actionSigningInput(hash: string): Buffer {
  return Buffer.from(ACTION_SIG_CONTEXT + hash, 'utf8');
}

/** Signs an action hash: `<keyid>:<base64url signature>`. */
export function signActionHash(hash: string, key: Pick<SigningKey, 'keyId' | 'privateKey'>): string {
  return `${key.keyId}:${signEd25519(key.privateKey, actionSigningInput(hash)).toString('base64url')}`;
}

/** Splits a `sig` into its keyid and signature bytes; null if malformed. */
export function parseActionSig(sig: unknown): { keyId: string; platform: string; signature: Buffer } | null {
  if (typeof sig !== 'string') return null;
  const colon = sig.lastIndexOf(':');
  if (colon < 0) return null;
  const keyId = sig.slice(0, colon);
  const b64 = sig.slice(colon + 1);
  const k = parseKeyId(keyId);
  if (!k || !/^[A-Za-z0-9_-]{86}$/.test(b64)) return null;
  const signature = Buffer.from(b64, 'base64url');
  return signature.length === 64 ? { keyId, platform: k.platform, signature } : null;
}

/**
 * Signs new actions of this platform in place (sets `sig`) with the active key, read
 * inside `q` — the caller's transaction — so a rotation that committed is honoured.
 * Called on every append path (conversations/append.ts, create-conversation.ts,
 * publish-draft.ts) after hashing and before persisting.
 */
export async function signActions(deps: Deps, actions: Action[], q?: Queryable): Promise<void> {
  if (actions.length === 0) return;
  const key = await activeSigningKey(deps, q);
  for (const a of actions) a.sig = signActionHash(a.hash, key);
}

/** Why an action or a log was refused (docs/federation.md, "Verifying a log"). */
export type ActionRejection =
  | 'malformed'
  | 'hash_mismatch'
  | 'sequence_mismatch'
  | 'prev_mismatch'
  | 'wrong_conversation'
  | 'missing_signature'
  | 'bad_signature_format'
  | 'unknown_key'
  | 'key_not_valid'
  | 'bad_signature'
  | 'wrong_origin'
  | 'rule_violation';

/** The outcome of verifying one action's signature. */
export type SignatureCheck =
  | { ok: true; platform: string; keyId: string }
  | { ok: false; reason: ActionRejection; message: string };

/**
 * Verifies an action's signature: recomputes its hash (a signature over a stale `hash`
 * field proves nothing), parses `sig`, resolves the key and checks it was valid at the
 * action's `ts`, then verifies the Ed25519 signature.
 */
export async function verifyActionSignature(action: Action, resolveKey: KeyResolver): Promise<SignatureCheck> {
  if (hashAction(action) !== action.hash) return { ok: false, reason: 'hash_mismatch', message: `action ${action.id}: hash does not match its content` };
  return verifySignatureOverHash(action, resolveKey);
}

/** Signatures found valid recently: `<hash>|<sig>` → the public key that verified it (see {@link preverifySignatures}). */
const verified = new Map<string, { publicKey: KeyObject; at: number }>();
/** Most remembered signatures, and for how long, ms. */
const VERIFIED_MAX = 50_000;
const VERIFIED_TTL_MS = 5 * 60_000;

/**
 * Verifies the signature of an action over its **claimed** `hash` (the caller checks that the
 * hash matches the content): sig format, key published and valid at `ts`, Ed25519. The
 * Ed25519 step is skipped when the same signature over the same hash verified with the same
 * public key in the last minutes ({@link preverifySignatures}); the key's publication and
 * validity at `ts` are checked every time.
 */
async function verifySignatureOverHash(action: Action, resolveKey: KeyResolver): Promise<SignatureCheck> {
  if (action.sig === undefined) return { ok: false, reason: 'missing_signature', message: `action ${action.id} has no sig` };
  const s = parseActionSig(action.sig);
  if (!s) return { ok: false, reason: 'bad_signature_format', message: `action ${action.id}: sig is not "<platform>#<key id>:<base64url>"` };
  const key = await resolveKey(s.keyId);
  if (!key) return { ok: false, reason: 'unknown_key', message: `action ${action.id}: ${s.platform} does not publish the key ${s.keyId}` };
  const ts = Date.parse(action.ts);
  if (Number.isNaN(ts) || ts < key.createdAt - CLOCK_SKEW_S * 1000 || ts > key.notAfter)
    return { ok: false, reason: 'key_not_valid', message: `action ${action.id}: the key ${s.keyId} was not valid at ${action.ts}` };
  const memo = `${action.hash}|${action.sig}`;
  const known = verified.get(memo);
  if (!known || !(known.publicKey === key.publicKey || known.publicKey.equals(key.publicKey)) || Date.now() - known.at > VERIFIED_TTL_MS) {
    if (!verifyEd25519(key.publicKey, actionSigningInput(action.hash), s.signature))
      return { ok: false, reason: 'bad_signature', message: `action ${action.id}: the signature does not verify with ${s.keyId}` };
    remember(memo, key.publicKey);
  }
  return { ok: true, platform: s.platform, keyId: s.keyId };
}

/**
 * What {@link verifyLog} tells an {@link OriginCheck} about the conversation at an action.
 */
export interface OriginContext {
  /** The verified state just before the action (not to be modified). */
  state: ConversationState;
  /**
   * The conversation's leader: the signer of action 1 when the log starts there, else
   * `VerifyLogOptions.leader`; null when neither is known.
   */
  leader: string | null;
}

/**
 * Decides whether `platform` may have originated `action` (a leader must not forge a remote
 * user's action). Returns null when it may, else a sentence saying why not. `ctx` is given
 * by {@link verifyLog}; pre-checks that have no state call it without.
 */
export type OriginCheck = (action: Action, platform: string, ctx?: OriginContext) => Promise<string | null> | string | null;

function remember(memo: string, publicKey: KeyObject): void {
  if (verified.size >= VERIFIED_MAX) verified.delete(verified.keys().next().value!);
  verified.set(memo, { publicKey, at: Date.now() });
}

/**
 * Batches at least this large have their signatures checked on the worker thread
 * (verify-pool.ts): below it, the hand-over (a message each way, a thread to wake: ~0.5 ms of
 * this thread's CPU and more under load, on the latency path of every push) costs about what
 * it saves — 8 signatures with node:crypto (~0.12–0.25 ms each), 64 with libsodium (~0.06 ms).
 */
const workerBatch = () => (fastEd25519() ? 64 : 8);

/**
 * Checks the Ed25519 signatures of received actions ahead of {@link verifyLog} — outside the
 * transaction that will store them, while an earlier batch is being stored, and for batches
 * of {@link workerBatch} or more on a worker thread (verify-pool.ts, the other core) — and
 * remembers the valid ones, so that verifyLog's signature step is a lookup. Invalid or
 * unverifiable signatures are not remembered: verifyLog finds and reports them. Never throws.
 */
export async function preverifySignatures(actions: readonly Action[], resolveKey: KeyResolver): Promise<void> {
  if (actions.length >= workerBatch()) {
    const jobs: SignatureJob[] = [];
    const keys: KeyObject[] = [];
    const memos: string[] = [];
    for (const a of actions) {
      if (!a || typeof a !== 'object' || typeof a.hash !== 'string' || typeof a.sig !== 'string') continue;
      const s = parseActionSig(a.sig);
      if (!s) continue;
      const key = await resolveKey(s.keyId).catch(() => null);
      if (!key) continue;
      const memo = `${a.hash}|${a.sig}`;
      const known = verified.get(memo);
      if (known && known.publicKey === key.publicKey) continue;
      jobs.push({ publicKey: publicKeyBytes(key.publicKey).toString('base64url'), message: ACTION_SIG_CONTEXT + a.hash, signature: a.sig.slice(a.sig.lastIndexOf(':') + 1) });
      keys.push(key.publicKey);
      memos.push(memo);
    }
    if (jobs.length === 0) return;
    try {
      const ok = await verifyOnWorker(jobs);
      ok.forEach((v, i) => v && remember(memos[i], keys[i]));
      return;
    } catch {
      /* no worker: verify here */
    }
  }
  for (const a of actions) {
    if (!a || typeof a !== 'object' || typeof a.hash !== 'string') continue;
    try {
      await verifySignatureOverHash(a, resolveKey);
    } catch {
      /* left to verifyLog */
    }
  }
}

/** Options of {@link verifyLog}. */
export interface VerifyLogOptions {
  /**
   * The verified state the actions continue (a replica's conversation, for a batch or a
   * backfill); default: nothing, so the first action must be `conv:create` with id 1.
   * It is not modified: verification works on a copy.
   */
  from?: ConversationState;
  /** Checks that the signer is the actor's platform (federation/runtime.ts actorOriginCheck); none by default. */
  origin?: OriginCheck;
  /**
   * The conversation's leader, for a batch continuing `from` (the platform recorded as its
   * leader): given to `origin`. A log from action 1 needs none: action 1's signer leads.
   */
  leader?: string;
}

/** The outcome of {@link verifyLog}. */
export type LogCheck =
  | { ok: true; state: ConversationState }
  | { ok: false; id: number | null; reason: ActionRejection; message: string; code?: string };

/** A deep copy of a state with nothing marked touched (verification and speculative building work on copies). */
export function cloneState(s: ConversationState): ConversationState {
  return {
    header: s.header ? { ...s.header, subject_lock: s.header.subject_lock ? { ...s.header.subject_lock } : null } : null,
    participants: new Map([...s.participants].map(([k, p]) => [k, { ...p }])),
    messages: new Map([...s.messages].map(([k, m]) => [k, { ...m, lock: m.lock ? { ...m.lock } : null, files: [...m.files] }])),
    messageOf: new Map(s.messageOf),
    touched: { header: false, participants: new Set(), messages: new Set() },
  };
}

/**
 * Verifies a received log (or a continuation of a verified one) before anything is stored:
 * for each action in order, its hash is recomputed, its `conv` is the conversation's (for
 * action 1: the key derived from creator, time and subject), its id and `prev` continue the chain,
 * its signature verifies with a key valid at its `ts`, its signer may originate it (when
 * `origin` is given), and the core reducer accepts it (follows, locks, permissions,
 * limits). The first failure rejects the whole log: the answer names that action's id
 * (null when the log itself is malformed) and the reason; nothing is partially accepted.
 * @returns the replayed state when every action passes
 */
export async function verifyLog(actions: Action[], resolveKey: KeyResolver, opts: VerifyLogOptions = {}): Promise<LogCheck> {
  if (!Array.isArray(actions) || actions.length === 0) return { ok: false, id: null, reason: 'malformed', message: 'the log is empty' };
  const state = opts.from ? cloneState(opts.from) : emptyState();
  let lastId = state.header?.last_id ?? 0;
  let lastHash = state.header?.last_hash ?? null;
  const conv = state.header?.key ?? actions[0]?.conv;
  let leader = opts.leader ?? null;
  const keyMemo = new Map<string, ReturnType<KeyResolver>>();
  const memoResolve: KeyResolver = (keyId) => {
    let p = keyMemo.get(keyId);
    if (!p) keyMemo.set(keyId, (p = resolveKey(keyId)));
    return p;
  };
  for (const a of actions) {
    if (!a || typeof a !== 'object' || !Number.isInteger(a.id) || typeof a.hash !== 'string' || typeof a.ts !== 'string')
      return { ok: false, id: null, reason: 'malformed', message: `an entry after action ${lastId} is not an action` };
    const fail = (reason: ActionRejection, message: string, code?: string): LogCheck => ({ ok: false, id: a.id, reason, message, ...(code ? { code } : {}) });
    let h: string;
    try {
      h = hashAction(a);
    } catch (e) {
      return fail('malformed', `action ${a.id} cannot be canonicalised: ${(e as Error).message}`);
    }
    if (h !== a.hash) return fail('hash_mismatch', `action ${a.id}: hash does not match its content`);
    if (a.conv !== conv) return fail('wrong_conversation', `action ${a.id} names conversation ${a.conv}, not ${conv}`);
    // The key of a published conversation derives from its first action (core/keys.ts).
    if (a.id === 1 && a.conv !== conversationKey(a.actor, a.ts, a.body ?? ''))
      return fail('wrong_conversation', `the key ${a.conv} is not derived from action 1 (creator, time, subject)`);
    if (a.id !== lastId + 1) return fail('sequence_mismatch', `action ${a.id} does not follow ${lastId}`);
    if (a.prev !== lastHash) return fail('prev_mismatch', `action ${a.id}: prev is not the hash of action ${lastId}`);
    const sig = await verifySignatureOverHash(a, memoResolve); // the hash was checked just above
    if (!sig.ok) return fail(sig.reason, sig.message);
    if (a.id === 1) leader = sig.platform; // the creator's platform leads (docs/federation.md, "Roles")
    if (opts.origin) {
      const why = await opts.origin(a, sig.platform, { state, leader });
      if (why !== null) return fail('wrong_origin', `action ${a.id}: ${why}`);
    }
    try {
      applyAction(state, a);
    } catch (e) {
      if (e instanceof AppError) return fail('rule_violation', `action ${a.id}: ${e.message}`, e.code);
      return fail('malformed', `action ${a.id}: ${(e as Error).message}`);
    }
    lastId = a.id;
    lastHash = a.hash;
  }
  return { ok: true, state };
}
