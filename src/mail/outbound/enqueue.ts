import { sql } from 'kysely';
import type { Action, ActionType } from '../../core/actions.ts';
import type { ConversationState } from '../../core/reducer.ts';
import { type Deps, isLocalAddress, primaryDomain } from '../../context.ts';
import { notifyAfterCommit, type Tx } from '../../store/db.ts';
import { routeOrganisationActions } from '../../organisations/replies.ts';
import { federatedRecipients } from '../../federation/outbox.ts';

/** The realtime channel that wakes delivery workers (payload unused). */
export const DELIVERIES_CHANNEL = 'parley_deliveries';

/** Actions a person on plain email hears of (issue 2, "Outbound"). Seen, locks, releases, expiry: silent. */
export const EMAILED_ACTIONS: ReadonlySet<ActionType> = new Set<ActionType>([
  'conv:publish',
  'message:add',
  'message:modify',
  'message:delete',
  'participant:add',
  'participant:remove',
  'subject:modify',
]);

/** The Message-ID of the email for action `id` of conversation `key` (stable across retries). */
export function outboundMessageId(key: string, actionId: number, domain: string): string {
  return `${key}.${actionId}@${domain}`;
}

/**
 * The conversation key and the sending platform's domain of a Message-ID made by
 * {@link outboundMessageId} — by this platform or any other Parley platform — or null for
 * any other Message-ID. A follower threads an email reply to the leader's email by it
 * (issue 3 §8: it never saw that email, so has no `email_messages` row for it).
 * @param messageId without angle brackets, e.g. `0f3c…9a.12@alpha.test`
 */
export function parseOutboundMessageId(messageId: string): { key: string; domain: string } | null {
  const m = /^([0-9a-f]{32})\.[1-9][0-9]{0,9}@([^@\s]+)$/.exec(messageId);
  return m ? { key: m[1], domain: m[2].toLowerCase() } : null;
}

/** Payload of an `smtp` delivery row: which action to render, and whether to include the whole conversation. */
export interface EmailDeliveryPayload {
  action_id: number;
  message_id: string;
  /** true for a recipient new to the conversation: the email carries every message so far. */
  full: boolean;
}

/**
 * What {@link enqueueEmails} leaves out while set on a transaction (see {@link suppressEmails}):
 * `all` — nothing at all; `smtp` — the automatic emails only (organisation routing still runs).
 */
export type EmailSuppression = 'all' | 'smtp';
const suppressed = new WeakMap<object, EmailSuppression>();

/**
 * Until called again, actions appended in `tx` create no outbound email (`all`), or no
 * automatic email while organisation routing still runs (`smtp`); `null` restores normal
 * behaviour. Used by the email bridge (src/mail/inbound/ingest-email.ts) for actions
 * nobody must be emailed about — a conversation started by an email, the sender added to
 * one, anything imported — so that no delivery row is created only to be withdrawn.
 */
export function suppressEmails(tx: Tx, mode: EmailSuppression | null): void {
  if (mode === null) suppressed.delete(tx);
  else suppressed.set(tx, mode);
}

/** Actions ("conv id:action id") that {@link enqueueEmails} leaves out in a transaction: see {@link withholdEmails}. */
const withheld = new WeakMap<object, Set<string>>();

/**
 * Actions of conversation `convId` appended in `tx` that create no outbound email whatever
 * the suppression in effect: the email bridge adds a message's sender and their message in
 * one append, and only the message may be emailed (ingest-email.ts).
 */
export function withholdEmails(tx: Tx, convId: number, actionIds: number[]): void {
  let set = withheld.get(tx);
  if (!set) withheld.set(tx, (set = new Set()));
  for (const id of actionIds) set.add(`${convId}:${id}`);
}

/**
 * True while the email bridge appends in `tx` ({@link suppressEmails} in effect, or
 * {@link withholdEmails} called in it): the participants it adds took part by email — the
 * sender and recipients of a received or imported message — and are email participants of
 * the conversation whatever their domain (federation/outbox.ts trackReplication does not
 * look their platforms up).
 */
export function bridgingEmail(tx: Tx): boolean {
  return suppressed.has(tx) || withheld.has(tx);
}

/**
 * Creates, in the writing transaction, one `smtp` delivery row per email participant and
 * per action they should hear of (the transactional outbox), and records the outgoing
 * Message-IDs for threading replies. Email participants are participants whose domain is
 * not served here (until federation finds their platform). Nothing is sent for drafts;
 * the actor never gets their own action; recipients of an inbound email are not sent
 * Parley's copy of that same email; nothing while {@link suppressEmails} says so.
 */
export async function enqueueEmails(
  tx: Tx,
  deps: Deps,
  convId: number,
  s: ConversationState,
  actions: Action[],
  wasPublished: boolean,
): Promise<void> {
  const h = s.header!;
  const suppression = suppressed.get(tx);
  if (suppression === 'all') return; // see suppressEmails
  let emailParticipants = [...s.participants.values()].filter((p) => !isLocalAddress(deps, p.address));
  if (emailParticipants.length === 0) return; // nobody on email (an organisation's contact always is)
  // Federation (issue 3 §8): only the leader mails; remote participants are replicated to.
  const federated = await federatedRecipients(tx, deps, convId);
  if (federated === null) return;
  if (federated.size > 0) emailParticipants = emailParticipants.filter((p) => !federated.has(p.address));
  if (emailParticipants.length === 0) return;
  // Organisation conversations (issue 4 §5, docs/organisations.md): the contact is reached
  // through the organisation's servicechain, not by this automatic email — members' replies
  // are enqueued there instead; other email participants are emailed as usual.
  const routed = await routeOrganisationActions(tx, deps, convId, s, actions, wasPublished);
  if (routed) emailParticipants = emailParticipants.filter((p) => !routed.has(p.address));
  if (emailParticipants.length === 0 || suppression === 'smtp') return;
  const domain = primaryDomain(deps);
  const expiresAt = new Date(deps.clock.now() + deps.config.deliveryMaxAgeHours * 3600_000);
  const rows: {
    conv_id: number;
    action_id: number;
    plugin: string;
    destination: string;
    idempotency_key: string;
    payload: EmailDeliveryPayload;
    expires_at: Date;
  }[] = [];
  const messageIds: { conv_id: number; message_id: string; action_id: number }[] = [];
  let published = wasPublished;
  for (const a of actions) {
    if (a.act === 'conv:publish') published = true;
    if (!published || !EMAILED_ACTIONS.has(a.act) || withheld.get(tx)?.has(`${convId}:${a.id}`)) continue;
    const alreadyGotIt = new Set(a.source?.kind === 'email' ? (a.source.recipients ?? []) : []);
    const messageId = outboundMessageId(h.key, a.id, domain);
    let any = false;
    for (const p of emailParticipants) {
      const active = a.id >= p.added_id && (p.removed_id === null || a.id <= p.removed_id);
      if (!active || p.address === a.actor || alreadyGotIt.has(p.address)) continue;
      const full = a.act === 'conv:publish' || (a.act === 'participant:add' && a.participant === p.address);
      const payload: EmailDeliveryPayload = { action_id: a.id, message_id: messageId, full };
      rows.push({
        conv_id: convId,
        action_id: a.id,
        plugin: 'smtp',
        destination: p.address,
        idempotency_key: `smtp:${convId}:${a.id}:${p.address}`,
        payload,
        expires_at: expiresAt,
      });
      any = true;
    }
    if (any) messageIds.push({ conv_id: convId, message_id: messageId, action_id: a.id });
  }
  if (rows.length === 0) return;
  // One statement (the same text for any number of rows): the delivery rows and the Message-IDs.
  await sql`
    with d as (
      insert into deliveries (conv_id, action_id, plugin, destination, idempotency_key, payload, expires_at)
      select r.conv_id, r.action_id, r.plugin, r.destination, r.idempotency_key, r.payload, r.expires_at
        from jsonb_to_recordset(${JSON.stringify(rows)}::jsonb)
             as r(conv_id bigint, action_id integer, plugin text, destination text, idempotency_key text, payload jsonb, expires_at timestamptz)
      on conflict (idempotency_key) do nothing)
    insert into email_messages (conv_id, message_id, direction, action_id)
    select r.conv_id, r.message_id, 'out', r.action_id
      from jsonb_to_recordset(${JSON.stringify(messageIds)}::jsonb) as r(conv_id bigint, message_id text, action_id integer)
    on conflict do nothing`.execute(tx);
  await notifyAfterCommit(tx, DELIVERIES_CHANNEL, '');
}
