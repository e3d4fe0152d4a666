/**
 * `ingestEmail` — the command that turns one received email into conversation actions
 * (issue 2 §6 "Inbound"; used by the SMTP server and by `parley import`, one code path).
 *
 * Steps:
 * 1. **Keep the raw message.** Its bytes go to the blob store (fsynced, while steps 2–3
 *    run) before anything is committed. Its `inbound_emails` row is committed in the same
 *    transaction as its conversation (step 4) — or, when that transaction fails or the
 *    message cannot be parsed, committed alone first (status `received`) and then marked
 *    `failed` with the reason. Either way the raw message is committed before the SMTP
 *    server answers 250, and a message that cannot be used is never lost.
 * 2. **Parse** with `parseEmail` (tolerant; only an empty message fails).
 * 3. **Authenticate** SPF/DKIM/DMARC with `authenticateEmail` (SMTP only; the resolver of
 *    src/mail/dns.ts, `offlineResolver` when `config.dnsOffline`). Results other than
 *    pass/none become warnings on the message (`source.warnings`) next to the parser's.
 *    Imported mail is not authenticated: it was received long ago, DNS answers of today
 *    say nothing about it.
 *
 * **Time.** Every action is stamped with the platform's clock when it is created — for an
 * import too, not with the email's `Date`: a replica judges an action's signature by the
 * signing key's validity at its `ts` (docs/federation.md), so history stamped before the
 * key existed could never be replicated. The email's `Date` is kept in the message's
 * `source.date`, and an imported message orders its conversation in its local
 * participants' lists by that date (`participants.last_event_ts`), as the archive did.
 * 4. **Thread or create**, in ONE transaction with the `email_messages` rows and the
 *    `inbound_emails` status update (see {@link ingestEmail} for the rules).
 *
 * **Batches** ({@link prepareEmail} + {@link commitEmails}): several prepared messages are
 * committed in ONE transaction — their `inbound_emails` rows (raw message) inserted by one
 * statement, then each message threaded or created in turn (a later message sees what an
 * earlier one of the batch recorded). The rows of their appends are buffered (group-commit.ts
 * bufferWrites) and, with every message's closing work (Message-IDs recorded, inbound rows
 * marked), written by two statements for the whole batch ({@link settle}) — earlier when a
 * message is about to read a conversation that a pending one changed — and the stream
 * events of all of them by one statement before the single COMMIT. The raw message is then committed together with
 * its conversation, which is still "before 250": nothing is acknowledged before that
 * COMMIT. If a message fails the batch, the transaction rolls back, that message goes
 * through the one-message path (raw row committed first, retries, `failed` with the
 * reason) and the others are tried again as a batch (a few times at most, then one by
 * one too), so one bad message never loses or fails the others. `parley import`
 * commits its messages in batches; the SMTP server batches messages that arrive together
 * for the same recipients (src/mail/inbound/smtp-server.ts).
 */
import { sql } from 'kysely';
import type { Action, ActionInput, ActionSource, FileRef } from '../../core/actions.ts';
import { LIMITS, sealAction } from '../../core/actions.ts';
import { applyAction, referencedMessages } from '../../core/reducer.ts';
import { signActions } from '../../federation/action-signatures.ts';
import { ingestLockKey } from './ingest-lock.ts';
import { isoTime } from '../../platform/clock.ts';
import { type Deps, isLocalAddress, primaryDomain } from '../../context.ts';
import { appendActions, checkFiles, cleanInput, noteUsers, resolveLocalUsers, storeActions } from '../../conversations/append.ts';
import { insertNewConversation } from '../../conversations/commands/create-conversation.ts';
import { type ConversationRow, loadedParticipantRows, loadState, preloadParticipants } from '../../conversations/store.ts';
import type { Clock } from '../../platform/clock.ts';
import { AppError } from '../../platform/errors.ts';
import type { Tx } from '../../store/db.ts';
import type { ParticipantsTable } from '../../store/schema.ts';
import type { Selectable } from 'kysely';
import { isUniqueViolation, transaction } from '../../store/db.ts';
import { bufferWrites, flushWrites } from '../../store/group-commit.ts';
import type { EmailAuthentication } from '../authenticate.ts';
import { noteActiveKeyId } from '../../federation/keys.ts';
import { createResolver, type MailResolver, offlineResolver } from '../dns.ts';
import { normalizeAddress } from '../address.ts';
import { parseOutboundMessageId, suppressEmails, withholdEmails } from '../outbound/enqueue.ts';
import { type ParsedEmail, parseEmail } from '../parse.ts';
import { noteConversationOrg } from '../../organisations/replies.ts';
import { replyKeyOf } from './recipients.ts';

/** The SMTP envelope of a message (RFC 5321 §3.3): reverse-path, forward-paths, client. */
export interface Envelope {
  /** MAIL FROM address without angle brackets; '' for the null reverse-path (bounces) or an import. */
  mailFrom: string;
  /** RCPT TO addresses: local users and `reply+<key>@` addresses (the SMTP server checked them). */
  rcptTo: string[];
  /** Client IP address; '' for an import. */
  remoteIp: string;
  /** EHLO/HELO name; '' for an import. */
  helo: string;
}

/** How a message reaches {@link ingestEmail}. */
export interface IngestOptions {
  /**
   * `smtp` (default): authenticated with SPF/DKIM/DMARC. `import`: not authenticated, no
   * outbound email at all (an archive is history: nobody is mailed because of it), and the
   * conversation ordered by the message's Date in its local participants' lists. Either
   * way actions are stamped with the time of receipt/import; the Date is `source.date`.
   */
  mode?: 'smtp' | 'import';
  /** DNS resolver for authentication; default: `offlineResolver` when config.dnsOffline, else a shared `createResolver` (config.dnsTimeoutMs). */
  resolver?: MailResolver;
}

/** What {@link ingestEmail} did with a message. */
export interface IngestResult {
  /** Id of the `inbound_emails` row holding the raw message. */
  inboundId: number;
  /**
   * `ingested`: added to at least one conversation; `duplicate`: every recipient already had
   * it (same Message-ID — or, without one, the same bytes — already recorded), nothing added;
   * `failed`: kept raw only, see `reason`.
   */
  status: 'ingested' | 'duplicate' | 'failed';
  /** Keys of the conversations the message started. */
  created: string[];
  /** Keys of existing conversations the message was added to. */
  threaded: string[];
  /** Why it failed (or why it is a duplicate), a sentence for logs and SMTP replies. */
  reason?: string;
  /**
   * For `failed`: true when the message itself is the problem (retrying cannot help: SMTP
   * answers 5xx), false for an internal error (SMTP answers 451, the sender retries).
   */
  permanent?: boolean;
}

/** Most attempts of the ingest transaction (conversation key collisions, deadlocks, serialization failures). */
const MAX_ATTEMPTS = 8;
/** Most times a batch is tried again without the message that failed it (ingest-email `commitEmails`). */
const MAX_BATCH_FAILURES = 4;
/** Longest attachment file name kept, in characters (the core limit). */
const MAX_FILE_NAME = 255;

let sharedResolver: MailResolver | null = null;
/** The platform's resolver: `offlineResolver` when config.dnsOffline, else one per process with the configured timeout and a small cache. */
function resolverFor(deps: Deps): MailResolver {
  if (deps.config.dnsOffline) return offlineResolver;
  sharedResolver ??= createResolver({ timeoutMs: deps.config.dnsTimeoutMs });
  return sharedResolver;
}

/** A failure caused by the message (permanent), as opposed to an internal error. */
class Unprocessable extends Error {}

/**
 * Ingests one received email (see the module comment for the steps).
 *
 * Threading and creation rules:
 * - The **local recipients** are the envelope recipients that are local users; a
 *   `reply+<key>@` recipient names its conversation directly.
 * - **Duplicate**: a local recipient is done when the Message-ID is already recorded in
 *   `email_messages` (received or sent) for a conversation they actively take part in; a
 *   reply address when it is recorded for its conversation. Without a Message-ID, when an
 *   earlier ingested message with the same raw SHA-256 had them as a recipient. When every
 *   recipient is done the status is `duplicate` and nothing is added (importing twice adds
 *   nothing; a retried SMTP delivery adds nothing).
 * - **Thread**: for each other local recipient, the conversation they actively take part
 *   in that recorded one of the In-Reply-To ids (first) or References ids (latest first);
 *   a reply address's conversation. A local recipient who takes part in a reply address's
 *   conversation is covered by it.
 * - In each such conversation the sender (From, else Sender, else MAIL FROM) adds a
 *   `message:add`. A sender who is not a participant yet is first added (`participant:add`,
 *   perms `write`) by — the rule — the first local recipient of that conversation who is an
 *   active participant with write permission, else its creator if active with write
 *   permission, else its earliest-added such participant.
 * - **Create**: the local recipients left (no thread; a Bcc'd local user who is not a
 *   participant of the replied conversation ends here too, so Bcc never discloses history)
 *   get one new published conversation: creator the sender, participants the To and Cc
 *   addresses (local ones only when they are existing users not already covered above;
 *   reply addresses never) plus those recipients, subject, the message.
 * - The message body is the new text (`parseEmail().newText`); the quoted history is kept
 *   in `source.quoted`; attachments and inline parts become blobs and `files`.
 * - The Message-ID is recorded (`email_messages`, direction `in`, with the action id) for
 *   every conversation touched.
 * - Outbound email caused by ingesting: none for the new conversation (its recipients have
 *   the email) nor for adding the sender; a threaded message is emailed to the email
 *   participants not among its To/Cc; an import emails nobody.
 *
 * @param raw the message as received (RFC 5322 bytes)
 * @returns what happened; a `failed` result keeps the raw message
 * @throws Error only when the raw message could not be stored (nothing was acknowledged:
 *   SMTP answers 451)
 */
export async function ingestEmail(deps: Deps, raw: Buffer, envelope: Envelope, opts: IngestOptions = {}): Promise<IngestResult> {
  const [r] = await commitEmails(deps, [await prepareEmail(deps, raw, envelope, opts)]);
  if (r.status === 'rejected') throw r.reason;
  return r.value;
}

/**
 * A message made ready for {@link commitEmails}: raw bytes in the blob store (fsynced),
 * parsed, authenticated (SMTP), attachments in the blob store. Nothing is in the database yet.
 */
export interface PreparedEmail {
  raw: Buffer;
  /** SHA-256 of the raw bytes (their blob). */
  sha256: string;
  envelope: Envelope;
  mode: 'smtp' | 'import';
  /** Why the message cannot be ingested (it is then kept raw as `failed` with this reason); null when it can. */
  problem: { reason: string; permanent: boolean } | null;
  parsed: ParsedEmail | null;
  message: MessageParts | null;
  files: FileRef[];
  auth: EmailAuthentication | null;
}

/**
 * Steps 1–3 of {@link ingestEmail} that need no database: stores the raw bytes (blob),
 * parses, authenticates (SMTP mode) and stores attachments. A message that cannot be
 * parsed, or whose attachments cannot be stored, is returned with `problem` set.
 * @throws Error only when the raw bytes could not be stored (nothing was acknowledged)
 */
export async function prepareEmail(deps: Deps, raw: Buffer, envelope: Envelope, opts: IngestOptions = {}): Promise<PreparedEmail> {
  const mode = opts.mode ?? 'smtp';
  // The raw bytes are stored while the message is parsed and authenticated: the blob
  // store's fsyncs wait for the disk (≈ 3–8 ms here) while parsing keeps the CPU busy.
  // Both are done before the message is returned, so nothing is committed (or answered)
  // before the raw message is durable.
  const storing = deps.blobs.put(raw);
  storing.catch(() => {}); // awaited below; its failure must not count as unhandled meanwhile
  let parsed: ParsedEmail | null = null;
  let problem: PreparedEmail['problem'] = null;
  let auth: EmailAuthentication | null = null;
  try {
    parsed = await parseEmail(raw);
  } catch (e) {
    problem = { reason: `the message could not be parsed: ${(e as Error).message}`, permanent: true };
  }
  if (parsed !== null && mode === 'smtp') {
    // Loaded on first use: `parley import` never authenticates, and mailauth is slow to load.
    const { authenticateEmail } = await import('../authenticate.ts');
    auth = await authenticateEmail(
      raw,
      { ip: envelope.remoteIp, helo: envelope.helo, mailFrom: envelope.mailFrom, mta: deps.config.domains[0] },
      opts.resolver ?? resolverFor(deps),
    );
  }
  const { sha256 } = await storing;
  const p: PreparedEmail = { raw, sha256, envelope, mode, problem, parsed, message: null, files: [], auth };
  if (parsed === null) return p;
  try {
    const files = await storeAttachments(deps, parsed);
    p.files = files.refs;
    p.message = buildMessage(parsed, auth, files.warnings);
  } catch (e) {
    p.problem = classify(deps, e, null);
    return p;
  }
  return p;
}

/**
 * Step 4 for prepared messages: commits them in one transaction (see the module comment,
 * "Batches"; a single message too: its raw row then commits with its conversation, one
 * commit instead of two) — and every message that failed the batch (or could not be
 * parsed) one by one as {@link ingestEmail} describes: raw row committed first.
 * @returns one outcome per message, in the same order: its result, or (rejected) the
 *   error that kept its raw message from being recorded — nothing was acknowledged for it
 */
export async function commitEmails(deps: Deps, prepared: PreparedEmail[]): Promise<PromiseSettledResult<IngestResult>[]> {
  const results: (PromiseSettledResult<IngestResult> | null)[] = prepared.map(() => null);
  let batch = prepared.map((p, i) => ({ p, i })).filter(({ p }) => p.problem === null);
  // A message that fails the batch is taken out (it goes alone, below) and the batch is
  // tried again without it; after MAX_BATCH_FAILURES every message left goes alone.
  for (let failures = 0; batch.length > 0 && failures < MAX_BATCH_FAILURES; failures++) {
    const at = { index: -1 };
    try {
      const done = await transaction(deps.db, (tx) => commitBatch(tx, deps, batch.map(({ p }) => p), at));
      batch.forEach(({ i }, k) => (results[i] = { status: 'fulfilled', value: done[k] }));
      break;
    } catch (e) {
      deps.log.debug({ err: e, messages: batch.length, failedAt: at.index }, 'inbound batch rolled back');
      if (at.index < 0) break; // not one message's fault (e.g. the commit): each goes alone
      batch = batch.filter((_, k) => k !== at.index);
    }
  }
  for (let i = 0; i < prepared.length; i++) {
    if (results[i]) continue;
    try {
      results[i] = { status: 'fulfilled', value: await commitOne(deps, prepared[i]) };
    } catch (e) {
      results[i] = { status: 'rejected', reason: e };
    }
  }
  return results as PromiseSettledResult<IngestResult>[];
}

/** One prepared message alone: the raw row committed first, then the ingest transaction (retried), else `failed`. */
async function commitOne(deps: Deps, p: PreparedEmail): Promise<IngestResult> {
  const inboundId = await storeRaw(deps, p.sha256, p.raw.length, p.envelope);
  const fail = async (reason: string, permanent: boolean): Promise<IngestResult> => {
    await deps.db.kysely
      .updateTable('inbound_emails')
      .set({ status: 'failed', error: reason.slice(0, 2000) })
      .where('id', '=', inboundId)
      .execute()
      .catch((e) => deps.log.error({ err: e, inboundId }, 'could not mark inbound email as failed'));
    return { inboundId, status: 'failed', created: [], threaded: [], reason, permanent };
  };
  if (p.problem) return fail(p.problem.reason, p.problem.permanent);
  try {
    for (let attempt = 1; ; attempt++) {
      try {
        const attemptDeps: Deps = attempt === 1 ? deps : { ...deps, clock: offsetClock(deps.clock, attempt) };
        return await transaction(deps.db, async (tx) => {
          bufferWrites(tx);
          const pending = newPending();
          const r = await applyEmail(tx, attemptDeps, { ...contextOf(p, inboundId), pending });
          await settle(tx, pending, true);
          return r;
        });
      } catch (e) {
        if (attempt < MAX_ATTEMPTS && isRetryable(e)) continue;
        throw e;
      }
    }
  } catch (e) {
    const { reason, permanent } = classify(deps, e, inboundId);
    return fail(reason, permanent);
  }
}

/**
 * The batch transaction: every raw row in one statement; every message's Message-ID lock
 * (in key order: batches never deadlock on them), the users among all recipients and the
 * active signing key's id in another; the recorded emails that every message names
 * (duplicates and threads, {@link lookupKnown}) in a third, once the locks are held; then
 * each message in turn. `at.index` tells which message threw.
 */
async function commitBatch(tx: Tx, deps: Deps, batch: PreparedEmail[], at: { index: number }): Promise<IngestResult[]> {
  bufferWrites(tx);
  const keys = uniq(batch.map((p) => lockKeyOf(p.parsed!, p.sha256))).sort();
  const addresses = uniq(batch.flatMap((p) => userAddressesOf(deps, p.envelope)));
  // The raw rows (blobs and `received` inbound rows, ids drawn in batch order: the ORDER BY)
  // are inserted by the same statement.
  const r = await sql<{ ids: string[] | number[]; users: [string, number][]; key_id: string | null }>`
    with b as (insert into blobs (sha256, size, content_type)
                 select distinct t.s, t.z, 'message/rfc822' from unnest(${batch.map((p) => p.sha256)}::text[], ${batch.map((p) => p.raw.length)}::bigint[]) as t(s, z)
                 on conflict do nothing),
         i as (insert into inbound_emails (raw_sha256, mail_from, rcpt_to, remote_ip, helo, status)
               select t.s, t.f, array(select jsonb_array_elements_text(t.r)), t.ip, t.h, 'received'
                 from unnest(${batch.map((p) => p.sha256)}::text[], ${batch.map((p) => p.envelope.mailFrom)}::text[],
                             ${batch.map((p) => JSON.stringify(p.envelope.rcptTo))}::jsonb[], ${batch.map((p) => p.envelope.remoteIp)}::text[],
                             ${batch.map((p) => p.envelope.helo)}::text[]) with ordinality as t(s, f, r, ip, h, o)
                order by t.o
               returning id)
    select (select array_agg(id order by id) from i) as ids,
           (select coalesce(json_agg(json_build_array(address, id)), '[]') from users where address = any(${addresses}::text[])) as users,
           (select key_id from platform_keys where retired_at is null limit 1) as key_id
      from (select count(pg_advisory_xact_lock(hashtextextended(s.k, 0)))
              from (select k from unnest(${keys}::text[]) as k order by k) s) l`.execute(tx);
  const ids = (r.rows[0].ids ?? []).map(Number);
  if (ids.length !== batch.length) throw new Error(`inserted ${ids.length} inbound rows for ${batch.length} messages`);
  // Signing the batch's actions then needs no read of platform_keys per append (keys.ts).
  if (r.rows[0].key_id) noteActiveKeyId(tx, r.rows[0].key_id);
  const users = new Set(r.rows[0].users.map(([address]) => address));
  // Creating a conversation then reads none of these users again (append.ts resolveLocalUsers).
  noteUsers(tx, r.rows[0].users);
  // A statement of its own: it must see what other transactions committed while this one waited for the locks.
  const rows = await lookupKnown(tx, uniq(batch.flatMap((p) => lookupIdsOf(p.parsed!).lookup)), [...users]);
  const prefetched: Prefetched = { byMessageId: new Map(), recordedIds: new Set(), touched: new Set() };
  for (const row of rows) {
    const list = prefetched.byMessageId.get(row.message_id);
    if (list) list.push(row);
    else prefetched.byMessageId.set(row.message_id, [row]);
  }
  const out: IngestResult[] = [];
  const pending = newPending();
  for (let k = 0; k < batch.length; k++) {
    at.index = k;
    out.push(await applyEmail(tx, deps, { ...contextOf(batch[k], ids[k]), users, prefetched, pending }));
  }
  at.index = -1;
  await settle(tx, pending, true);
  return out;
}

/** A recorded email (`email_messages`) with a local recipient's active participation in its conversation (`address`, else null). */
interface KnownRow {
  conv_id: number;
  message_id: string;
  key: string;
  published: boolean;
  address: string | null;
}

/** What a batch read of {@link lookupKnown} holds, and what the batch changed since (so a message knows when to read again). */
interface Prefetched {
  byMessageId: Map<string, KnownRow[]>;
  /** Message-IDs recorded by earlier messages of the batch. */
  recordedIds: Set<string>;
  /** Conversations earlier messages of the batch created or added to. */
  touched: Set<number>;
}

/** The Message-ID (storable) and the ids looked up for a message: its own, then In-Reply-To, then References latest first (at most 200). */
function lookupIdsOf(parsed: ParsedEmail): { mid: string | null; ids: string[]; lookup: string[] } {
  const mid = parsed.messageId === null ? null : storableText(parsed.messageId);
  const ids = uniq([...parsed.inReplyTo, ...[...parsed.references].reverse()].map(storableText))
    .filter((id) => id !== mid)
    .slice(0, 200);
  return { mid, ids, lookup: mid !== null ? [mid, ...ids] : ids };
}

/**
 * Every recorded email with one of these Message-IDs, with each of `locals` who actively
 * takes part in its conversation (one row each, or one row with a null address). A
 * Message-ID of the form another Parley platform gives its emails (outbound/enqueue.ts
 * outboundMessageId: `<key>.<action id>@<domain>`) counts as recorded for the conversation
 * of that key when its leader is that domain: a follower never saw the emails its leader
 * sent to the email participants, yet a reply-all to one reaches the follower's users and
 * must thread there, to be proposed to the leader (issue 3 §8).
 */
async function lookupKnown(tx: Tx, lookup: string[], locals: string[]): Promise<KnownRow[]> {
  if (lookup.length === 0) return [];
  const sent = lookup.flatMap((id) => {
    const p = parseOutboundMessageId(id);
    return p ? [{ id, ...p }] : [];
  });
  // parley_known_emails (migration 036): the recorded emails, planned with index scans whatever the tables' size.
  if (sent.length > 0) {
    const r = await sql<KnownRow>`
      select * from parley_known_emails(${lookup}::text[], ${locals}::text[])
      union
      select cv.id, x.id, cv.key, cv.published, p.address
        from unnest(${sent.map((x) => x.id)}::text[], ${sent.map((x) => x.key)}::text[], ${sent.map((x) => x.domain)}::text[]) as x(id, key, domain)
        join conversations cv on cv.key = x.key and cv.leader = x.domain
        left join participants p on p.conv_id = cv.id and p.address = any(${locals}::text[]) and p.removed_id is null`.execute(tx);
    return r.rows;
  }
  const r = await sql<KnownRow>`select * from parley_known_emails(${lookup}::text[], ${locals}::text[])`.execute(tx);
  return r.rows;
}

function contextOf(p: PreparedEmail, inboundId: number): Omit<IngestContext, 'pending'> {
  return {
    inboundId,
    sha256: p.sha256,
    envelope: p.envelope,
    parsed: p.parsed!,
    message: p.message!,
    files: p.files,
    auth: p.auth,
    quiet: p.mode === 'import',
  };
}

/** Why an ingest failed, and whether retrying can help (internal errors are logged). */
function classify(deps: Deps, e: unknown, inboundId: number | null): { reason: string; permanent: boolean } {
  if (e instanceof Unprocessable) return { reason: e.message, permanent: true };
  if (e instanceof AppError && e.status < 500) return { reason: `${e.message} (${e.code})`, permanent: true };
  if (isDataError(e)) return { reason: `the message's content could not be stored: ${(e as Error).message}`, permanent: true };
  deps.log.error({ err: e, inboundId }, 'inbound email ingest failed');
  return { reason: `internal error: ${(e as Error).message}`, permanent: false };
}

/** Records a raw message (already in the blob store): blobs row and the `received` row, committed, in one statement. */
async function storeRaw(deps: Deps, sha256: string, size: number, envelope: Envelope): Promise<number> {
  const r = await sql<{ id: number }>`
    with b as (insert into blobs (sha256, size, content_type) values (${sha256}, ${size}, 'message/rfc822') on conflict do nothing)
    insert into inbound_emails (raw_sha256, mail_from, rcpt_to, remote_ip, helo, status)
    values (${sha256}, ${envelope.mailFrom}, ${envelope.rcptTo}::text[], ${envelope.remoteIp}, ${envelope.helo}, 'received')
    returning id`.execute(deps.db.kysely);
  return r.rows[0].id;
}

/** Attachments and inline parts written to the blob store (rows are inserted in the transaction). */
async function storeAttachments(deps: Deps, parsed: ParsedEmail): Promise<{ refs: FileRef[]; warnings: string[] }> {
  const warnings: string[] = [];
  let parts = parsed.attachments;
  if (parts.length > LIMITS.filesPerMessage) {
    warnings.push(`The message has ${parts.length} attachments; only the first ${LIMITS.filesPerMessage} are kept (the raw message has them all)`);
    parts = parts.slice(0, LIMITS.filesPerMessage);
  }
  const refs: FileRef[] = [];
  for (const p of parts) {
    const { sha256, size } = await deps.blobs.put(p.content);
    refs.push({
      sha256,
      name: shortName(storableText(p.filename)),
      content_type: storableText(p.contentType.slice(0, 255)),
      size,
      ...(p.contentId ? { content_id: storableText(p.contentId.slice(0, 998)) } : {}),
      ...(p.inline ? { inline: true } : {}),
    });
  }
  return { refs, warnings };
}

/** A file name of at most 255 characters, keeping its extension. */
function shortName(name: string): string {
  if (name.length <= MAX_FILE_NAME) return name;
  const dot = name.lastIndexOf('.');
  const ext = dot > 0 && name.length - dot <= 16 ? name.slice(dot) : '';
  return name.slice(0, MAX_FILE_NAME - ext.length) + ext;
}

/** The message:add body and its source. */
interface MessageParts {
  body: string;
  source: ActionSource;
}

function buildMessage(parsed: ParsedEmail, auth: EmailAuthentication | null, extraWarnings: string[]): MessageParts {
  const warnings = [...parsed.warnings, ...(auth?.warnings ?? []), ...extraWarnings].map(storableText);
  let body = storableText(parsed.newText).trimEnd();
  if (body.length > LIMITS.bodyChars) {
    warnings.push(`The text is longer than ${LIMITS.bodyChars} characters and was cut; the raw message is kept whole`);
    body = body.slice(0, LIMITS.bodyChars);
  }
  let quoted = parsed.quoted === null ? null : storableText(parsed.quoted);
  if (quoted !== null && quoted.length > LIMITS.bodyChars) quoted = quoted.slice(0, LIMITS.bodyChars);
  const recipients = [...new Set([...parsed.to, ...parsed.cc].map((m) => m.address))];
  const at = parsed.date?.getTime();
  const date = at !== undefined && Number.isFinite(at) ? new Date(at).toISOString() : null;
  return {
    body,
    source: { kind: 'email', message_id: parsed.messageId === null ? null : storableText(parsed.messageId), warnings, quoted, recipients, date },
  };
}

/** An imported message's place in its participants' lists: its Date, never later than now; null without a Date. */
function sortTime(date: Date | null, clock: Clock): string | null {
  const at = date?.getTime();
  return at !== undefined && Number.isFinite(at) ? new Date(Math.min(at, clock.now())).toISOString() : null;
}

/** A retry's clock: a conversation key includes the publish time, so a collision retries a few ms later. */
function offsetClock(clock: Clock, attempt: number): Clock {
  const offset = attempt + Math.floor(Math.random() * 1000);
  return { now: () => clock.now() + offset };
}

/** A PostgreSQL error caused by the data itself (SQLSTATE class 22 data exception, 54 program limit exceeded). */
function isDataError(e: unknown): boolean {
  const code = (e as { code?: unknown })?.code;
  return typeof code === 'string' && /^(22|54)[0-9A-Z]{3}$/.test(code);
}

/** Text PostgreSQL can store: no NUL characters, no unpaired UTF-16 surrogates (both become U+FFFD). */
export function storableText(s: string): string {
  return s.replace(/\u0000|[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/g, '\uFFFD');
}

/** Key collision (conversation key taken), deadlock, serialization failure, or a Message-ID raced in. */
function isRetryable(e: unknown): boolean {
  if (e instanceof AppError) return e.code === 'key_taken';
  const code = (e as { code?: string })?.code;
  return code === '40P01' || code === '40001' || isUniqueViolation(e);
}

interface IngestContext {
  inboundId: number;
  /** Set in a batch: the users among the batch's recipients, the Message-ID locks already held. */
  users?: Set<string>;
  /** Set in a batch: the recorded emails the batch's messages name, read once for all (commitBatch). */
  prefetched?: Prefetched;
  sha256: string;
  envelope: Envelope;
  parsed: ParsedEmail;
  message: MessageParts;
  files: FileRef[];
  auth: EmailAuthentication | null;
  /** No outbound email at all (import). */
  quiet: boolean;
  /** What earlier messages of the transaction left to write ({@link settle}); this one adds to it. */
  pending: Pending;
}

/**
 * The lock that makes ingests of one message serial (its Message-ID, else its raw bytes):
 * a message delivered twice at once is recorded once.
 */
function lockKeyOf(parsed: ParsedEmail, sha256: string): string {
  return ingestLockKey(parsed.messageId === null ? sha256 : storableText(parsed.messageId));
}

/** The envelope recipients that would be local users (not reply addresses), lower-cased and deduplicated. */
function userAddressesOf(deps: Deps, envelope: Envelope): string[] {
  return uniq(envelope.rcptTo.map((a) => a.trim().toLowerCase())).filter((a) => replyKeyOf(deps, a) === null && isLocalAddress(deps, a));
}

/** Sorts and dedupes addresses. */
const uniq = <T,>(xs: T[]): T[] => [...new Set(xs)];

/** The sender: From, else Sender, else the envelope MAIL FROM. */
function senderOf(deps: Deps, parsed: ParsedEmail, envelope: Envelope): string {
  let mailFrom: string | undefined;
  try {
    mailFrom = envelope.mailFrom ? normalizeAddress(envelope.mailFrom) : undefined;
  } catch {
    mailFrom = undefined;
  }
  const candidates = [parsed.from?.address, parsed.sender?.address, mailFrom].filter((a): a is string => !!a && replyKeyOf(deps, a) === null);
  if (candidates.length === 0) throw new Unprocessable('the message has no sender: no From, no Sender and a null MAIL FROM');
  return candidates[0];
}

/** The transaction of step 4: threading or creating, email_messages, the inbound row. */
async function applyEmail(tx: Tx, deps: Deps, c: IngestContext): Promise<IngestResult> {
  const { parsed, envelope } = c;
  const mid = parsed.messageId === null ? null : storableText(parsed.messageId);
  // One ingest at a time per Message-ID (or per raw message without one): a message
  // delivered twice at once is recorded once. The same statement finds which envelope
  // recipients are users.
  const rcpts = uniq(envelope.rcptTo.map((a) => a.trim().toLowerCase()));
  const replyKeys = uniq(rcpts.map((a) => replyKeyOf(deps, a)).filter((k): k is string => k !== null));
  const userAddresses = userAddressesOf(deps, envelope);
  let locals: string[];
  if (c.users) {
    // A batch took the lock and read the users for all its messages (commitBatch).
    locals = userAddresses.filter((a) => c.users!.has(a)).sort();
  } else {
    const locked = await sql<{ locals: [string, number][] }>`
      select (select coalesce(json_agg(json_build_array(address, id) order by address), '[]') from users where address = any(${userAddresses}::text[])) as locals
        from (select pg_advisory_xact_lock(hashtextextended(${lockKeyOf(c.parsed, c.sha256)}, 0))) l`.execute(tx);
    locals = locked.rows[0].locals.map(([address]) => address);
    noteUsers(tx, locked.rows[0].locals);
  }
  const replyConvs = replyKeys.length
    ? await tx.selectFrom('conversations').select(['id', 'key']).where(sql<boolean>`key = any(${replyKeys}::text[])`).where('published', '=', true).execute()
    : [];
  if (locals.length === 0 && replyConvs.length === 0) throw new Unprocessable('none of the recipients is a user or conversation of this platform');

  // Every recorded email with this Message-ID or one it names, with the local recipients'
  // active participation in its conversation: duplicates and threads in one query — or
  // the batch's read of them (commitBatch), unless an earlier message of the batch recorded
  // one of these ids or changed one of those conversations since: then read again.
  const { ids, lookup } = lookupIdsOf(parsed);
  const pre = c.prefetched;
  const fromBatch = pre && !lookup.some((id) => pre.recordedIds.has(id)) ? lookup.flatMap((id) => pre.byMessageId.get(id) ?? []) : null;
  const known =
    fromBatch && !fromBatch.some((r) => pre!.touched.has(r.conv_id))
      ? // The batch read the participation of every recipient of the batch: keep this message's.
        fromBatch.map((r) => (r.address === null || locals.includes(r.address) ? r : { ...r, address: null }))
      : await settleIfAny(tx, c.pending, () => true).then(() => lookupKnown(tx, lookup, locals));

  // Duplicates.
  const done = new Set<string>();
  const doneConvs = new Set<number>();
  if (mid !== null) {
    for (const r of known.filter((k) => k.message_id === mid)) {
      doneConvs.add(r.conv_id);
      if (r.address) done.add(r.address);
    }
  } else {
    // Reads the inbound rows: those of earlier messages of the batch must be written first.
    await settleIfAny(tx, c.pending, () => c.pending.inbound.length > 0);
    const same = await tx
      .selectFrom('inbound_emails')
      .select('rcpt_to')
      .where('raw_sha256', '=', c.sha256)
      .where('status', '=', 'ingested')
      .where('id', '<>', c.inboundId)
      .execute();
    const had = new Set(same.flatMap((r) => r.rcpt_to.map((a) => a.toLowerCase())));
    for (const a of locals) if (had.has(a)) done.add(a);
    for (const rc of replyConvs) if (rcpts.some((a) => had.has(a) && replyKeyOf(deps, a) === rc.key)) doneConvs.add(rc.id);
  }
  let remaining = locals.filter((a) => !done.has(a));
  const targets = new Map<number, { key: string; locals: string[] }>();
  for (const rc of replyConvs) if (!doneConvs.has(rc.id)) targets.set(rc.id, { key: rc.key, locals: [] });

  // Local recipients taking part in a replied-to conversation are covered by it.
  if (targets.size > 0 && remaining.length > 0) {
    await settleIfAny(tx, c.pending, () => [...targets.keys()].some((id) => c.pending.touched.has(id)));
    const inReplied = await tx
      .selectFrom('participants')
      .select(['conv_id', 'address'])
      .where(sql<boolean>`conv_id = any(${[...targets.keys()]}::bigint[])`)
      .where(sql<boolean>`address = any(${remaining}::text[])`)
      .where('removed_id', 'is', null)
      .orderBy('conv_id')
      .execute();
    for (const r of inReplied) {
      if (!remaining.includes(r.address)) continue;
      targets.get(r.conv_id)!.locals.push(r.address);
      remaining = remaining.filter((a) => a !== r.address);
    }
  }

  // Threading by In-Reply-To, then References (latest first).
  if (ids.length > 0 && remaining.length > 0) {
    const rank = (m: string) => ids.indexOf(m);
    const threads = known.filter((k) => k.published && k.address !== null && k.message_id !== mid && rank(k.message_id) >= 0);
    for (const a of [...remaining]) {
      const best = threads.filter((r) => r.address === a).sort((x, y) => rank(x.message_id) - rank(y.message_id) || y.conv_id - x.conv_id)[0];
      if (!best) continue;
      const t = targets.get(best.conv_id) ?? { key: best.key, locals: [] };
      t.locals.push(a);
      targets.set(best.conv_id, t);
      remaining = remaining.filter((x) => x !== a);
    }
  }

  if (targets.size === 0 && remaining.length === 0) {
    c.pending.inbound.push({ id: c.inboundId, status: 'duplicate', conv_id: null, auth: authJson(c.auth) });
    return {
      inboundId: c.inboundId,
      status: 'duplicate',
      created: [],
      threaded: [],
      reason: mid ? `Message-ID <${mid}> is already recorded for the recipients` : 'the same message was already ingested for the recipients',
    };
  }

  const sender = senderOf(deps, parsed, envelope);
  if (isLocalAddress(deps, sender)) {
    const exists = await tx.selectFrom('users').select('id').where('address', '=', sender).executeTakeFirst();
    if (!exists) throw new Unprocessable(`the sender ${sender} is an address of this platform, but no such user exists`);
    noteUsers(tx, [[sender, Number(exists.id)]]);
  }
  if (c.files.length > 0) {
    await tx
      .insertInto('blobs')
      .values(uniqBy(c.files, (f) => f.sha256).map((f) => ({ sha256: f.sha256, size: f.size, content_type: f.content_type, uploaded_by: null })))
      .onConflict((oc) => oc.column('sha256').doNothing())
      .execute();
  }

  /** Actions whose outbound email is withdrawn (conv id, action id). */
  const quiet: [number, number][] = [];
  const recorded: [number, number][] = [];
  const threaded: string[] = [];
  const created: string[] = [];
  let firstConv: number | null = null;
  const messageInput: ActionInput = {
    act: 'message:add',
    body: c.message.body,
    ...(c.files.length ? { files: c.files } : {}),
    source: c.message.source,
  };

  // Lock every target conversation first, in id order (no deadlock with other writers),
  // with all its participants (handed to the append's loadState, which then reads none):
  // one statement (`parley_lock_conversations_by_id`, migration 037: every column but
  // `search_header`, a tsvector no write uses; one plan per connection, a primary-key probe
  // per id whatever the size of the table).
  const targetIds = [...targets.keys()].sort((a, b) => a - b);
  // A conversation an earlier message of the batch changed: its rows and closing first.
  await settleIfAny(tx, c.pending, () => targetIds.some((id) => c.pending.touched.has(id)));
  const lockedRows = targetIds.length
    ? (
        await sql<ConversationRow & { p_all: Selectable<ParticipantsTable>[] }>`select * from parley_lock_conversations_by_id(${targetIds}::bigint[])`.execute(tx)
      ).rows
    : [];
  /** Import: the conversations whose local participants' list time becomes the email's Date (unless later already). */
  const sortRows: { conv_id: number; before: Record<string, string | null> }[] = [];
  const sentAt = c.quiet ? sortTime(parsed.date, deps.clock) : null;
  const lockedById = new Map(lockedRows.map((r) => [Number(r.id), r]));
  try {
    for (const convId of targetIds) {
      const t = targets.get(convId)!;
      const locked = lockedById.get(convId);
      if (!locked) throw new Error(`conversation ${convId} vanished`);
      const { p_all: parts, ...conv } = locked;
      let row: ConversationRow = conv;
      preloadParticipants(row, parts);
      // Organisation routing of the append (enqueue.ts) then reads no org_id.
      noteConversationOrg(tx, convId, row.org_id === null ? null : Number(row.org_id));
      // An import orders the conversation by the email's Date (the closing statement): the local participants' list times before it.
      if (sentAt !== null) sortRows.push({ conv_id: convId, before: Object.fromEntries(parts.filter((p) => p.user_id !== null).map((p) => [p.address, p.last_event_ts as unknown as string | null])) });
      const senderPart = parts.find((p) => p.address === sender);
      if (senderPart && senderPart.removed_id !== null) {
        throw new Unprocessable(`the sender ${sender} was removed from conversation ${t.key} and cannot add to it`);
      }
      let adder: string | null = null;
      if (!senderPart) {
        // Who may add the sender (chooseAdder): active participants with write permission, earliest first.
        const able = parts
          .filter((p) => p.removed_id === null && (p.perms === 'write' || p.perms === 'full'))
          .sort((a, b) => a.added_id - b.added_id)
          .map((p) => p.address);
        adder = chooseAdder(row, able, t.locals);
      }
      let actions: Action[];
      if (adder !== null && row.published && row.leader !== primaryDomain(deps)) {
        // A conversation led elsewhere: each append is a proposal of its own (append.ts).
        // The sender has the email they wrote; the others hear of them through the message:
        // no outbound email (suppressEmails), and withdrawn below should anything slip through.
        suppressEmails(tx, 'all');
        const r = await appendActions(tx, deps, row, adder, [{ act: 'participant:add', participant: sender, perms: 'write' }]);
        for (const a of r.actions) quiet.push([convId, a.id]);
        // Its rows were buffered (bufferWrites): written now, to be read back.
        await flushWrites(tx);
        row = await tx.selectFrom('conversations').selectAll().where('id', '=', convId).executeTakeFirstOrThrow();
        suppressEmails(tx, c.quiet ? 'smtp' : null);
        actions = (await appendActions(tx, deps, row, sender, [messageInput])).actions;
      } else {
        // An imported message emails nobody; organisation routing (a contact's reply) still applies.
        suppressEmails(tx, c.quiet ? 'smtp' : null);
        actions = await appendAsEmail(tx, deps, row, adder, sender, messageInput);
        // The sender's addition emails nobody (withheld) and is withdrawn below should anything slip through.
        for (const a of actions.slice(0, -1)) quiet.push([convId, a.id]);
        actions = actions.slice(-1);
      }
      const added = actions[0];
      if (c.quiet) quiet.push([convId, added.id]);
      recorded.push([convId, added.id]);
      threaded.push(t.key);
      firstConv ??= convId;
    }

    if (remaining.length > 0) {
      const covered = new Set([...done, ...[...targets.values()].flatMap((t) => t.locals)]);
      const headerAddresses = uniq([...parsed.to, ...parsed.cc].map((m) => m.address)).filter((a) => replyKeyOf(deps, a) === null);
      const headerLocals = headerAddresses.filter((a) => isLocalAddress(deps, a) && !remaining.includes(a));
      const found = headerLocals.length
        ? await tx.selectFrom('users').select(['address', 'id']).where(sql<boolean>`address = any(${headerLocals}::text[])`).execute()
        : [];
      noteUsers(tx, found.map((u) => [u.address, Number(u.id)]));
      const existing = new Set(found.map((u) => u.address));
      const warnings: string[] = [];
      let participants = uniq([
        ...headerAddresses.filter((a) => !isLocalAddress(deps, a) || (existing.has(a) && !covered.has(a))),
        ...remaining,
      ]).filter((a) => a !== sender);
      const max = LIMITS.participants - 1;
      if (participants.length > max) {
        // Keep the local recipients; drop header addresses beyond the limit.
        const keep = new Set(remaining);
        const others = participants.filter((a) => !keep.has(a)).slice(0, Math.max(0, max - keep.size));
        warnings.push(`The message has ${participants.length + 1} addresses; only ${others.length + keep.size + 1} became participants`);
        participants = [...others, ...remaining.filter((a) => a !== sender)];
      }
      let subject = storableText(parsed.subject);
      if (subject.length > LIMITS.subjectChars) {
        warnings.push(`The subject is longer than ${LIMITS.subjectChars} characters and was cut`);
        subject = subject.slice(0, LIMITS.subjectChars);
      }
      const source: ActionSource = warnings.length ? { ...c.message.source, warnings: [...(c.message.source.warnings ?? []), ...warnings] } : c.message.source;
      // Nobody is emailed for a conversation started by an email: its recipients have it.
      suppressEmails(tx, 'all');
      const r = await insertNewConversation(tx, deps, {
        creator: sender,
        subject,
        participants: participants.map((address) => ({ address, perms: 'write' as const })),
        messages: [{ body: c.message.body, ...(c.files.length ? { files: c.files } : {}), source }],
        publish: true,
      });
      const added = r.actions.find((a) => a.act === 'message:add')!;
      for (const a of r.actions) quiet.push([r.id, a.id]);
      if (sentAt !== null) sortRows.push({ conv_id: r.id, before: {} });
      recorded.push([r.id, added.id]);
      created.push(r.key);
      firstConv ??= r.id;
    }
  } finally {
    suppressEmails(tx, null);
  }
  // What is left — the buffered rows of this message's appends (bufferWrites) and its
  // closing statement — is written with the other messages' (settle), at the end of the
  // batch or before a later message of the batch reads what this one changed.
  const p = c.pending;
  for (const [conv, id] of quiet) p.quiet.push([conv, id]);
  if (mid !== null) for (const [conv, id] of recorded) p.received.push({ conv_id: conv, message_id: mid, action_id: id });
  for (const r of sortRows) p.sort.push({ ...r, sent: sentAt });
  p.inbound.push({ id: c.inboundId, status: 'ingested', conv_id: firstConv, auth: authJson(c.auth) });
  for (const [conv] of recorded) p.touched.add(conv);
  if (c.prefetched) {
    for (const [conv] of recorded) c.prefetched.touched.add(conv);
    if (mid !== null) c.prefetched.recordedIds.add(mid);
  }
  return { inboundId: c.inboundId, status: 'ingested', created, threaded };
}

/**
 * appendActions (append.ts) for an email: the message (`actor` the sender) preceded, when
 * `adder` is set, by the sender's `participant:add` (perms `write`, actor `adder`) — both
 * in one append of a conversation this platform leads (one state, one write of its rows),
 * the addition withheld from outbound email (enqueue.ts withholdEmails): the sender has the
 * email they wrote, the others hear of them through the message. Caller holds the row lock.
 * @returns the sealed actions, the message last
 * @throws AppError from the reducer (the transaction must then roll back)
 */
async function appendAsEmail(tx: Tx, deps: Deps, row: ConversationRow, adder: string | null, sender: string, message: ActionInput): Promise<Action[]> {
  if (adder === null) return (await appendActions(tx, deps, row, sender, [message])).actions;
  const steps: [string, ActionInput][] = [
    [adder, cleanInput({ act: 'participant:add', participant: sender, perms: 'write' })],
    [sender, cleanInput(message)],
  ];
  await checkFiles(tx, steps.map(([, i]) => i));
  const state = await loadState(tx, row, referencedMessages(steps.map(([, i]) => i)));
  const h = state.header!;
  const wasPublished = h.published;
  let ts = isoTime(deps.clock.now());
  if (h.last_ts && ts < h.last_ts) ts = h.last_ts;
  const out: Action[] = [];
  for (const [actor, input] of steps) {
    const a = sealAction({ ...input, conv: h.key, id: h.last_id + 1, actor, ts, prev: h.last_hash });
    applyAction(state, a);
    out.push(a);
  }
  withholdEmails(tx, row.id, [out[0].id]);
  const userIds = await resolveLocalUsers(tx, deps, [sender]);
  await signActions(deps, out, tx);
  await storeActions(tx, deps, row, state, out, wasPublished, { rows: loadedParticipantRows.get(state) ?? new Map(), newUserIds: userIds });
  return out;
}

function uniqBy<T>(xs: T[], key: (x: T) => string): T[] {
  const seen = new Set<string>();
  return xs.filter((x) => (seen.has(key(x)) ? false : (seen.add(key(x)), true)));
}

function authJson(auth: EmailAuthentication | null): Pick<EmailAuthentication, 'spf' | 'dkim' | 'dmarc'> | null {
  return auth ? { spf: auth.spf, dkim: auth.dkim, dmarc: auth.dmarc } : null;
}

/**
 * What the messages of a transaction have left to write, once each has run its rules: its
 * appends' rows stay buffered (bufferWrites) and its closing statement waits here, so that
 * a batch writes them all with two statements ({@link settle}) instead of several per message.
 */
interface Pending {
  /** Actions whose outbound email is withdrawn (conv id, action id). */
  quiet: [number, number][];
  /** Message-IDs recorded as received. */
  received: { conv_id: number; message_id: string; action_id: number }[];
  /** Import: participants' list times set to the email's Date (`sent`) unless later before (`before`, per local address). */
  sort: { conv_id: number; before: Record<string, string | null>; sent: string | null }[];
  /** The inbound rows' outcome. */
  inbound: { id: number; status: 'ingested' | 'duplicate'; conv_id: number | null; auth: ReturnType<typeof authJson> }[];
  /** Conversations those messages changed: a message reading one of them settles first. */
  touched: Set<number>;
}

function newPending(): Pending {
  return { quiet: [], received: [], sort: [], inbound: [], touched: new Set() };
}

/**
 * Writes what `p` holds: the buffered rows (flushWrites: one statement; the stream events
 * too when `last`, the transaction's final write — else they stay buffered until just
 * before COMMIT), then one statement that withdraws any outbound email
 * of the quiet actions (organisation routing is the only thing that can still create one),
 * records the Message-IDs, orders imported conversations by the email's Date in their local
 * participants' lists (those the messages touched: their time is now the import's; an
 * earlier time of theirs later than the Date stays), and marks the raw messages ingested
 * or duplicate. Two messages of one settle never touch the same conversation (applyEmail
 * settles before it reads one that a pending message changed).
 */
async function settle(tx: Tx, p: Pending, last = false): Promise<void> {
  await flushWrites(tx, last);
  if (p.inbound.length === 0) return;
  // The `conv_id = any(…)` conditions let the planner use the indexes whatever it guesses of the joined sets.
  const quietConvs = uniq(p.quiet.map(([conv]) => conv));
  await sql`
    with quiet as (select * from unnest(${p.quiet.map(([conv]) => conv)}::bigint[], ${p.quiet.map(([, id]) => id)}::int[]) as q(conv_id, action_id)),
         withdrawn as (delete from deliveries d using quiet q
                        where d.conv_id = any(${quietConvs}::bigint[]) and d.conv_id = q.conv_id and d.action_id = q.action_id),
         unsent as (delete from email_messages e using quiet q
                     where e.conv_id = any(${quietConvs}::bigint[]) and e.direction = 'out' and e.conv_id = q.conv_id and e.action_id = q.action_id),
         received as (
           insert into email_messages (conv_id, message_id, direction, action_id)
           select conv_id, message_id, 'in', action_id
             from unnest(${p.received.map((r) => r.conv_id)}::bigint[], ${p.received.map((r) => r.message_id)}::text[], ${p.received.map((r) => r.action_id)}::int[])
                  as r(conv_id, message_id, action_id)
           on conflict (conv_id, message_id) do nothing),
         sorted as (
           update participants p set last_event_ts = greatest(s.sent, (s.before ->> p.address)::timestamptz)
             from jsonb_to_recordset(${JSON.stringify(p.sort)}::jsonb) as s(conv_id bigint, sent timestamptz, before jsonb)
            where p.conv_id = any(${p.sort.map((r) => r.conv_id)}::bigint[]) and p.conv_id = s.conv_id and p.user_id is not null
              and p.last_event_ts is distinct from (s.before ->> p.address)::timestamptz)
    update inbound_emails i set status = u.status, conv_id = u.conv_id, error = null, auth = u.auth
      from jsonb_to_recordset(${JSON.stringify(p.inbound)}::jsonb) as u(id bigint, status text, conv_id bigint, auth jsonb)
     where i.id = any(${p.inbound.map((r) => r.id)}::bigint[]) and i.id = u.id`.execute(tx);
  Object.assign(p, newPending());
}

/** {@link settle}s `p` first when something is pending and `needed()` says a read depends on it. */
async function settleIfAny(tx: Tx, p: Pending, needed: () => boolean): Promise<void> {
  if ((p.inbound.length > 0 || p.touched.size > 0) && needed()) await settle(tx, p);
}

/**
 * Who adds an email sender to a conversation (the rule of {@link ingestEmail}): the first
 * of the message's local recipients in it who is active with write permission, else the
 * creator if active with write permission, else the earliest-added such participant.
 * @param addresses the active participants with write permission, earliest-added first
 * @throws Unprocessable when nobody in the conversation may add participants
 */
function chooseAdder(row: ConversationRow, addresses: string[], localRecipients: string[]): string {
  const pick = localRecipients.find((a) => addresses.includes(a)) ?? (addresses.includes(row.creator) ? row.creator : addresses[0]);
  if (!pick) throw new Unprocessable(`nobody in conversation ${row.key} may add the sender as a participant`);
  return pick;
}
