/**
 * Attachments across platforms (issue 3 §7; docs/federation.md, "Blobs"). Messages name
 * their files by SHA-256 (`files[].sha256`, `files[].size`); the bytes travel separately:
 *
 * - `GET /federation/v1/blobs/{sha256}` (signed request) answers a blob's bytes to a
 *   platform **one of whose users can see a message naming it** — a remote participant of a
 *   published conversation, current or removed after that message, whose domain is the
 *   calling platform's (its name, or a domain discovery maps to it) — or to the **leader of a
 *   conversation this platform has a pending proposal for that names it** (the leader fetches
 *   the files of a proposal before numbering it). Anything else, and a blob this platform does
 *   not hold, is `404 not_found` (the two are indistinguishable on purpose);
 * - {@link fetchMissingBlobs} is what a receiver runs on a batch of actions before storing
 *   them: every file not in its blob store is fetched from the platform that sent the batch
 *   (else from the platform that signed the action naming it), streamed with the file's
 *   declared size as the cap, checked for size and SHA-256, and stored like an upload (blob
 *   store + `blobs` row), so the stored actions' attachments (`attachments.sha256` references
 *   `blobs`) resolve.
 */
import { Readable } from 'node:stream';
import { createHash } from 'node:crypto';
import type { FastifyInstance, FastifyRequest } from 'fastify';
import { sql } from 'kysely';
import type { Deps } from '../context.ts';
import type { Action, FileRef } from '../core/actions.ts';
import { AppError, badRequest, notFound, tooLarge } from '../platform/errors.ts';
import { checkPeerAllowed, isDomainAllowed } from './abuse.ts';
import { parseActionSig } from './action-signatures.ts';
import { federationRequest } from './client.ts';
import { DiscoveryUnavailable } from './discovery.ts';
import { federationOf } from './runtime.ts';

/** Blobs fetched at once by one {@link fetchMissingBlobs} call. */
const FETCH_CONCURRENCY = 4;
/** A blob fetch may take 30 s plus one second per 200 kB of its declared size. */
const fetchTimeoutMs = (size: number) => 30_000 + Math.ceil(size / 200_000) * 1000;

const SHA256 = /^[0-9a-f]{64}$/;

/**
 * Is `domain` served by the platform named `peer`: the same name, or discovery finds a
 * platform for the domain whose well-known name is `peer` or whose base URL is `peer`'s.
 * A domain that cannot be discovered now counts as not served (the fetch is retried).
 */
async function servedBy(deps: Deps, domain: string, peer: string): Promise<boolean> {
  if (domain === peer) return true;
  const discovery = federationOf(deps).discovery;
  try {
    const ref = await discovery.discover(domain);
    if (!ref) return false;
    if (ref.platform === peer) return true;
    const peerRef = await discovery.discover(peer);
    return !!peerRef && peerRef.url === ref.url;
  } catch (e) {
    if (e instanceof DiscoveryUnavailable) return false;
    throw e;
  }
}

/**
 * Whether this platform may give the blob `sha256` to the platform `peer` (see the module
 * comment): checked over `attachments` (indexed by sha256) and, for files a message edit
 * replaced, `messages.files`, joined with the remote participants who see that message
 * (`participants.user_id` null; `removed_id` null or after the message), and over pending
 * `federation_proposals` to `peer`. Only published conversations count.
 */
export async function blobVisibleTo(deps: Deps, sha256: string, peer: string): Promise<boolean> {
  const q = deps.db.kysely;
  const viaAttachments = await sql<{ domain: string }>`
    select distinct split_part(p.address, '@', 2) as domain
      from attachments a
      join conversations c on c.id = a.conv_id and c.published
      join participants p on p.conv_id = a.conv_id and p.user_id is null
     where a.sha256 = ${sha256} and (p.removed_id is null or a.message_id <= p.removed_id)
     limit 200`.execute(q);
  for (const { domain } of viaAttachments.rows) if (await servedBy(deps, domain, peer)) return true;

  const named = JSON.stringify([{ sha256 }]);
  const viaMessages = await sql<{ one: number }>`
    select 1 as one
      from participants p
      join conversations c on c.id = p.conv_id and c.published
      join messages m on m.conv_id = p.conv_id
     where p.user_id is null and p.address like ${'%@' + peer.replace(/[\\%_]/g, '\\$&')}
       and m.files @> ${named}::jsonb and (p.removed_id is null or m.id <= p.removed_id)
     limit 1`.execute(q);
  if (viaMessages.rows.length > 0) return true;

  try {
    const viaProposals = await sql<{ one: number }>`
      select 1 as one from federation_proposals
       where leader = ${peer} and state = 'pending' and actions @> ${JSON.stringify([{ files: [{ sha256 }] }])}::jsonb
       limit 1`.execute(q);
    return viaProposals.rows.length > 0;
  } catch (e) {
    if ((e as { code?: string }).code === '42P01') return false; // no proposals table (replication not migrated)
    throw e;
  }
}

/**
 * Registers `GET /federation/v1/blobs/{sha256}` in the federation route scope (call it where
 * `requirePlatform` guards the routes, src/federation/routes.ts).
 * Answers 200 with the bytes (`application/octet-stream`, Content-Length), 404 not_found
 * when the blob is absent or the calling platform may not see it, 401 for a bad signature.
 */
export async function blobRoutes(scope: FastifyInstance, deps: Deps, auth: (req: FastifyRequest) => Promise<void>): Promise<void> {
  scope.get('/blobs/:sha256', {
    preHandler: auth,
    schema: {
      tags: ['federation'],
      summary: "An attachment's bytes, for a platform one of whose users can see a message naming it (issue 3 §7)",
      params: { type: 'object', additionalProperties: false, required: ['sha256'], properties: { sha256: { type: 'string', pattern: '^[0-9a-f]{64}$' } } },
      response: { 401: { $ref: 'Error#' }, 403: { $ref: 'Error#' }, 404: { $ref: 'Error#' }, 429: { $ref: 'Error#' } },
    },
  }, async (req, reply) => {
    const { sha256 } = req.params as { sha256: string };
    checkPeerAllowed(deps, req.peer!.platform); // the verified peer, whatever the keyid scan before verification saw
    const size = await deps.blobs.size(sha256);
    if (size === null || !(await blobVisibleTo(deps, sha256, req.peer!.platform))) throw notFound('blob', { sha256 });
    reply.header('content-type', 'application/octet-stream');
    reply.header('content-length', String(size));
    reply.header('cache-control', 'private, max-age=31536000, immutable');
    return reply.send(deps.blobs.read(sha256));
  });
}

/** A file to fetch, with the platforms that may have it, in order of preference. */
interface Wanted {
  file: FileRef;
  sources: string[];
}

/** What {@link fetchMissingBlobs} did. */
export interface FetchedBlobs {
  /** SHA-256 of each blob fetched and stored now. */
  fetched: string[];
  /** Files named that were already here. */
  present: number;
}

/**
 * Makes sure every file named by `actions` (`files` of message:add and message:modify) is in
 * this platform's blob store before they are stored (issue 3 §7). Each missing blob is fetched
 * with a signed `GET /federation/v1/blobs/{sha256}` from `peer` (the platform that sent the
 * actions: the leader of a push, the proposer of a proposal), else from the platform that
 * signed the action naming it; its body is streamed with the declared `size` as the cap (a
 * longer body is cut off), then its size and SHA-256 must match the declaration; it is stored
 * in the blob store (complete or absent) and in `blobs`. Platforms the allow/deny lists exclude
 * are not asked. Run it after the batch verified (so a refused batch costs no downloads) and
 * before the transaction that stores it.
 * @param peer the platform the actions came from
 * @returns the blobs fetched and the count already present
 * @throws AppError 400 invalid_file (a file entry without a 64-hex sha256 or an integer size ≥ 0),
 *   413 too_large (a declared size above this platform's largest attachment or email),
 *   422 invalid_blob (a source sent other bytes than declared: details {sha256, reason}),
 *   503 blob_unavailable (no source could give it now: details {sha256, tried}) — the sender
 *   retries later; nothing of the batch is stored either way
 */
export async function fetchMissingBlobs(deps: Deps, peer: { platform: string }, actions: readonly Action[]): Promise<FetchedBlobs> {
  const maxBytes = Math.max(deps.config.maxAttachmentBytes, deps.config.maxMessageBytes);
  const wanted = new Map<string, Wanted>();
  for (const a of actions) {
    if (!a || !Array.isArray(a.files)) continue;
    const origin = parseActionSig(a.sig)?.platform;
    for (const f of a.files as FileRef[]) {
      if (!f || typeof f.sha256 !== 'string' || !SHA256.test(f.sha256) || !Number.isSafeInteger(f.size) || f.size < 0)
        throw badRequest('invalid_file', `action ${a.id}: a file needs a 64-hex sha256 and an integer size ≥ 0`, { id: a.id });
      if (f.size > maxBytes) throw tooLarge(`action ${a.id}: file ${f.sha256} is larger than ${maxBytes} bytes`, { id: a.id, sha256: f.sha256, max_bytes: maxBytes });
      let w = wanted.get(f.sha256);
      if (!w) wanted.set(f.sha256, (w = { file: f, sources: [peer.platform] }));
      else if (w.file.size !== f.size)
        throw badRequest('invalid_file', `file ${f.sha256} is declared with two sizes (${w.file.size}, ${f.size})`, { sha256: f.sha256 });
      if (origin && !w.sources.includes(origin)) w.sources.push(origin);
    }
  }
  if (wanted.size === 0) return { fetched: [], present: 0 };
  const rows = await deps.db.kysely.selectFrom('blobs').select(['sha256']).where('sha256', 'in', [...wanted.keys()]).execute();
  const known = new Set(rows.map((r) => r.sha256));
  const missing: Wanted[] = [];
  let present = 0;
  for (const [sha, w] of wanted) {
    if (known.has(sha) && deps.blobs.has(sha)) present++;
    else missing.push(w);
  }
  const fetched: string[] = [];
  let next = 0;
  const worker = async () => {
    while (next < missing.length) {
      const w = missing[next++];
      await fetchOne(deps, w, known.has(w.file.sha256));
      fetched.push(w.file.sha256);
    }
  };
  await Promise.all(Array.from({ length: Math.min(FETCH_CONCURRENCY, missing.length) }, worker));
  return { fetched, present };
}

/** Why a source's answer was not the declared blob. */
class BlobMismatch extends Error {}

async function fetchOne(deps: Deps, w: Wanted, rowExists: boolean): Promise<void> {
  const { sha256, size } = w.file;
  const tried: string[] = [];
  for (const source of w.sources) {
    if (!isDomainAllowed(deps.config, source)) continue;
    let res: Response | null;
    try {
      res = await federationRequest(deps, source, `/federation/v1/blobs/${sha256}`, { method: 'GET', timeoutMs: fetchTimeoutMs(size) });
    } catch (e) {
      tried.push(`${source}: ${(e as Error).message}`);
      continue;
    }
    if (!res) {
      tried.push(`${source}: no Parley platform`);
      continue;
    }
    if (res.status !== 200 || !res.body) {
      await res.body?.cancel().catch(() => {});
      tried.push(`${source}: HTTP ${res.status}`);
      continue;
    }
    const declared = Number(res.headers.get('content-length') ?? NaN);
    if (Number.isFinite(declared) && declared !== size) {
      await res.body.cancel().catch(() => {});
      throw new AppError(422, 'invalid_blob', `${source} answered ${declared} bytes for file ${sha256} declared with ${size}`, { sha256, reason: 'size_mismatch', from: source });
    }
    // Checked while streaming: the blob store keeps the bytes only if this generator ends
    // normally, i.e. with exactly `size` bytes hashing to `sha256`.
    const body = res.body;
    async function* checked() {
      const hash = createHash('sha256');
      let n = 0;
      for await (const chunk of body as unknown as AsyncIterable<Uint8Array>) {
        n += chunk.byteLength;
        if (n > size) throw new BlobMismatch(`more than the declared ${size} bytes`);
        hash.update(chunk);
        yield chunk;
      }
      if (n !== size) throw new BlobMismatch(`${n} bytes instead of the declared ${size}`);
      if (hash.digest('hex') !== sha256) throw new BlobMismatch('the bytes do not hash to the declared SHA-256');
    }
    try {
      await deps.blobs.putStream(Readable.from(checked()), size);
    } catch (e) {
      await body.cancel().catch(() => {});
      if (e instanceof BlobMismatch) throw new AppError(422, 'invalid_blob', `${source} sent file ${sha256} with ${e.message}`, { sha256, reason: e.message, from: source });
      if (e instanceof AppError) throw e;
      tried.push(`${source}: ${(e as Error).message}`);
      continue;
    }
    if (!rowExists)
      await deps.db.kysely
        .insertInto('blobs')
        .values({ sha256, size, content_type: contentTypeOf(w.file), uploaded_by: null })
        .onConflict((oc) => oc.column('sha256').doNothing())
        .execute();
    deps.log.debug({ sha256, size, from: source }, 'federation blob fetched');
    return;
  }
  throw new AppError(503, 'blob_unavailable', `file ${sha256} could not be fetched now (${tried.join('; ') || 'no allowed source'})`, { sha256, tried });
}

function contentTypeOf(f: FileRef): string {
  const t = typeof f.content_type === 'string' ? f.content_type.toLowerCase().slice(0, 255) : '';
  return /^[\w.+-]+\/[\w.+-]+$/.test(t) ? t : 'application/octet-stream';
}
