/**
 * Separating a reply's new text from the quoted history its mail client appended.
 *
 * Recognised shapes (everything from the marker to the end becomes `quoted`):
 * - a trailing block of `>`-quoted lines (RFC 3676 §4.5 quote marks), with or without an
 *   attribution line before it: "On Mon, 1 Jan 2024, Ann <ann@example.com> wrote:", its
 *   localised variants ("Le … a écrit :", "Am … schrieb …:", "El … escribió:", …), a bare
 *   "Ann wrote:", mutt's "* Ann <ann@example.com> [2002-10-07 14:32]:"; the attribution may
 *   be wrapped over up to three lines, as Gmail's plain-text part does;
 * - an unquoted "-----Original Message-----" separator (and localised variants); a quoted
 *   one is simply part of a trailing quote block;
 * - an Outlook header block: "From: …" followed by "Sent:"/"Date:" and "To:"/"Subject:"
 *   lines (English, French, German, Spanish, Italian, Dutch, Portuguese, Scandinavian),
 *   optionally after a "____" rule.
 *
 * Anything else — in particular interleaved quoting, where new paragraphs answer quoted
 * ones, and a forwarded message with its header block and quotes — is left in `newText`.
 */

/** Result of {@link splitQuotedReply}. */
export interface QuoteSplit {
  /** The text the sender wrote, trailing blank lines removed; the whole text when nothing was recognised. Never empty unless the input is. */
  newText: string;
  /** The quoted history from its first marker line to the end, or null when none was recognised. */
  quoted: string | null;
}

/** How many lines an attribution may be wrapped over. */
const MAX_ATTRIBUTION_LINES = 3;
/** How many lines after an Outlook "From:" line its other header lines may appear. */
const OUTLOOK_HEADER_WINDOW = 6;

const isQuoted = (line: string): boolean => /^[ \t]*>/.test(line);
const isBlank = (line: string): boolean => line.trim() === '';

const ORIGINAL_MESSAGE_SEPARATOR = new RegExp(
  '^\\s*-{2,}\\s*(?:' +
    [
      'original message',
      'ursprüngliche nachricht',
      "message d'origine",
      'message original',
      'mensaje original',
      'messaggio originale',
      'oorspronkelijk bericht',
      'mensagem original',
      'originalmeddelande',
      'opprinnelig melding',
      'oprindelig meddelelse',
      'alkuperäinen viesti',
      'wiadomość oryginalna',
    ].join('|') +
    ')\\s*-{2,}\\s*$',
  'iu',
);

/** The verb that ends an attribution line, in the supported languages, before its colon. */
const ATTRIBUTION_VERB =
  '(?:\\b(?:wrote|writes|said)|\\ba écrit|\\bschrieb\\b.*|\\bescribió|\\bha scritto|\\bschreef\\b.*|' +
  '\\bescreveu|\\bskrev\\b.*|\\bnapisał(?:a)?.*|\\bpisze|\\bkirjoitti)\\s*:\\s*$';
/** "On <date>, <person> wrote:" and its localised forms; mail clients may wrap it over several lines. */
const DATED_ATTRIBUTION = new RegExp(`^(?:on|le|am|el|il|in data|op|em|às|den|på|w dniu|dnia)\\s.*${ATTRIBUTION_VERB}`, 'iu');
/** "<person> wrote:" on one line. */
const SHORT_ATTRIBUTION = new RegExp(ATTRIBUTION_VERB, 'iu');
/** mutt's default attribution: "* Ann <ann@example.com> [2002-10-07 14:32 +0200]:". */
const MUTT_ATTRIBUTION = /^\* .+ \[[^\]]+\]:\s*$/u;
/** IMP/Horde's attribution: "Quoting Ann <ann@example.com>:". */
const QUOTING_ATTRIBUTION = /^(?:quoting|zitat von|citando|citation de)\b.+:\s*$/iu;

/** Optional bold markers (`*From:*`) left by HTML-to-text conversion. */
const field = (names: string[]): RegExp => new RegExp(`^\\s*\\*?(?:${names.join('|')})\\s*:\\*?\\s*\\S`, 'iu');
const OUTLOOK_FROM = field(['from', 'de', 'von', 'van', 'da', 'från', 'fra', 'od']);
const OUTLOOK_SENT = field(['sent', 'date', 'envoyé', 'gesendet', 'datum', 'verzonden', 'inviato', 'enviado', 'enviada', 'data', 'skickat', 'sendt', 'wysłano', 'fecha']);
const OUTLOOK_TO_OR_SUBJECT = field(['to', 'subject', 'à', 'a', 'an', 'aan', 'para', 'till', 'til', 'do', 'objet', 'betreff', 'onderwerp', 'oggetto', 'asunto', 'assunto', 'ämne', 'emne', 'temat']);
/** The rule Outlook draws above its header block. */
const OUTLOOK_RULE = /^\s*_{10,}\s*$/;
/** Starts a forwarded message, whose header block and quotes are content, not history. */
const FORWARD_MARKER =
  /^\s*(?:-+\s*(?:forwarded message|begin forwarded text|weitergeleitete nachricht|message transféré|mensaje reenviado|messaggio inoltrato|doorgestuurd bericht)\s*-*|begin forwarded message:)\s*$/iu;

/** Whether lines[i..] starts an Outlook-style header block of the replied-to message. */
function isOutlookHeaderBlock(lines: string[], i: number): boolean {
  if (!OUTLOOK_FROM.test(lines[i])) return false;
  const window = lines.slice(i + 1, i + 1 + OUTLOOK_HEADER_WINDOW);
  return window.some((l) => OUTLOOK_SENT.test(l)) && window.some((l) => OUTLOOK_TO_OR_SUBJECT.test(l));
}

/**
 * Where the attribution line(s) ending at lines[end] start, best guess first: a dated
 * attribution over one to three lines (shortest first), then a one-line "Ann wrote:".
 */
function attributionStarts(lines: string[], end: number): number[] {
  const starts: number[] = [];
  let joined = '';
  for (let i = end; i > end - MAX_ATTRIBUTION_LINES && i >= 0 && !isBlank(lines[i]); i--) {
    joined = joined === '' ? lines[i].trim() : `${lines[i].trim()} ${joined}`;
    if (DATED_ATTRIBUTION.test(joined)) starts.push(i);
  }
  const line = lines[end];
  if (SHORT_ATTRIBUTION.test(line) || MUTT_ATTRIBUTION.test(line) || QUOTING_ATTRIBUTION.test(line)) starts.push(end);
  return starts;
}

/** Candidate first lines of the quoted history, best first; empty when none is recognised. */
function quoteStartCandidates(lines: string[]): number[] {
  const forwardStart = lines.findIndex((l) => !isQuoted(l) && FORWARD_MARKER.test(l));
  for (let i = 0; i < (forwardStart < 0 ? lines.length : forwardStart); i++) {
    if (isQuoted(lines[i])) continue;
    if (ORIGINAL_MESSAGE_SEPARATOR.test(lines[i])) return [i];
    if (isOutlookHeaderBlock(lines, i)) return [i > 0 && OUTLOOK_RULE.test(lines[i - 1]) ? i - 1 : i];
  }
  if (forwardStart >= 0) return [];
  // A trailing block of quoted lines, unless quotes also appear above it (interleaved quoting).
  let lastNewLine = lines.length - 1;
  while (lastNewLine >= 0 && (isQuoted(lines[lastNewLine]) || isBlank(lines[lastNewLine]))) lastNewLine--;
  if (lastNewLine < 0 || lastNewLine === lines.length - 1) return [];
  if (lines.slice(0, lastNewLine).some(isQuoted) || !lines.slice(lastNewLine + 1).some(isQuoted)) return [];
  let blockStart = lastNewLine + 1;
  while (isBlank(lines[blockStart])) blockStart++;
  const attribution = attributionStarts(lines, lastNewLine);
  return attribution.length > 0 ? attribution : [blockStart];
}

/**
 * Splits a plain-text reply into the text its author wrote and the quoted history below
 * it (see the module comment for the recognised shapes).
 *
 * Line breaks in the returned parts are `\n`. When nothing is recognised, or the new
 * text would be empty (the message is only a quote), the result is
 * `{ newText: text, quoted: null }` with `text` returned unchanged. Never throws.
 */
export function splitQuotedReply(text: string): QuoteSplit {
  const lines = text.split(/\r?\n/);
  for (const start of quoteStartCandidates(lines)) {
    const newText = lines.slice(0, start).join('\n').trimEnd();
    if (newText.trim() !== '') return { newText, quoted: lines.slice(start).join('\n').trimEnd() };
  }
  return { newText: text, quoted: null };
}
