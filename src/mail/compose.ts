/**
 * Composing outbound email: an RFC 5322 message with a MIME (RFC 2045–2049) body of
 * text/plain and text/html alternatives plus attachments, built by nodemailer's
 * MailComposer.
 */
import MailComposer from 'nodemailer/lib/mail-composer';
import { normalizeAddress, type Mailbox } from './address.ts';

/** A file attached to an outbound message. */
export interface OutboundAttachment {
  /** File name shown to the recipient (encoded per RFC 2231 when not ASCII). */
  filename: string;
  /** Media type, e.g. `application/pdf`. */
  contentType: string;
  content: Buffer;
  /** Content-ID without angle brackets (RFC 2392), for `cid:` references from the HTML body. */
  contentId?: string;
  /** Content-Disposition `inline` instead of `attachment` (RFC 2183). */
  inline?: boolean;
}

/** Everything needed to compose one outbound message. */
export interface OutboundEmail {
  from: Mailbox;
  replyTo?: Mailbox;
  to: Mailbox[];
  cc?: Mailbox[];
  /** Subject, any Unicode (encoded as RFC 2047 encoded-words when not ASCII). */
  subject: string;
  /** Message-ID without angle brackets: `id-left@id-right` (RFC 5322 §3.6.4). */
  messageId: string;
  /** Message-ID (no brackets) of the message this one replies to. */
  inReplyTo?: string;
  /** Message-IDs (no brackets) of the thread, oldest first, ending with the parent. */
  references?: string[];
  /** Origination date (RFC 5322 §3.6.1). */
  date: Date;
  /** The text/plain alternative. */
  text: string;
  /** The text/html alternative. */
  html: string;
  attachments?: OutboundAttachment[];
  /** Extra header fields, e.g. `X-Parley-Conversation`; may not replace the fields above or the MIME fields. */
  headers?: Record<string, string>;
}

/** Header fields composeEmail writes itself, which `headers` may not set. */
const RESERVED_HEADER_FIELDS = new Set([
  'from',
  'sender',
  'reply-to',
  'to',
  'cc',
  'bcc',
  'subject',
  'date',
  'message-id',
  'in-reply-to',
  'references',
  'mime-version',
  'content-type',
  'content-transfer-encoding',
  'content-disposition',
]);
/** field-name (RFC 5322 §3.6.8): printable US-ASCII except the colon. */
const FIELD_NAME = /^[\x21-\x39\x3B-\x7E]+$/;
/** msg-id content (RFC 5322 §3.6.4): id-left "@" id-right, printable ASCII without brackets or whitespace. */
const MSG_ID = /^[\x21-\x3B\x3D\x3F-\x7E]+@[\x21-\x3B\x3D\x3F-\x5A\x5C\x5E-\x7E]+$/;

/**
 * Composes an RFC 5322 message: multipart/alternative text and HTML (inside
 * multipart/related and multipart/mixed when there are inline parts or attachments),
 * UTF-8 throughout, CRLF line endings.
 *
 * Threading (RFC 5322 §3.6.4): `In-Reply-To` is the parent's id; `References` is the
 * given list, which gets the parent appended when it does not already end with it, or just
 * the parent when no list is given.
 *
 * @returns the message bytes, ready for SMTP DATA
 * @throws Error on an invalid address, message id or extra header field (name not a
 *   field-name, value with CR/LF, or one of the fields composed here)
 */
export async function composeEmail(spec: OutboundEmail): Promise<Buffer> {
  const mailbox = (m: Mailbox) => ({ address: normalizeAddress(m.address), name: m.name });
  const references = threadReferences(spec.inReplyTo, spec.references);
  const composer = new MailComposer({
    from: mailbox(spec.from),
    ...(spec.replyTo ? { replyTo: mailbox(spec.replyTo) } : {}),
    to: spec.to.map(mailbox),
    ...(spec.cc?.length ? { cc: spec.cc.map(mailbox) } : {}),
    subject: spec.subject,
    messageId: `<${checkMsgId(spec.messageId)}>`,
    ...(spec.inReplyTo ? { inReplyTo: `<${checkMsgId(spec.inReplyTo)}>` } : {}),
    ...(references.length > 0 ? { references: references.map((id) => `<${checkMsgId(id)}>`) } : {}),
    date: spec.date,
    text: spec.text,
    html: spec.html,
    attachments: (spec.attachments ?? []).map((a) => ({
      filename: a.filename,
      contentType: a.contentType,
      content: a.content,
      contentDisposition: a.inline ? 'inline' : 'attachment',
      ...(a.contentId ? { cid: a.contentId } : {}),
    })),
    headers: checkExtraHeaders(spec.headers ?? {}),
    newline: 'win',
    disableFileAccess: true,
    disableUrlAccess: true,
  });
  return composer.compile().build();
}

/** The References list for a reply (RFC 5322 §3.6.4): the thread so far, ending with the parent. */
function threadReferences(inReplyTo: string | undefined, references: string[] | undefined): string[] {
  const list = [...(references ?? [])];
  if (inReplyTo && list[list.length - 1] !== inReplyTo) list.push(inReplyTo);
  return list;
}

function checkMsgId(id: string): string {
  if (!MSG_ID.test(id)) throw new Error(`Invalid message id "${id}": expected id-left@id-right without angle brackets or whitespace`);
  return id;
}

function checkExtraHeaders(headers: Record<string, string>): Record<string, string> {
  for (const [name, value] of Object.entries(headers)) {
    if (!FIELD_NAME.test(name)) throw new Error(`Invalid header field name "${name}"`);
    if (RESERVED_HEADER_FIELDS.has(name.toLowerCase())) throw new Error(`Header field ${name} is set by composeEmail itself; pass it as an OutboundEmail property`);
    if (/[\r\n]/.test(value)) throw new Error(`Header field ${name} has a line break in its value`);
  }
  return headers;
}

const HTML_ESCAPES: Record<string, string> = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };
const escapeHtml = (s: string): string => s.replace(/[&<>"']/g, (c) => HTML_ESCAPES[c]);
/** http(s) URLs and bare www. hosts; trailing punctuation is left out of the link. */
const LINK = /\b(?:https?:\/\/|www\.)[^\s<>"']*[^\s<>"'.,;:!?)\]}]/gi;

/**
 * Renders plain text as an HTML fragment for the text/html alternative: HTML-escaped,
 * blank-line-separated paragraphs as `<p>`, other line breaks as `<br>`, and http(s)/www
 * URLs as links. Returns '' for text that is empty or only whitespace.
 */
export function renderHtmlFromText(text: string): string {
  return text
    .replace(/\r\n?/g, '\n')
    .split(/\n[ \t]*\n+/)
    .filter((paragraph) => paragraph.trim() !== '')
    .map((paragraph) => `<p>${paragraph.replace(/^\n+|\n+$/g, '').split('\n').map(linkify).join('<br>\n')}</p>`)
    .join('\n');
}

/** Escapes one line of text and turns its URLs into links. */
function linkify(line: string): string {
  let html = '';
  let last = 0;
  for (const match of line.matchAll(LINK)) {
    const url = match[0];
    const href = /^www\./i.test(url) ? `https://${url}` : url;
    html += `${escapeHtml(line.slice(last, match.index))}<a href="${escapeHtml(href)}">${escapeHtml(url)}</a>`;
    last = match.index + url.length;
  }
  return html + escapeHtml(line.slice(last));
}
