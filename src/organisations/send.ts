import { sql } from 'kysely';
import { LIMITS } from '../core/actions.ts';
import { type Deps, primaryDomain } from '../context.ts';
import { appendActions } from '../conversations/append.ts';
import { insertNewConversation } from '../conversations/commands/create-conversation.ts';
import type { ConversationRow } from '../conversations/store.ts';
import { enqueueDelivery } from '../delivery/engine.ts';
import { outboundMessageId } from '../mail/outbound/enqueue.ts';
import { AppError, badRequest, conflict, notFound } from '../platform/errors.ts';
import { type Queryable, transaction, type Tx } from '../store/db.ts';
import { chainFor, checkChain, destinationsFor, reachableChain } from './chains.ts';
import type { Org } from './orgs.ts';
import { decodeCursor, pageOf, type Page } from './pagination.ts';
import { checkQuota, checkRate, lockQuota } from './quota.ts';
import { checkTemplates, renderTemplate } from './templates.ts';

/**
 * Messages from an organisation to a contact (issue 4 §5; docs/organisations.md "Messages").
 *
 * A message to a contact IS a `message:add` in the conversation between the organisation's
 * address and the contact, so replies thread: the contact's conversation
 * (`contacts.conv_id`) is created on the first message (creator the organisation's address,
 * participant the contact's email address — or, for a phone-only contact, the pseudo-address
 * `<E.164>@sms.invalid`, which no email ever goes to) and later messages are appended to it.
 * In the SAME transaction the `outbound_messages` row is written and the delivery enqueued
 * with the engine along the message's servicechain, so nothing is acknowledged that is not
 * committed and nothing committed is lost.
 */

/** Domain of the pseudo-addresses of phone-only contacts (RFC 2606 `.invalid`: never routable). */
export const SMS_PSEUDO_DOMAIN = 'sms.invalid';

/** The participant address of a contact in its conversation: its email, else `<phone>@sms.invalid`. */
export function contactParticipant(c: { email: string | null; phone: string | null }): string {
  if (c.email) return c.email;
  return `${c.phone}@${SMS_PSEUDO_DOMAIN}`;
}

/** Every address a contact may appear under in its conversation. */
export function contactAddresses(c: { email: string | null; phone: string | null }): string[] {
  return [c.email, c.phone ? `${c.phone}@${SMS_PSEUDO_DOMAIN}` : null].filter((a): a is string => !!a);
}

/**
 * Transactions in which the organisation API itself writes to a contact's conversation
 * (sending, recording an inbound reply, a member joining), with the participant addresses
 * the email bridge's hook (routeOrganisationActions) must not email for that write — the
 * API enqueues the contact's delivery itself, with the message's own chain. `'all'`: no
 * email participant is emailed.
 */
const orgApiTxs = new WeakMap<object, ReadonlySet<string> | 'all'>();
/** Marks `tx` as an organisation API write whose next writes concern `skip` (see orgApiTxs). */
export function markOrgApiTx(tx: Tx, skip: ReadonlySet<string> | 'all'): void {
  orgApiTxs.set(tx, skip);
}
/** The addresses an organisation API write must not email, or undefined for any other write. */
export function orgApiSkip(tx: Tx): ReadonlySet<string> | 'all' | undefined {
  return orgApiTxs.get(tx);
}

/** A contact row as the send path uses it (locked by the caller). */
export interface SendContact {
  id: number;
  name: string;
  email: string | null;
  phone: string | null;
  preferred_chain: string[] | null;
  fields: Record<string, string>;
  conv_id: number | null;
}

/** An outbound message row to prepare. */
export interface OutboundRow {
  id: number;
  subject: string;
  body: string;
  chain: string[];
  blast_id: number | null;
}

/**
 * Time of the conversations this process creates: strictly increasing, so keys (creator,
 * publish time, subject) of one organisation's conversations with one subject never collide
 * here; a collision with another process (409 `key_taken`) retries the transaction (withRetry).
 */
let lastCreateMs = 0;
/** `deps` with a clock frozen at this process's next conversation-creation time (see lastCreateMs). */
export function createClock(deps: Deps): Deps {
  const ms = Math.max(deps.clock.now(), lastCreateMs + 1);
  lastCreateMs = ms;
  return { ...deps, clock: { now: () => ms } };
}

/** Runs `fn` inside a savepoint: on an error the transaction continues as before `fn`. */
export async function inSavepoint<T>(tx: Tx, fn: () => Promise<T>): Promise<T> {
  await sql`savepoint org_step`.execute(tx);
  try {
    const r = await fn();
    await sql`release savepoint org_step`.execute(tx);
    return r;
  } catch (e) {
    await sql`rollback to savepoint org_step`.execute(tx);
    throw e;
  }
}

async function lockConversationById(tx: Tx, id: number): Promise<ConversationRow | undefined> {
  return tx.selectFrom('conversations').selectAll().where('id', '=', id).forUpdate().executeTakeFirst();
}

/** The payload the plugins render (see MessagePayload in src/delivery/plugin.ts). */
function payloadFor(deps: Deps, key: string, actionId: number, subject: string, body: string, contact: SendContact): Record<string, unknown> {
  return {
    action_id: actionId,
    message_id: outboundMessageId(key, actionId, primaryDomain(deps)),
    full: false,
    text: body,
    subject,
    conversation_key: key,
    conv_key: key,
    contact: { id: contact.id, name: contact.name, email: contact.email, phone: contact.phone, fields: contact.fields ?? {} },
  };
}

/**
 * What marks an outbound message prepared: its conversation and action (and, for a
 * conversation created for it, that the conversation becomes the organisation's and the
 * contact's). Written by `markPrepared`, one statement for any number of messages.
 */
export interface PreparedMark {
  omId: number;
  contactId: number;
  convId: number;
  actionId: number;
  newConversation: boolean;
}

/**
 * Marks outbound messages prepared (`conv_id`, `action_id`, `prepared_at`, `error` cleared)
 * in ONE statement, and for those whose conversation was created for them sets
 * `conversations.org_id` and `contacts.conv_id` — a blast chunk marks its 100 messages with
 * one round trip instead of one each.
 */
export async function markPrepared(tx: Tx, deps: Deps, orgId: number, marks: readonly PreparedMark[]): Promise<void> {
  if (marks.length === 0) return;
  await sql`
    with v as (select * from unnest(${marks.map((m) => m.omId)}::bigint[], ${marks.map((m) => m.contactId)}::bigint[], ${marks.map((m) => m.convId)}::bigint[],
                                    ${marks.map((m) => m.actionId)}::bigint[], ${marks.map((m) => m.newConversation)}::bool[])
                      as t(om_id, contact_id, conv_id, action_id, new_conv)),
         c as (update conversations set org_id = ${orgId} from v where v.new_conv and conversations.id = v.conv_id),
         k as (update contacts set conv_id = v.conv_id from v where v.new_conv and contacts.id = v.contact_id)
    update outbound_messages o set conv_id = v.conv_id, action_id = v.action_id, prepared_at = ${new Date(deps.clock.now())}, error = null
      from v where o.id = v.om_id`.execute(tx);
}

/**
 * Enqueues the delivery of action `actionId` of the contact's conversation for outbound
 * message `om` (idempotency key `om:<id>`: enqueuing twice sends once) and, unless `deferMark`,
 * marks it prepared (markPrepared; with `newConversation`, also sets `conversations.org_id`
 * and `contacts.conv_id`).
 * @returns the delivery id (null when it already existed) and the mark (written or deferred)
 */
export async function enqueueFor(
  tx: Tx,
  deps: Deps,
  org: Org,
  contact: SendContact,
  om: OutboundRow,
  conv: { id: number; key: string; subject: string },
  actionId: number,
  newConversation = false,
  deferMark = false,
): Promise<{ deliveryId: number | null; mark: PreparedMark }> {
  const deliveryId = await enqueueDelivery(tx, deps, {
    chain: om.chain,
    destinations: destinationsFor(contact),
    payload: payloadFor(deps, conv.key, actionId, conv.subject, om.body, contact),
    idempotencyKey: `om:${om.id}`,
    convId: conv.id,
    actionId,
    orgId: org.id,
    outboundMessageId: om.id,
    contactId: contact.id,
    ...(om.blast_id !== null ? { blastId: om.blast_id } : {}),
    expiresAt: new Date(deps.clock.now() + deps.config.deliveryMaxAgeHours * 3_600_000),
    fallback: { notDeliveredS: org.fallback?.not_delivered_s, notReadS: org.fallback?.not_read_s },
  });
  const mark: PreparedMark = { omId: om.id, contactId: contact.id, convId: conv.id, actionId, newConversation };
  if (!deferMark) await markPrepared(tx, deps, org.id, [mark]);
  return { deliveryId, mark };
}

/**
 * Prepares one outbound message in the caller's transaction: appends its `message:add` by
 * the organisation's address to the contact's conversation (created on the first message;
 * `conversations.org_id` set), then enqueues its delivery. The caller holds the contact's
 * row lock (and, when it exists, should lock its conversation first in a batch).
 * Options (a blast chunk): `conv`, the contact's conversation row the caller already locked
 * (saves reading it again); `deferMark`, the caller writes the returned `mark` itself with
 * `markPrepared`, for many messages at once.
 * @throws AppError from the conversation write (e.g. 400 `unknown_local_address` for a
 *   contact whose email is an address of this platform that is not a user)
 */
export async function prepareMessage(
  tx: Tx,
  deps: Deps,
  org: Org,
  contact: SendContact,
  om: OutboundRow,
  opts: { conv?: ConversationRow; deferMark?: boolean } = {},
): Promise<{ convId: number; convKey: string; actionId: number; deliveryId: number | null; mark: PreparedMark }> {
  markOrgApiTx(tx, new Set(contactAddresses(contact)));
  let conv: { id: number; key: string; subject: string } | null = null;
  let actionId = 0;
  if (contact.conv_id !== null) {
    const row = opts.conv && opts.conv.id === contact.conv_id ? opts.conv : await lockConversationById(tx, contact.conv_id);
    if (row) {
      const { actions } = await appendActions(tx, deps, row, org.address, [{ act: 'message:add', body: om.body }]);
      conv = { id: row.id, key: row.key, subject: row.subject };
      actionId = actions[0].id;
    }
  }
  if (!conv) {
    const subject = (om.subject || org.name).slice(0, LIMITS.subjectChars);
    const created = await insertNewConversation(tx, createClock(deps), {
      creator: org.address,
      subject,
      participants: [{ address: contactParticipant(contact), perms: 'write' }],
      messages: [{ body: om.body }],
      publish: true,
    });
    const add = created.actions.find((a) => a.act === 'message:add')!;
    const c = { id: created.id, key: created.key, subject };
    const r = await enqueueFor(tx, deps, org, contact, om, c, add.id, true, opts.deferMark);
    contact.conv_id = created.id;
    return { convId: c.id, convKey: c.key, actionId: add.id, deliveryId: r.deliveryId, mark: r.mark };
  }
  const r = await enqueueFor(tx, deps, org, contact, om, conv, actionId, false, opts.deferMark);
  return { convId: conv.id, convKey: conv.key, actionId, deliveryId: r.deliveryId, mark: r.mark };
}

/** The columns a contact is loaded with for sending. */
export const SEND_CONTACT_COLUMNS = ['id', 'name', 'email', 'phone', 'preferred_chain', 'fields', 'conv_id'] as const;

/**
 * Runs a transaction body (store/db.ts `transaction`: its notifications — workers woken,
 * users' streams — go out once, just after the commit, instead of one NOTIFY per message
 * inside it), retried on deadlock, serialization failure or a conversation key collision
 * (at most 5 attempts).
 */
export async function withRetry<T>(deps: Deps, fn: (tx: Tx) => Promise<T>): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await transaction(deps.db, fn);
    } catch (e) {
      const code = (e as { code?: string })?.code;
      if (attempt < 5 && (code === '40P01' || code === '40001' || (e instanceof AppError && e.code === 'key_taken'))) continue;
      throw e;
    }
  }
}

/** What an application sends to one contact (POST /api/organisations/{slug}/messages with contact_id). */
export interface MessageInput {
  contact_id: number;
  subject?: string;
  /** The body template (see templates.ts). */
  body: string;
  chain?: string[];
  /** The application's idempotency key: a replay returns the first message and sends nothing. */
  idempotency_key?: string;
}

/**
 * `sendMessage` — one message to one contact, in one transaction: quota and rate checks,
 * template rendering, the conversation action, the outbound message and its delivery.
 * @param author who asks (for logs): a member's address or `token:<id>`
 * @returns the message view, `replayed` true when the idempotency key was used before
 * @throws AppError 400 (`unknown_placeholder`, `invalid_chain`, `unknown_plugin`,
 *   `no_destination`, `body_too_long`), 404 (no such contact), 409 `idempotency_key_reused`
 *   (the key was used for another contact or for a blast), 429 (`quota_exceeded`, `rate_limited`)
 */
export async function sendMessage(deps: Deps, org: Org, input: MessageInput): Promise<{ message: MessageView; replayed: boolean }> {
  checkTemplates({ body: input.body, subject: input.subject });
  if (input.chain) checkChain(input.chain);
  const id = await withRetry(deps, async (tx) => {
    await lockQuota(tx, org.id);
    if (input.idempotency_key !== undefined) {
      const prior = await tx
        .selectFrom('outbound_messages')
        .select(['id', 'contact_id'])
        .where('org_id', '=', org.id)
        .where('client_key', '=', input.idempotency_key)
        .executeTakeFirst();
      if (prior) {
        if (prior.contact_id !== input.contact_id)
          throw conflict('idempotency_key_reused', 'this idempotency_key was used for a message to another contact', { message_id: prior.id });
        return { id: prior.id, replayed: true };
      }
      const blast = await tx.selectFrom('blasts').select('id').where('org_id', '=', org.id).where('client_key', '=', input.idempotency_key).executeTakeFirst();
      if (blast) throw conflict('idempotency_key_reused', 'this idempotency_key was used for a blast', { blast_id: blast.id });
    }
    const contact = (await tx
      .selectFrom('contacts')
      .select([...SEND_CONTACT_COLUMNS])
      .where('org_id', '=', org.id)
      .where('id', '=', input.contact_id)
      .forUpdate()
      .executeTakeFirst()) as SendContact | undefined;
    if (!contact) throw notFound(`contact ${input.contact_id}`);
    const u = await checkQuota(tx, deps, org, 1);
    await checkRate(tx, deps, org, u);
    const body = renderTemplate(input.body, contact);
    const subject = renderTemplate(input.subject ?? '', contact).replace(/[\r\n]+/g, ' ');
    if (body.length > LIMITS.bodyChars) throw badRequest('body_too_long', `the rendered body is longer than ${LIMITS.bodyChars} characters`);
    if (subject.length > LIMITS.subjectChars) throw badRequest('body_too_long', `the rendered subject is longer than ${LIMITS.subjectChars} characters`);
    const chain = chainFor(input.chain, contact, org.default_chain);
    const destinations = destinationsFor(contact);
    if (reachableChain(chain, destinations).length === 0)
      throw badRequest('no_destination', `no plugin of the servicechain [${chain.join(', ')}] can reach contact ${contact.id}`, {
        chain,
        reachable_by: Object.keys(destinations),
      });
    const om = await tx
      .insertInto('outbound_messages')
      .values({
        org_id: org.id,
        contact_id: contact.id,
        blast_id: null,
        conv_id: null,
        action_id: null,
        subject,
        body,
        chain,
        client_key: input.idempotency_key ?? null,
        created_at: new Date(deps.clock.now()),
        author: org.address,
      })
      .returning(['id'])
      .executeTakeFirstOrThrow();
    await prepareMessage(tx, deps, org, contact, { id: om.id, subject, body, chain, blast_id: null });
    return { id: om.id, replayed: false };
  });
  return { message: await getMessage(deps, org.id, id.id), replayed: id.replayed };
}

/** One attempt of a delivery (delivery_attempts). */
export interface AttemptView {
  at: string;
  plugin: string;
  outcome: string;
  error: string | null;
  provider_ref: string | null;
}

/** A delivery of a message: its state along the servicechain, and every attempt. */
export interface DeliveryView {
  id: number;
  state: string;
  /** The chain step now (or last) tried. */
  plugin: string;
  destination: string;
  chain: string[] | null;
  chain_index: number;
  attempts: AttemptView[];
  last_error: string | null;
  provider_ref: string | null;
  sent_at: string | null;
  delivered_at: string | null;
  read_at: string | null;
  replied_at: string | null;
  updated_at: string;
}

/** An outbound message as the API shows it. Times UTC ISO 8601. */
export interface MessageView {
  id: number;
  contact_id: number;
  blast_id: number | null;
  /** Key of the conversation with the contact (null while a blast message is not prepared). */
  conversation: string | null;
  /** Id of the message:add action in that conversation. */
  action_id: number | null;
  subject: string;
  /** The rendered text. */
  body: string;
  chain: string[];
  author: string;
  idempotency_key: string | null;
  created_at: string;
  prepared_at: string | null;
  /** Why it could not be prepared (then it has no delivery). */
  error: string | null;
  /** The state of its (first) delivery; `preparing` before it has one, `failed` when it could not be prepared. */
  state: string;
  delivery_id: number | null;
  deliveries: DeliveryView[];
}

const iso = (d: Date | string | null | undefined) => (d ? new Date(d).toISOString() : null);

type MessageRow = {
  id: number;
  contact_id: number;
  blast_id: number | null;
  conv_key: string | null;
  action_id: number | null;
  subject: string;
  body: string;
  chain: string[];
  author: string;
  client_key: string | null;
  created_at: Date;
  prepared_at: Date | null;
  error: string | null;
};

async function messageViews(db: Queryable, rows: MessageRow[]): Promise<MessageView[]> {
  if (rows.length === 0) return [];
  const ids = rows.map((r) => r.id);
  const ds = await db
    .selectFrom('deliveries')
    .select(['id', 'outbound_message_id', 'state', 'plugin', 'destination', 'chain', 'chain_index', 'last_error', 'provider_ref', 'sent_at', 'delivered_at', 'read_at', 'replied_at', 'updated_at'])
    .where('outbound_message_id', 'in', ids)
    .orderBy('id')
    .execute();
  const atts = ds.length
    ? await db
        .selectFrom('delivery_attempts')
        .select(['delivery_id', 'at', 'plugin', 'outcome', 'error', 'provider_ref'])
        .where('delivery_id', 'in', ds.map((d) => d.id))
        .orderBy('id')
        .execute()
    : [];
  const byDelivery = new Map<number, AttemptView[]>();
  for (const a of atts) {
    const list = byDelivery.get(a.delivery_id) ?? [];
    list.push({ at: iso(a.at)!, plugin: a.plugin, outcome: a.outcome, error: a.error, provider_ref: a.provider_ref });
    byDelivery.set(a.delivery_id, list);
  }
  const byMessage = new Map<number, DeliveryView[]>();
  for (const d of ds) {
    const list = byMessage.get(d.outbound_message_id!) ?? [];
    list.push({
      id: d.id,
      state: d.state,
      plugin: d.plugin,
      destination: d.destination,
      chain: d.chain,
      chain_index: d.chain_index,
      attempts: byDelivery.get(d.id) ?? [],
      last_error: d.last_error,
      provider_ref: d.provider_ref,
      sent_at: iso(d.sent_at),
      delivered_at: iso(d.delivered_at),
      read_at: iso(d.read_at),
      replied_at: iso(d.replied_at),
      updated_at: iso(d.updated_at)!,
    });
    byMessage.set(d.outbound_message_id!, list);
  }
  return rows.map((r) => {
    const deliveries = byMessage.get(r.id) ?? [];
    return {
      id: r.id,
      contact_id: r.contact_id,
      blast_id: r.blast_id,
      conversation: r.conv_key,
      action_id: r.action_id,
      subject: r.subject,
      body: r.body,
      chain: r.chain,
      author: r.author,
      idempotency_key: r.client_key,
      created_at: iso(r.created_at)!,
      prepared_at: iso(r.prepared_at),
      error: r.error,
      state: deliveries[0]?.state ?? (r.error ? 'failed' : 'preparing'),
      delivery_id: deliveries[0]?.id ?? null,
      deliveries,
    };
  });
}

/** One outbound message with its deliveries and their attempts. @throws AppError 404 */
export async function getMessage(deps: Deps, orgId: number, id: number): Promise<MessageView> {
  const rows = await deps.db.kysely
    .selectFrom('outbound_messages as m')
    .leftJoin('conversations as c', 'c.id', 'm.conv_id')
    .select(['m.id', 'm.contact_id', 'm.blast_id', 'c.key as conv_key', 'm.action_id', 'm.subject', 'm.body', 'm.chain', 'm.author', 'm.client_key', 'm.created_at', 'm.prepared_at', 'm.error'])
    .where('m.org_id', '=', orgId)
    .where('m.id', '=', id)
    .execute();
  if (rows.length === 0) throw notFound(`message ${id}`);
  return (await messageViews(deps.db.kysely, rows))[0];
}

/** Outbound messages, newest first, paged; optionally of one contact or one blast. */
export async function listMessages(
  deps: Deps,
  orgId: number,
  opts: { cursor?: string; limit: number; contact_id?: number; blast_id?: number },
): Promise<Page<MessageView>> {
  const before = decodeCursor(opts.cursor, 'number');
  let q = deps.db.kysely
    .selectFrom('outbound_messages as m')
    .leftJoin('conversations as c', 'c.id', 'm.conv_id')
    .select(['m.id', 'm.contact_id', 'm.blast_id', 'c.key as conv_key', 'm.action_id', 'm.subject', 'm.body', 'm.chain', 'm.author', 'm.client_key', 'm.created_at', 'm.prepared_at', 'm.error'])
    .where('m.org_id', '=', orgId);
  if (before !== null) q = q.where('m.id', '<', before as number);
  if (opts.contact_id !== undefined) q = q.where('m.contact_id', '=', opts.contact_id);
  if (opts.blast_id !== undefined) q = q.where('m.blast_id', '=', opts.blast_id);
  const rows = await q.orderBy('m.id', 'desc').limit(opts.limit + 1).execute();
  const page = pageOf(rows, opts.limit, (r) => r.id);
  return { items: await messageViews(deps.db.kysely, page.items), next_cursor: page.next_cursor };
}
