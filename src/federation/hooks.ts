/**
 * Extension points of the replication endpoints (docs/federation.md, "Replication"), called
 * by src/federation/replication-routes.ts on every push, proposal and joined log page
 * **after** the request signature is verified and the body parsed, and **before** anything
 * is verified against the conversation or stored. They call the abuse controls (issue 3 §9,
 * src/federation/abuse.ts) and the attachment transfer (issue 3 §7, src/federation/blobs.ts).
 */
import type { Action } from '../core/actions.ts';
import type { Deps } from '../context.ts';
import type { VerifiedPeer } from './http-signatures.ts';
import { checkPeerBatch as abuseCheck } from './abuse.ts';
import { fetchMissingBlobs as fetchBlobs } from './blobs.ts';

/** What a replication request carries, for the abuse checks. */
export interface PeerBatch {
  /** `push` (leader → replica), `proposal` (follower → leader) or `log` (a page fetched while joining). */
  kind: 'push' | 'proposal' | 'log';
  /** The conversation key from the URL. */
  key: string;
  /** The actions as received (not yet verified: shape, hashes and signatures unchecked). */
  actions: Action[];
  /** Size of the request body in bytes (0 for a fetched page). */
  bytes: number;
  /** The local row of the conversation (null: not here), when the caller read it already; else the check reads it. */
  conversation?: { id: number; leader: string; published: boolean } | null;
}

/**
 * Abuse controls on a verified peer's batch (allow/deny lists, rate limits per platform,
 * "a platform submits only its own users' actions for conversations they are in", sizes).
 * Throw an AppError (403, 413, 429 …) to refuse the request; nothing has been stored.
 * The replication code already enforces: batches of at most {@link MAX_PUSH_ACTIONS} actions,
 * pushes only from the conversation's leader, proposals only signed by the proposing
 * platform for actors it may speak for (origin rule) who are participants (reducer).
 */
export async function checkPeerBatch(deps: Deps, peer: VerifiedPeer | { platform: string }, batch: PeerBatch): Promise<void> {
  await abuseCheck(deps, peer, batch);
}

/**
 * Makes sure every blob named by `files` of the actions is in this platform's blob store
 * (fetched from `peer` with signed requests, size and SHA-256 checked) before the actions are
 * stored: replicated messages keep their attachments (`attachments.sha256` references
 * `blobs`). Throw an AppError to refuse the batch (nothing is stored); the sender retries.
 */
export async function fetchMissingBlobs(deps: Deps, peer: VerifiedPeer | { platform: string }, actions: Action[]): Promise<void> {
  await fetchBlobs(deps, peer, actions);
}

/** Most actions in one push, proposal or log page (the sender splits larger catch-ups). */
export const MAX_PUSH_ACTIONS = 500;
