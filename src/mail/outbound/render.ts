import type { Action } from '../../core/actions.ts';
import { type Deps, isLocalAddress, primaryDomain } from '../../context.ts';
import type { OutboundEmail } from '../compose.ts';
import { renderHtmlFromText } from '../compose.ts';
import type { EmailDeliveryPayload } from './enqueue.ts';

/** Address that routes replies into a conversation: `reply+<key>@<primary domain>` (the SMTP server accepts it). */
export function replyAddress(key: string, domain: string): string {
  return `reply+${key}@${domain}`;
}

/** Most Message-IDs kept in References (the first and the latest), RFC 5322 §3.6.4 allows trimming. */
const MAX_REFERENCES = 20;

async function displayName(deps: Deps, address: string): Promise<string> {
  if (!isLocalAddress(deps, address)) return '';
  const u = await deps.db.kysely.selectFrom('users').select('name').where('address', '=', address).executeTakeFirst();
  return u?.name ?? '';
}

function describe(a: Action, subject: string): string {
  switch (a.act) {
    case 'message:delete':
      return `${a.actor} deleted a message.`;
    case 'participant:add':
      return `${a.actor} added ${a.participant} to the conversation.`;
    case 'participant:remove':
      return a.participant === a.actor ? `${a.actor} left the conversation.` : `${a.actor} removed ${a.participant} from the conversation.`;
    case 'subject:modify':
      return `${a.actor} changed the subject to "${subject}".`;
    default:
      return '';
  }
}

/**
 * Renders the email for one action and one recipient (issue 2, "Outbound"): From the
 * local actor (or "<actor> via Parley" for a remote one), Reply-To the conversation's reply
 * address, To every active participant but the actor, threading headers from the Message-IDs
 * of the conversation's earlier emails, text and HTML bodies, and the files of the messages
 * shown. A recipient new to the conversation (`full`) gets every message so far.
 * @returns the email, or null when the action or conversation no longer exists
 */
export async function renderEmail(deps: Deps, convId: number, payload: EmailDeliveryPayload): Promise<OutboundEmail | null> {
  const db = deps.db.kysely;
  const conv = await db.selectFrom('conversations').select(['key', 'subject']).where('id', '=', convId).executeTakeFirst();
  const row = await db.selectFrom('actions').select('body').where('conv_id', '=', convId).where('id', '=', payload.action_id).executeTakeFirst();
  if (!conv || !row) return null;
  const a = row.body as Action;
  const domain = primaryDomain(deps);
  const participants = await db
    .selectFrom('participants')
    .select(['address', 'added_id', 'removed_id'])
    .where('conv_id', '=', convId)
    .execute();
  const to = participants
    .filter((p) => p.added_id <= a.id && (p.removed_id === null || p.removed_id >= a.id) && p.address !== a.actor)
    .map((p) => ({ address: p.address, name: '' }));
  const earlier = await db
    .selectFrom('email_messages')
    .select('message_id')
    .where('conv_id', '=', convId)
    .where((eb) => eb.or([eb('action_id', 'is', null), eb('action_id', '<', a.id)]))
    .orderBy('id')
    .execute();
  const ids = earlier.map((e) => e.message_id).filter((m) => m !== payload.message_id);
  const references = ids.length > MAX_REFERENCES ? [ids[0], ...ids.slice(-(MAX_REFERENCES - 1))] : ids;

  type Shown = { author: string; body: string; ts: Date | string; files: { sha256: string; name: string; content_type: string; content_id?: string; inline?: boolean }[] };
  let shown: Shown[] = [];
  let intro = describe(a, conv.subject);
  if (payload.full) {
    const msgs = await db
      .selectFrom('messages')
      .select(['author', 'body', 'created_ts', 'files'])
      .where('conv_id', '=', convId)
      .where('deleted', '=', false)
      .where('id', '<=', a.id)
      .orderBy('id')
      .execute();
    shown = msgs.map((m) => ({ author: m.author, body: m.body, ts: m.created_ts, files: m.files }));
    if (a.act === 'conv:publish') intro = '';
  } else if (a.act === 'message:add' || a.act === 'message:modify') {
    shown = [{ author: a.actor, body: a.body ?? '', ts: a.ts, files: a.files ?? [] }];
    if (a.act === 'message:modify') intro = `${a.actor} edited a message:`;
  }
  const parts: string[] = [];
  if (intro) parts.push(intro);
  const many = shown.length > 1;
  for (const m of shown) {
    parts.push(many ? `From ${m.author}, ${new Date(m.ts).toUTCString()}:\n\n${m.body}` : m.body);
  }
  const text = parts.join('\n\n----\n\n');
  const attachments = [];
  for (const m of shown) {
    for (const f of m.files) {
      if (!deps.blobs.has(f.sha256)) continue;
      const content = await new Promise<Buffer>((resolve, reject) => {
        const chunks: Buffer[] = [];
        deps.blobs.read(f.sha256).on('data', (c) => chunks.push(c as Buffer)).on('end', () => resolve(Buffer.concat(chunks))).on('error', reject);
      });
      attachments.push({ filename: f.name, contentType: f.content_type, content, ...(f.content_id ? { contentId: f.content_id } : {}), inline: !!f.inline });
    }
  }
  const local = isLocalAddress(deps, a.actor);
  const from = local
    ? { address: a.actor, name: await displayName(deps, a.actor) }
    : { address: `parley@${domain}`, name: `${a.actor} via Parley` };
  return {
    from,
    replyTo: { address: replyAddress(conv.key, domain), name: conv.subject.slice(0, 60) },
    to,
    subject: conv.subject || '(no subject)',
    messageId: payload.message_id,
    ...(references.length ? { inReplyTo: references[references.length - 1], references } : {}),
    date: new Date(a.ts),
    text,
    html: renderHtmlFromText(text),
    attachments,
    headers: { 'X-Parley-Conversation': conv.key },
  };
}
