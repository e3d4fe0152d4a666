/**
 * Parsing a raw email (RFC 5322 message, MIME per RFC 2045–2049) into the fields the
 * email bridge needs, tolerant of the defects real mail carries.
 */
import { isAscii } from 'node:buffer';
import { posix, win32 } from 'node:path';
import { simpleParser, type AddressObject, type Attachment, type EmailAddress, type HeaderLines, type ParsedMail, type SimpleParserOptions, type StructuredHeader } from 'mailparser';
import { detectExtension } from 'nodemailer/lib/mime-funcs';
import { normalizeAddress, type Mailbox } from './address.ts';
import { splitQuotedReply } from './quote.ts';

/** A MIME part that is not the message's body text: a file, an inline image, a returned message. */
export interface ParsedAttachment {
  /** File name from Content-Disposition/Content-Type (RFC 2183 / RFC 2231), without any directory part; generated as `part-<MIME part number>.<extension>` when the part has none. */
  filename: string;
  /** Lower-case media type, e.g. `image/png`. */
  contentType: string;
  /** Decoded size in bytes. */
  size: number;
  /** Decoded content. */
  content: Buffer;
  /** Content-ID without angle brackets (RFC 2392), referenced from HTML as `cid:<contentId>`; null when absent. */
  contentId: string | null;
  /** True for parts shown inside the body: Content-Disposition `inline` or part of a multipart/related. */
  inline: boolean;
}

/** The result of {@link parseEmail}. */
export interface ParsedEmail {
  /** Message-ID (RFC 5322 §3.6.4) without angle brackets; null when absent. */
  messageId: string | null;
  /** In-Reply-To message ids, without angle brackets, in header order. */
  inReplyTo: string[];
  /** References message ids, without angle brackets, in header order (oldest first). */
  references: string[];
  /** The author (RFC 5322 §3.6.2 From); the first mailbox when several are listed; null when missing or invalid. */
  from: Mailbox | null;
  /** The Sender mailbox (RFC 5322 §3.6.2), null when absent. */
  sender: Mailbox | null;
  /** Reply-To mailboxes (RFC 5322 §3.6.2). */
  replyTo: Mailbox[];
  /** To mailboxes (RFC 5322 §3.6.3), groups flattened. */
  to: Mailbox[];
  /** Cc mailboxes (RFC 5322 §3.6.3), groups flattened. */
  cc: Mailbox[];
  /** Subject with RFC 2047 encoded-words decoded; '' when absent. */
  subject: string;
  /** Origination date (RFC 5322 §3.6.1); null when absent or unparseable. */
  date: Date | null;
  /** The plain-text body; when the message has only HTML, text derived from it; '' when there is no body text. */
  text: string;
  /** The HTML body (with `cid:` links kept), null when the message has no HTML part. */
  html: string | null;
  /** What the sender wrote in `text`, without the quoted history (see `splitQuotedReply`). */
  newText: string;
  /** The quoted history found at the end of `text`, or null. */
  quoted: string | null;
  /** Attachments and inline parts, in MIME order. */
  attachments: ParsedAttachment[];
  /** The list identifier from List-Id (RFC 2919), lower-cased, without angle brackets; null when absent. */
  listId: string | null;
  /** Whether the message was sent by a machine: Auto-Submitted other than `no` (RFC 3834 §5), Precedence bulk/list/junk/auto_reply, or a multipart/report (RFC 6522: DSNs, MDNs). */
  autoSubmitted: boolean;
  /** Human-readable descriptions of defects found and repaired or worked around. */
  warnings: string[];
}

/** Options for {@link parseEmail}. */
export interface ParseOptions {
  /** Longest HTML body, in characters, converted to text when a message has no text part; longer ones make MIME parsing fail over to the raw-header fallback. Default 5 MiB. */
  maxHtmlLengthToParse?: number;
}

const DEFAULT_MAX_HTML_LENGTH_TO_PARSE = 5 * 1024 * 1024;
const CRLF = Buffer.from('\r\n');
/** A header field line (RFC 5322 §2.2: field-name ":"), allowing the whitespace before the colon of RFC 5322 §4.5. */
const HEADER_FIELD_LINE = /^[\x21-\x39\x3B-\x7E]+[ \t]*:/;
/** A continuation line of a folded header field (RFC 5322 §2.2.3). */
const CONTINUATION_LINE = /^[ \t]/;

/**
 * Parses a raw message (RFC 5322, MIME) into a {@link ParsedEmail}.
 *
 * Tolerates: an mbox `From ` envelope line at the top (or misplaced among the header
 * fields), raw 8-bit header bytes that are not UTF-8 (decoded as the declared body charset
 * or windows-1252), RFC 2047 encoded-words, legacy charsets, multipart/signed,
 * multipart/report, missing header fields, a missing header section, unterminated
 * multiparts. Invalid addresses are dropped. Every repair adds a sentence to `warnings`.
 * If MIME parsing itself fails, the result is built from the header fields and the raw
 * body text, with a warning saying so.
 *
 * @param raw the message bytes, with CRLF or LF line endings
 * @throws Error only when `raw` is empty or whitespace, i.e. not a message at all
 */
export async function parseEmail(raw: Buffer, options: ParseOptions = {}): Promise<ParsedEmail> {
  if (isBlank(raw)) throw new Error('Not an email message: the input is empty');
  const warnings: string[] = [];
  const message = repairHeaderSection(raw, warnings);
  const parserOptions: SimpleParserOptions = {
    keepCidLinks: true,
    skipTextToHtml: true,
    skipImageLinks: true,
    maxHtmlLengthToParse: options.maxHtmlLengthToParse ?? DEFAULT_MAX_HTML_LENGTH_TO_PARSE,
  };

  const { header, body } = splitAtHeaderEnd(message);
  let mail: ParsedMail;
  let mimeFailed = false;
  try {
    mail = await simpleParser(message, parserOptions);
  } catch (err) {
    warnings.push(`MIME parsing failed (${(err as Error).message}); the body is given undecoded as text, without attachments`);
    mail = await simpleParser(Buffer.concat([header, CRLF]), parserOptions);
    mimeFailed = true;
  }
  const contentType = mail.headers.get('content-type') as StructuredHeader | undefined;
  const defect = multipartDefect(body, contentType);
  if (defect) warnings.push(defect.warning);
  const undecoded = mimeFailed || defect?.noParts === true;
  const declaredCharset = contentType?.params?.charset;
  const text = undecoded ? decodeBytes(body, declaredCharset && isSupportedLegacyCharset(declaredCharset) ? declaredCharset : 'windows-1252') : (mail.text ?? '');
  const { newText, quoted } = splitQuotedReply(text);
  const headerLines = mail.headerLines;
  const messageIds = msgIdList(headerValue(headerLines, 'message-id'));
  const fromList = mailboxes(mail.from, 'From', warnings);
  if (!headerValue(headerLines, 'from')) warnings.push('Missing From header field');
  else if (fromList.length > 1) warnings.push(`From lists ${fromList.length} mailboxes; the first is taken as the author`);
  if (messageIds.length === 0) warnings.push('Missing Message-ID header field; replies to this message cannot be threaded to it');

  return {
    messageId: messageIds[0] ?? null,
    inReplyTo: msgIdList(headerValue(headerLines, 'in-reply-to')),
    references: msgIdList(headerValue(headerLines, 'references')),
    from: fromList[0] ?? null,
    sender: mailboxes(mail.headers.get('sender') as AddressObject | undefined, 'Sender', warnings)[0] ?? null,
    replyTo: mailboxes(mail.replyTo, 'Reply-To', warnings),
    to: mailboxes(mail.to, 'To', warnings),
    cc: mailboxes(mail.cc, 'Cc', warnings),
    subject: mail.subject ?? '',
    date: originationDate(headerValue(headerLines, 'date'), warnings),
    text,
    html: !undecoded && typeof mail.html === 'string' ? mail.html : null,
    newText,
    quoted,
    attachments: undecoded ? [] : mail.attachments.map(toParsedAttachment),
    listId: listIdOf(headerValue(headerLines, 'list-id')),
    autoSubmitted: isAutoSubmitted(headerLines, contentType),
    warnings,
  };
}

/** Bytes that String.prototype.trim() removes from a latin1 string: tab, LF, VT, FF, CR, space, no-break space. */
const BLANK_BYTES = new Set([0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x20, 0xa0]);

/** True when `raw` has nothing but those bytes (stops at the first other byte: no copy of the message). */
function isBlank(raw: Buffer): boolean {
  for (const byte of raw) if (!BLANK_BYTES.has(byte)) return false;
  return true;
}

/**
 * Splits a message at the blank line that ends its header section (RFC 5322 §2.1):
 * `header` keeps the line break of its last field, `separator` is the blank line itself.
 */
function splitAtHeaderEnd(message: Buffer): { header: Buffer; separator: Buffer; body: Buffer } {
  const leadingBlankLine = message[0] === 0x0a ? 1 : message[0] === 0x0d && message[1] === 0x0a ? 2 : 0;
  if (leadingBlankLine > 0) return { header: Buffer.alloc(0), separator: message.subarray(0, leadingBlankLine), body: message.subarray(leadingBlankLine) };
  const lf = message.indexOf('\n\n');
  const crlf = message.indexOf('\n\r\n');
  if (lf < 0 && crlf < 0) return { header: message, separator: Buffer.alloc(0), body: Buffer.alloc(0) };
  const end = crlf >= 0 && (lf < 0 || crlf < lf) ? crlf : lf;
  const bodyStart = end === crlf ? crlf + 3 : lf + 2;
  return { header: message.subarray(0, end + 1), separator: message.subarray(end + 1, bodyStart), body: message.subarray(bodyStart) };
}

/** An mbox envelope line ("From ann@example.com  Thu Aug 22 12:46:39 2002"), which is not a header field. */
const isEnvelopeLine = (line: string): boolean => line.startsWith('From ') && !HEADER_FIELD_LINE.test(line);

/**
 * Repairs the header section so the MIME parser reads it as intended: drops mbox `From `
 * envelope lines, gives a headerless input an empty header section, and re-encodes 8-bit
 * header bytes that are not UTF-8 as UTF-8.
 */
function repairHeaderSection(raw: Buffer, warnings: string[]): Buffer {
  const { header, separator, body } = splitAtHeaderEnd(raw);
  const lines = header.toString('latin1').split(/(?<=\n)/);
  const fields = lines.filter((line, index) => {
    if (!isEnvelopeLine(line)) return true;
    if (index > 0) warnings.push('Removed an mbox "From " envelope line found among the header fields');
    return false;
  });
  const firstLine = fields[0] ?? '';
  if (!HEADER_FIELD_LINE.test(firstLine) && !(CONTINUATION_LINE.test(firstLine) && HEADER_FIELD_LINE.test(firstLine.trimStart()))) {
    warnings.push('The message has no header section; the whole input is taken as the body');
    const withoutEnvelope = isEnvelopeLine(lines[0]) ? raw.subarray(lines[0].length) : raw;
    return Buffer.concat([CRLF, withoutEnvelope]);
  }
  const fieldBytes = Buffer.from(fields.join(''), 'latin1');
  return Buffer.concat([toUtf8HeaderSection(fieldBytes, warnings), separator.length > 0 ? separator : CRLF, body]);
}

/**
 * RFC 6532 allows UTF-8 in header fields; older mail put raw bytes of a legacy charset
 * there. Those are decoded as the charset declared for the body (if any) or windows-1252
 * and re-encoded as UTF-8, so the MIME parser (which assumes UTF-8) reads them correctly.
 */
function toUtf8HeaderSection(header: Buffer, warnings: string[]): Buffer {
  if (isAscii(header)) return header;
  try {
    new TextDecoder('utf-8', { fatal: true }).decode(header);
    return header;
  } catch {
    const declared = /^content-type:(?:[^\n]|\n[ \t])*?charset\s*=\s*"?([\w.:-]+)/im.exec(header.toString('latin1'))?.[1];
    const charset = declared && isSupportedLegacyCharset(declared) ? declared.toLowerCase() : 'windows-1252';
    warnings.push(`The header section contains 8-bit bytes that are not UTF-8; decoded them as ${charset}`);
    return Buffer.from(decodeBytes(header, charset), 'utf8');
  }
}

/** Whether `label` names a single- or multi-byte legacy encoding that TextDecoder can decode. */
function isSupportedLegacyCharset(label: string): boolean {
  try {
    const { encoding } = new TextDecoder(label);
    return encoding !== 'utf-8';
  } catch {
    return false;
  }
}

/** Decodes bytes as UTF-8 when they are valid UTF-8, otherwise as `legacyCharset` (a WHATWG encoding label). */
function decodeBytes(bytes: Buffer, legacyCharset: string): string {
  try {
    return new TextDecoder('utf-8', { fatal: true }).decode(bytes);
  } catch {
    return new TextDecoder(legacyCharset).decode(bytes);
  }
}

/**
 * A structural defect of a top-level multipart that the MIME parser works around silently
 * (RFC 2046 §5.1.1): no boundary parameter, no part starting with the boundary (`noParts`:
 * the parser then finds no body at all), or no close delimiter (the last part may be
 * truncated). Null when the message is not multipart or is well formed.
 */
function multipartDefect(body: Buffer, contentType: StructuredHeader | undefined): { warning: string; noParts: boolean } | null {
  const mediaType = contentType?.value?.toLowerCase() ?? '';
  if (!mediaType.startsWith('multipart/')) return null;
  const boundary = contentType?.params?.boundary;
  if (!boundary) return { warning: `The ${mediaType} message has no boundary parameter; its body was read as a single part`, noParts: false };
  const delimiter = `--${boundary}`;
  const lines = body.toString('latin1').split(/\r?\n/).map((line) => line.trimEnd());
  if (!lines.includes(delimiter)) {
    return { warning: `No part of the ${mediaType} message starts with its boundary "${boundary}"; the body is given undecoded as text`, noParts: true };
  }
  if (!lines.includes(`${delimiter}--`)) return { warning: `The ${mediaType} message has no close delimiter; its last part may be truncated`, noParts: false };
  return null;
}

/** The unfolded value of the first `key` header field (lower-case key), or null. */
function headerValue(headerLines: HeaderLines, key: string): string | null {
  const line = headerLines.find((h) => h.key === key)?.line;
  if (line === undefined) return null;
  return line.slice(line.indexOf(':') + 1).replace(/\r?\n(?=[ \t])/g, '').trim();
}

/**
 * The msg-ids of a Message-ID, In-Reply-To or References value (RFC 5322 §3.6.4), without
 * angle brackets. Values without brackets (pre-RFC 822 clients) are split on whitespace.
 */
function msgIdList(value: string | null): string[] {
  if (value === null) return [];
  const bracketed = [...value.matchAll(/<([^<>]+)>/g)].map((m) => m[1].replace(/\s+/g, ''));
  if (bracketed.length > 0) return bracketed.filter((id) => id !== '');
  return value.split(/[\s,]+/).filter((id) => id.includes('@'));
}

/** Valid, normalised mailboxes of an address header; invalid ones are dropped with a warning. */
function mailboxes(field: AddressObject | AddressObject[] | undefined, fieldName: string, warnings: string[]): Mailbox[] {
  const flatten = (entries: EmailAddress[]): EmailAddress[] => entries.flatMap((e) => (e.group ? flatten(e.group) : [e]));
  const entries = flatten([field ?? []].flat().flatMap((f) => f.value));
  const result: Mailbox[] = [];
  for (const entry of entries) {
    const name = (entry.name ?? '').trim();
    if (!entry.address) {
      if (name !== '') warnings.push(`Dropped "${name}" from ${fieldName}: it has no address`);
      continue;
    }
    try {
      result.push({ address: normalizeAddress(entry.address), name });
    } catch (err) {
      warnings.push(`Dropped an invalid address from ${fieldName}: ${(err as Error).message}`);
    }
  }
  return result;
}

/**
 * The Date header field as a Date (RFC 5322 §3.3, with the obsolete forms of §4.3:
 * comments, alphabetic zones, two-digit years); a missing zone is taken as UTC.
 */
function originationDate(value: string | null, warnings: string[]): Date | null {
  if (value === null) {
    warnings.push('Missing Date header field');
    return null;
  }
  const cleaned = value.replace(/\([^()]*\)/g, ' ').replace(/\s+/g, ' ').trim();
  const hasZone = /[+-]\d{4}\b|\b(?:UT|UTC|GMT|Z|[ECMP][SD]T)\b/i.test(cleaned);
  const time = Date.parse(hasZone ? cleaned : `${cleaned} GMT`);
  if (Number.isNaN(time)) {
    warnings.push(`Unparseable Date header field "${value}"`);
    return null;
  }
  return new Date(time);
}

/** The list identifier of a List-Id value (RFC 2919 §3): `Name <id>` → `id`. */
function listIdOf(value: string | null): string | null {
  if (value === null) return null;
  const id = (/<([^<>]*)>/.exec(value)?.[1] ?? value).trim().toLowerCase();
  return id === '' ? null : id;
}

function isAutoSubmitted(headerLines: HeaderLines, contentType: StructuredHeader | undefined): boolean {
  const token = (key: string) => (headerValue(headerLines, key) ?? '').replace(/\([^()]*\)/g, '').split(';')[0].trim().toLowerCase();
  const autoSubmitted = token('auto-submitted');
  if (autoSubmitted !== '' && autoSubmitted !== 'no') return true;
  if (['bulk', 'list', 'junk', 'auto_reply'].includes(token('precedence'))) return true;
  return contentType?.value?.toLowerCase() === 'multipart/report';
}

function toParsedAttachment(attachment: Attachment, index: number): ParsedAttachment {
  const contentType = attachment.contentType.toLowerCase();
  return {
    filename: safeFilename(attachment.filename) ?? `part-${attachment.partId ?? index + 1}.${extensionFor(contentType)}`,
    contentType,
    size: attachment.size,
    content: attachment.content,
    contentId: attachment.cid ?? null,
    inline: attachment.contentDisposition === 'inline' || attachment.related === true,
  };
}

/** The last path segment of a sender-supplied file name, without control characters; null when nothing usable remains. */
function safeFilename(filename: string | undefined): string | null {
  if (!filename) return null;
  const base = posix.basename(win32.basename(filename)).replace(/[\x00-\x1F\x7F]/g, '').trim();
  return base === '' || base === '.' || base === '..' ? null : base;
}

function extensionFor(contentType: string): string {
  const extension = detectExtension(contentType);
  return /^[a-z0-9]+$/i.test(extension) ? extension : 'bin';
}
