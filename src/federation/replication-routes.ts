/**
 * Replication endpoints under `/federation/v1` (issue 3 §4–6; docs/federation.md,
 * "Replication"). Every one requires a signed request (`requirePlatform`); bodies are read
 * with `verifiedJson` after verification.
 *
 * - `POST /conversations/{key}/actions` — push: the leader sends consecutive actions;
 * - `POST /push` — the same for several conversations at once, answered per conversation;
 * - `GET  /conversations/{key}/actions?since=N&limit=M` — backfill from the leader;
 * - `GET  /conversations/{key}/log?since=N&limit=M` — the same, for a platform joining;
 * - `POST /conversations/{key}/proposals` — a follower proposes its users' actions.
 */
import type { FastifyInstance, FastifyRequest } from 'fastify';
import { sql } from 'kysely';
import { type Deps, primaryDomain } from '../context.ts';
import { conflict, forbidden, notFound } from '../platform/errors.ts';
import { findConversation, readActions } from '../conversations/store.ts';
import { checkPeerBatch, fetchMissingBlobs, MAX_PUSH_ACTIONS } from './hooks.ts';
import { checkPeerRequest } from './abuse.ts';
import { FEDERATION_CHANNEL, samePlatform } from './outbox.ts';
import { acceptProposal } from './proposals.ts';
import { batchOf, pushEntriesOf, receivePushed, receivePushEntries } from './replication.ts';
import { verifiedJson } from './routes.ts';

const err = { $ref: 'Error#' };
const KeyParams = { type: 'object', additionalProperties: false, required: ['key'], properties: { key: { type: 'string', pattern: '^[0-9a-f]{32}$' } } } as const;
const actionList = { type: 'array', items: { type: 'object', additionalProperties: true } } as const;
const rejections = { 401: { ...err, description: 'The request signature was refused (docs/federation.md, "Verification order").' } };
const BatchBody = { description: '`{"actions": [<action>, …]}`: 1 to 500 consecutive actions in wire form (docs/federation.md, "Actions on the wire").' };

/** While a replica pulls a conversation page by page, its link is not pushed for this long after each page, ms. */
const PULL_QUIET_MS = 2000;

const bodySize = (req: FastifyRequest) => (Buffer.isBuffer(req.body) ? req.body.length : 0);

/** Registers the replication routes in the federation scope (src/federation/routes.ts). */
export async function replicationRoutes(scope: FastifyInstance, deps: Deps, auth: (req: FastifyRequest) => Promise<void>): Promise<void> {
  scope.post('/conversations/:key/actions', {
    preHandler: auth,
    schema: {
      tags: ['federation'],
      summary: 'Push: the leader sends a replica consecutive actions of a conversation; answers the last id stored',
      description:
        BatchBody.description +
        ' 200 `{"last_id"}` once committed (duplicates ignored); 409 `gap` with `details.last_id` when the batch starts after it; ' +
        '422 `invalid_log` with `details.id` and `details.reason` when verification fails; 403 `not_leader` / `no_local_participant`; nothing stored on any error.',
      params: KeyParams,
      response: { 200: { type: 'object', properties: { last_id: { type: 'integer' } }, required: ['last_id'] }, 400: err, 403: err, 404: err, 409: err, 413: err, 422: err, ...rejections },
    },
  }, async (req) => {
    const key = (req.params as { key: string }).key;
    return { last_id: await receivePushed(deps, req.peer!, key, batchOf(verifiedJson(req)), bodySize(req)) };
  });

  scope.post('/push', {
    preHandler: auth,
    schema: {
      tags: ['federation'],
      summary: 'Multi-conversation push: the leader sends a replica the pending actions of several conversations in one request; answers each',
      description:
        '`{"conversations": [{"key", "actions": [<action>, …]}, …]}`: 1 to 100 conversations, each given once, at most 500 actions in all; ' +
        'each entry is taken exactly as `POST /conversations/{key}/actions` would take it. 200 `{"results": [{"key", "status", "last_id"} | {"key", "status", "error"}]}` ' +
        'in request order, once every stored entry is committed — an entry refused stores nothing and does not affect the others. ' +
        '400 `invalid_request` / 413 `batch_too_large` for the envelope (nothing stored).',
      response: {
        200: {
          type: 'object',
          required: ['results'],
          properties: {
            results: {
              type: 'array',
              items: {
                type: 'object',
                required: ['key', 'status'],
                properties: {
                  key: { type: 'string' },
                  status: { type: 'integer' },
                  last_id: { type: 'integer' },
                  error: {
                    type: 'object',
                    required: ['code', 'message'],
                    properties: { code: { type: 'string' }, message: { type: 'string' }, details: { type: 'object', additionalProperties: true } },
                  },
                },
              },
            },
          },
        },
        400: err,
        403: err,
        413: err,
        ...rejections,
      },
    },
  }, async (req) => {
    const peer = req.peer!;
    const entries = pushEntriesOf(verifiedJson(req));
    // The body limit and the allow/deny lists, once for the request (the entries are checked again, without the size).
    checkPeerRequest(deps, peer.platform, bodySize(req));
    return { results: await receivePushEntries(deps, peer, entries) };
  });

  const backfill = async (req: FastifyRequest) => {
    const peer = req.peer!;
    const key = (req.params as { key: string }).key;
    const joining = req.url.split('?')[0].endsWith('/log');
    const { since, limit } = req.query as { since: number; limit: number };
    const row = await findConversation(deps.db.kysely, key);
    if (!row || row.key !== key || !row.published) throw notFound('conversation');
    if (row.leader !== primaryDomain(deps)) throw conflict('not_leader', `this platform does not lead conversation ${key}; ${row.leader} does`, { leader: row.leader });
    const links = await sql<{ platform: string; stop_id: number | null; attempts: number; acked_id: number }>`
      select platform, stop_id, attempts, acked_id from federation_links where conv_id = ${row.id}`.execute(deps.db.kysely);
    let link: { platform: string; stop_id: number | null; attempts: number; acked_id: number } | undefined;
    for (const l of links.rows) if (await samePlatform(deps, l.platform, peer.platform)) link = l;
    if (!link) throw forbidden('not_a_participant_platform', `no participant of ${peer.platform} takes or took part in conversation ${key}`);
    const upTo = Math.min(row.last_id, link.stop_id ?? row.last_id);
    const actions = since >= upTo ? [] : await readActions(deps.db.kysely, row.id, since + 1, upTo, limit);
    // A replica asking for the actions after `since` holds 1 … since (a platform joining, /log,
    // holds nothing yet): the link's cursor may move there. While it pulls page after page,
    // the pusher leaves the link alone (it would send the same actions); once it asks for the
    // last page — or when it was backing off, unreachable — the link is due again at once.
    if (!joining && (link.attempts > 0 || since > link.acked_id)) {
      const last = since + actions.length >= upTo;
      await sql`
        update federation_links set acked_id = greatest(acked_id, ${since}), attempts = 0, last_error = null,
               next_attempt_at = now() + ${`${last ? 0 : PULL_QUIET_MS} milliseconds`}::interval, updated_at = now()
         where conv_id = ${row.id} and platform = ${link.platform}`.execute(deps.db.kysely);
      if (last) await sql`select pg_notify(${FEDERATION_CHANNEL}, '')`.execute(deps.db.kysely);
    }
    return { actions, last_id: upTo };
  };
  const BackfillQuery = {
    type: 'object',
    additionalProperties: false,
    properties: { since: { type: 'integer', minimum: 0, default: 0 }, limit: { type: 'integer', minimum: 1, maximum: MAX_PUSH_ACTIONS, default: MAX_PUSH_ACTIONS } },
  } as const;
  const backfillResponse = {
    200: { type: 'object', properties: { actions: actionList, last_id: { type: 'integer' } }, required: ['actions', 'last_id'] },
    400: err,
    403: err,
    404: err,
    409: err,
    ...rejections,
  };
  scope.get('/conversations/:key/actions', {
    preHandler: auth,
    schema: {
      tags: ['federation'],
      summary: 'Backfill: actions after `since`, oldest first, at most `limit` (≤ 500), from the leader',
      description: 'Answered only to a platform with a participant (current, or removed: up to the removal); `last_id` is the last action it may have.',
      params: KeyParams,
      querystring: BackfillQuery,
      response: backfillResponse,
    },
  }, backfill);
  scope.get('/conversations/:key/log', {
    preHandler: auth,
    schema: {
      tags: ['federation'],
      summary: 'The whole log for a platform joining a conversation, paged like the backfill (since=0 first)',
      params: KeyParams,
      querystring: BackfillQuery,
      response: backfillResponse,
    },
  }, backfill);

  scope.post('/conversations/:key/proposals', {
    preHandler: auth,
    schema: {
      tags: ['federation'],
      summary: "Proposal: a follower asks the leader to append its users' actions, built and signed on the head it knows",
      description:
        '`{"actions": [...]}` (1 to 500). 200 `{"actions", "last_id"}`: appended unchanged (or already appended: same ids and hashes); ' +
        '409 `stale_head` with `details.last_id`, `details.last_hash` and `details.actions` (what the proposer is missing); ' +
        '409 `not_leader`; 422 `invalid_log` (`details.reason` rule_violation with `details.code` the reducer\'s, wrong_origin, clock_skew, …).',
      params: KeyParams,
      response: { 200: { type: 'object', properties: { actions: actionList, last_id: { type: 'integer' } }, required: ['actions', 'last_id'] }, 400: err, 403: err, 404: err, 409: err, 413: err, 422: err, ...rejections },
    },
  }, async (req) => {
    const peer = req.peer!;
    const key = (req.params as { key: string }).key;
    const actions = batchOf(verifiedJson(req));
    await checkPeerBatch(deps, peer, { kind: 'proposal', key, actions, bytes: bodySize(req) });
    await fetchMissingBlobs(deps, peer, actions);
    return acceptProposal(deps, peer, key, actions);
  });
}
