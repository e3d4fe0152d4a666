import type { Action } from '../core/actions.ts';
import type { ConversationState } from '../core/reducer.ts';
import { type Deps, isLocalAddress } from '../context.ts';
import { appendActions } from '../conversations/append.ts';
import { insertNewConversation } from '../conversations/commands/create-conversation.ts';
import type { InboundReply } from '../delivery/inbound.ts';
import { knownPlugins } from '../delivery/registry.ts';
import { applyEvent } from '../delivery/state.ts';
import { LIMITS } from '../core/actions.ts';
import { AppError } from '../platform/errors.ts';
import type { Tx } from '../store/db.ts';
import { chainFor } from './chains.ts';
import { normalizePhone } from './contacts.ts';
import { orgById, type Org } from './orgs.ts';
import { contactAddresses, contactParticipant, createClock, enqueueFor, inSavepoint, markOrgApiTx, orgApiSkip, SEND_CONTACT_COLUMNS, type SendContact } from './send.ts';

/**
 * Replies in organisation conversations (issue 4 §5: "inbound replies from any plugin are
 * matched to the contact and conversation"; docs/organisations.md "Replies").
 *
 * Resolution order of an inbound reply:
 * 1. **The delivery replied to**, by the engine (src/delivery/inbound.ts): our delivery id
 *    when the channel names it (webhook), else the provider's reference of the message
 *    replied to (current step, then earlier attempts), else the newest delivery of the
 *    organisation whose destination on that plugin is the sender — its contact and
 *    conversation.
 * 2. **The email thread**: an email reply is threaded by the email bridge (In-Reply-To /
 *    References against `email_messages`, or the `reply+<key>@` address) into the contact's
 *    conversation; the contact is the one whose conversation it is, and the delivery replied
 *    to is the newest of that conversation in state sent/delivered/read.
 * 3. **The sender's address** among the organisation's contacts: phone (E.164), then email,
 *    then (webhook) the contact's `webhook_id` field or id — that contact's conversation
 *    (the most recent one: a contact has one conversation with the organisation).
 * A matched reply becomes a `message:add` by the contact's participant address in that
 * conversation (which is created, by the contact, if the contact never had one), and the
 * delivery replied to becomes `replied`. An unmatched reply stays an unmatched event.
 */

/** Conversations' `org_id` as their writer read it under the row lock, per transaction: see {@link noteConversationOrg}. */
const knownOrgs = new WeakMap<object, Map<number, number | null>>();

/**
 * Tells {@link routeOrganisationActions} in `tx` the `org_id` of conversation `convId`,
 * which the caller read with the conversation's row lock (inbound mail), so that it is
 * not read again.
 */
export function noteConversationOrg(tx: Tx, convId: number, orgId: number | null): void {
  let m = knownOrgs.get(tx);
  if (!m) knownOrgs.set(tx, (m = new Map()));
  m.set(convId, orgId);
}

/** The organisation conversation's contact (and organisation) of conversation `convId`, if any. */
async function contactOfConversation(tx: Tx, convId: number): Promise<{ org: Org; contact: SendContact } | { orgId: null } | null> {
  const noted = knownOrgs.get(tx)?.get(convId);
  const conv = noted !== undefined ? { org_id: noted } : await tx.selectFrom('conversations').select('org_id').where('id', '=', convId).executeTakeFirst();
  if (!conv || conv.org_id === null) return { orgId: null };
  const contact = (await tx
    .selectFrom('contacts')
    .select([...SEND_CONTACT_COLUMNS])
    .where('conv_id', '=', convId)
    .where('org_id', '=', conv.org_id)
    .orderBy('id', 'desc')
    .limit(1)
    .executeTakeFirst()) as SendContact | undefined;
  if (!contact) return null;
  return { org: await orgById(tx, conv.org_id), contact };
}

/**
 * Marks the delivery a reply answers `replied` (with a `replied` delivery event): the newest
 * delivery of the contact in the conversation before action `beforeActionId` that was sent
 * (sent, delivered or read). A delivery still pending is left alone: the reply cannot be to it.
 * @returns the delivery id, or null when there was none to mark
 */
export async function markReplied(
  tx: Tx,
  deps: Deps,
  m: { orgId: number; contactId: number; convId: number; beforeActionId: number; via: string; detail?: Record<string, unknown> },
): Promise<number | null> {
  const d = await tx
    .selectFrom('deliveries')
    .selectAll()
    .where('org_id', '=', m.orgId)
    .where('contact_id', '=', m.contactId)
    .where('conv_id', '=', m.convId)
    .where('action_id', '<', m.beforeActionId)
    .where('state', 'in', ['sent', 'delivered', 'read', 'replied'])
    .orderBy('action_id', 'desc')
    .orderBy('id', 'desc')
    .limit(1)
    .forUpdate()
    .executeTakeFirst();
  if (!d || d.state === 'replied') return d?.id ?? null;
  const now = new Date(deps.clock.now());
  await tx
    .insertInto('delivery_events')
    .values({ delivery_id: d.id, org_id: m.orgId, plugin: m.via, kind: 'replied', provider_ref: null, detail: JSON.stringify({ action_id: m.beforeActionId, ...(m.detail ?? {}) }) })
    .execute();
  await applyEvent(tx, d, knownPlugins().get(d.plugin)?.capabilities, 'replied', d.plugin === m.via, now);
  return d.id;
}

/**
 * The organisation half of the email bridge's outbound hook (called by `enqueueEmails` in
 * src/mail/outbound/enqueue.ts for every write): in a conversation between an organisation
 * and a contact, the contact is reached through the servicechain, never by the bridge's
 * automatic email. So:
 * - a `message:add` by the contact (an email reply threaded by the bridge, or a contact who
 *   is a user here) marks the delivery it answers `replied` (resolution step 2);
 * - a `message:add` by a member (any other local participant) replying through the client
 *   API is sent to the contact along the contact's chain (preferred, else the
 *   organisation's): an `outbound_messages` row (counted in the quota, never refused) and
 *   its delivery, in the same transaction;
 * - writes by the organisation API itself (sending, inbound replies) are left to it.
 * @returns the participant addresses the bridge must not email (the contact's), or null
 *   when this is not an organisation conversation (email everyone as usual)
 */
export async function routeOrganisationActions(
  tx: Tx,
  deps: Deps,
  convId: number,
  s: ConversationState,
  actions: Action[],
  wasPublished: boolean,
): Promise<Set<string> | null> {
  const skip = orgApiSkip(tx);
  if (skip === 'all') return new Set(s.participants.keys());
  if (skip) return new Set(skip);
  const found = await contactOfConversation(tx, convId);
  if (!found || 'orgId' in found) return null; // not (or no longer: contact deleted) an organisation conversation
  const { org, contact } = found;
  const own = new Set(contactAddresses(contact));
  let published = wasPublished;
  for (const a of actions) {
    if (a.act === 'conv:publish') published = true;
    if (!published || a.act !== 'message:add') continue;
    if (own.has(a.actor)) {
      await markReplied(tx, deps, { orgId: org.id, contactId: contact.id, convId, beforeActionId: a.id, via: isLocalAddress(deps, a.actor) ? 'parley' : 'smtp', detail: { thread: true } });
    } else if (isLocalAddress(deps, a.actor)) {
      await memberReply(tx, deps, org, contact, { id: convId, key: s.header!.key, subject: s.header!.subject }, a);
    }
  }
  return own;
}

/** A member's message in a contact's conversation, sent to the contact along its chain. */
async function memberReply(tx: Tx, deps: Deps, org: Org, contact: SendContact, conv: { id: number; key: string; subject: string }, a: Action): Promise<void> {
  const chain = chainFor(null, contact, org.default_chain);
  const om = await tx
    .insertInto('outbound_messages')
    .values({
      org_id: org.id,
      contact_id: contact.id,
      blast_id: null,
      conv_id: conv.id,
      action_id: a.id,
      subject: conv.subject,
      body: a.body ?? '',
      chain,
      client_key: null,
      created_at: new Date(deps.clock.now()),
      author: a.actor,
    })
    .returning('id')
    .executeTakeFirstOrThrow();
  await enqueueFor(tx, deps, org, contact, { id: om.id, subject: conv.subject, body: a.body ?? '', chain, blast_id: null }, conv, a.id);
}

/** Finds the contact of an unmatched reply by the sender's address (resolution step 3). */
async function contactBySender(tx: Tx, orgId: number, plugin: string, from: string): Promise<SendContact | undefined> {
  const q = () => tx.selectFrom('contacts').select([...SEND_CONTACT_COLUMNS]).where('org_id', '=', orgId);
  let phone: string | null = null;
  try {
    phone = from ? normalizePhone(from) : null;
  } catch {
    phone = null;
  }
  if (phone) {
    const c = await q().where('phone', '=', phone).forUpdate().executeTakeFirst();
    if (c) return c as SendContact;
  }
  if (from.includes('@')) {
    const c = await q().where('email', '=', from.trim().toLowerCase()).forUpdate().executeTakeFirst();
    if (c) return c as SendContact;
  }
  if (plugin === 'webhook' && from) {
    const c = await q()
      .where((eb) => eb.or([eb(eb.ref('fields', '->>').key('webhook_id'), '=', from), ...(/^\d{1,15}$/.test(from) ? [eb('id', '=', Number(from))] : [])]))
      .orderBy('id')
      .limit(1)
      .forUpdate()
      .executeTakeFirst();
    if (c) return c as SendContact;
  }
  return undefined;
}

/**
 * The InboundReplyHandler registered with the engine (`onInboundReply`): runs in the
 * engine's transaction that stores the reply's event (see the module comment for the
 * resolution order). Throwing makes the provider retry, so only internal errors throw.
 */
export async function handleInboundReply(tx: Tx, deps: Deps, reply: InboundReply): Promise<void> {
  let contact: SendContact | undefined;
  if (reply.contactId !== null) {
    contact = (await tx.selectFrom('contacts').select([...SEND_CONTACT_COLUMNS]).where('id', '=', reply.contactId).where('org_id', '=', reply.orgId).forUpdate().executeTakeFirst()) as
      | SendContact
      | undefined;
  }
  contact ??= await contactBySender(tx, reply.orgId, reply.plugin, reply.from);
  if (!contact) {
    deps.log.info({ org: reply.orgId, plugin: reply.plugin, event: reply.eventId }, 'inbound reply matches no contact; kept as an unmatched event');
    return;
  }
  try {
    await inSavepoint(tx, () => appendReply(tx, deps, reply, contact!));
  } catch (e) {
    // The conversation refuses the write (e.g. the organisation's address left it): keep
    // the event, do not make the provider retry a reply that can never be appended.
    if (!(e instanceof AppError) || e.status >= 500) throw e;
    deps.log.warn({ org: reply.orgId, contact: contact.id, event: reply.eventId, err: e.message }, 'inbound reply could not be appended to the conversation');
  }
}

/** Appends a matched reply to the contact's conversation (or starts one), and marks the delivery replied. */
async function appendReply(tx: Tx, deps: Deps, reply: InboundReply, contact: SendContact): Promise<void> {
  const text = reply.text.trim() ? reply.text.slice(0, LIMITS.bodyChars) : '(empty reply)';
  const org = await orgById(tx, reply.orgId);
  markOrgApiTx(tx, new Set(contactAddresses(contact)));
  const source = { via: reply.plugin, event_id: reply.eventId };
  let convId = contact.conv_id ?? reply.convId;
  const row = convId !== null ? await tx.selectFrom('conversations').selectAll().where('id', '=', convId).forUpdate().executeTakeFirst() : undefined;
  if (!row) {
    // A contact who never had a conversation writes first: they start one with the organisation.
    const created = await insertNewConversation(tx, createClock(deps), {
      creator: contactParticipant(contact),
      subject: org.name,
      participants: [{ address: org.address, perms: 'write' }],
      messages: [{ body: text }],
      publish: true,
    });
    await tx.updateTable('conversations').set({ org_id: org.id }).where('id', '=', created.id).execute();
    await tx.updateTable('contacts').set({ conv_id: created.id }).where('id', '=', contact.id).execute();
    deps.log.info({ org: org.id, contact: contact.id, conv: created.key, ...source }, 'inbound message started a conversation');
    return;
  }
  convId = row.id;
  // The contact writes under the address they take part with; one who is not (any more) an
  // active participant is added back by the organisation's address first.
  const addresses = contactAddresses(contact);
  const part = await tx
    .selectFrom('participants')
    .select(['address'])
    .where('conv_id', '=', row.id)
    .where('address', 'in', addresses)
    .where('removed_id', 'is', null)
    .orderBy('added_id')
    .limit(1)
    .executeTakeFirst();
  let actor = part?.address;
  let current = row;
  if (!actor) {
    actor = contactParticipant(contact);
    await appendActions(tx, deps, row, org.address, [{ act: 'participant:add', participant: actor, perms: 'write' }]);
    current = (await tx.selectFrom('conversations').selectAll().where('id', '=', row.id).forUpdate().executeTakeFirstOrThrow())!;
  }
  const { actions } = await appendActions(tx, deps, current, actor, [{ act: 'message:add', body: text }]);
  if (reply.deliveryId === null)
    await markReplied(tx, deps, { orgId: org.id, contactId: contact.id, convId, beforeActionId: actions[0].id, via: reply.plugin, detail: { event_id: reply.eventId } });
}
