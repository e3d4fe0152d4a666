import { createHash } from 'node:crypto';
import { badRequest } from '../platform/errors.ts';

/**
 * The search query language of `GET /api/search` (issue 2, "Search"), parsed by a pure
 * function so it can be tested without a database.
 *
 * A query is a list of terms separated by white space; every term must hold for a
 * conversation to match (there is no OR and no negation):
 *
 * - `word` — a free word, matched as a prefix (`meet` matches "meeting", "meetings") in the
 *   subject, any message body, any participant's address or any file name the caller may
 *   see. Case-insensitive; English stems match too (`meetings` matches "meeting"). Words
 *   are cut at characters other than letters, digits and `. _ @ + - /`, so `re:lunch` is
 *   the two words `re` and `lunch`.
 * - `"a phrase"` — the words in this order in the subject or in one message (English
 *   stemming, no prefix matching: quoting one word asks for that word, not a prefix).
 * - `from:X` — some message the caller may see was written by an address matching X.
 * - `to:X` — X is a recipient: a participant other than the creator (current or removed).
 * - `includes:X` — X is anyone in the conversation: a participant, creator included.
 * - `subject:word`, `subject:"a phrase"` — in the subject (prefix matching for a word).
 * - `has:attachment` (also `has:attachments`, `has:file`, `has:files`) — some message the
 *   caller may see has files.
 *
 * An address X matches when it is a prefix of the whole address, the local part, a piece
 * of the local part split at `. + _ -`, the domain or a parent domain: `bob`, `bob@ex`,
 * `example.com`, `example` and `smith` all match `bob.smith@example.com`. A leading `@`
 * is ignored (`to:@example.com`). Filter names are case-insensitive; a quoted value holding
 * several words (`from:"bob carol"`) is the same as the filter repeated for each word.
 *
 * English stopwords ("the", "and", …: PostgreSQL's `english` list) are ignored as free
 * words and subject words; they are reported back in `ignored`.
 */
export interface SearchQuery {
  /** Free words (lowercased, prefix-matched anywhere). */
  words: string[];
  /** Free phrases (lowercased words joined by one space). */
  phrases: string[];
  /** Words the subject must contain (prefix). */
  subjectWords: string[];
  /** Phrases the subject must contain. */
  subjectPhrases: string[];
  /** Address prefixes (lowercased) of message authors. */
  from: string[];
  /** Address prefixes of recipients (participants other than the creator). */
  to: string[];
  /** Address prefixes of participants, creator included. */
  includes: string[];
  /** `has:attachment` was given. */
  hasAttachment: boolean;
  /** Stopwords left out, in query order. */
  ignored: string[];
}

/** Longest query accepted, in characters (UTF-16 code units, as JavaScript counts). */
export const MAX_QUERY_CHARS = 500;
/** Most terms (words, phrases, filters) in one query. */
export const MAX_TERMS = 20;
/** Longest word kept; longer words are cut, which keeps them a prefix. */
export const MAX_WORD_CHARS = 100;

/** PostgreSQL's English stopword list (share/tsearch_data/english.stop). */
export const ENGLISH_STOPWORDS: ReadonlySet<string> = new Set(
  (
    'i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers herself ' +
    'it its itself they them their theirs themselves what which who whom this that these those am is are was were be ' +
    'been being have has had having do does did doing a an the and but if or because as until while of at by for with ' +
    'about against between into through during before after above below to from up down in out on off over under again ' +
    'further then once here there when where why how all any both each few more most other some such no nor not only ' +
    'own same so than too very s t can will just don should now'
  ).split(' '),
);

const FILTERS = new Set(['from', 'to', 'includes', 'subject', 'has']);
const HAS_ATTACHMENT = new Set(['attachment', 'attachments', 'file', 'files']);
/** Characters a word may keep besides letters and digits (none is a tsquery operator). */
const WORD_SPLIT = /[^\p{L}\p{M}\p{N}._@+\-/]+/u;
const EDGE_PUNCT = /^[._@+\-/]+|[._@+\-/]+$/g;
const HAS_ALNUM = /[\p{L}\p{N}]/u;

const invalid = (reason: string, message: string, extra: Record<string, unknown> = {}) =>
  badRequest('invalid_query', message, { reason, ...extra });

/**
 * Splits text into normalised search words: NFKC, lowercased, cut at characters other
 * than letters, digits and `. _ @ + - /`, those trimmed from both ends, at most
 * {@link MAX_WORD_CHARS} characters each, words without a letter or digit dropped.
 */
export function searchWords(text: string): string[] {
  return text
    .normalize('NFKC')
    .toLowerCase()
    .split(WORD_SPLIT)
    .map((w) => w.replace(EDGE_PUNCT, '').slice(0, MAX_WORD_CHARS))
    .filter((w) => HAS_ALNUM.test(w));
}

/** Normalises an address filter value: lowercased, surrounding `<>`, quotes and a leading `@` removed. */
function addressValues(value: string): string[] {
  return value
    .normalize('NFKC')
    .toLowerCase()
    .split(/\s+/)
    .map((v) => v.replace(/^[<"'@]+|[>"',;]+$/g, '').slice(0, 320))
    .filter((v) => v.length > 0);
}

interface RawTerm {
  key: string | null;
  value: string;
  quoted: boolean;
}

/** Splits the query into terms: `key:value`, `key:"quoted value"`, `"phrase"`, bare tokens. */
function tokenize(q: string): RawTerm[] {
  const terms: RawTerm[] = [];
  let i = 0;
  const n = q.length;
  const readQuoted = (): string => {
    // i is at the opening quote; an unclosed quote runs to the end of the query.
    const end = q.indexOf('"', i + 1);
    const v = q.slice(i + 1, end < 0 ? n : end);
    i = end < 0 ? n : end + 1;
    return v;
  };
  while (i < n) {
    if (/\s/.test(q[i]!)) {
      i++;
      continue;
    }
    const m = /^([A-Za-z]+):/.exec(q.slice(i, i + 12));
    if (m && FILTERS.has(m[1]!.toLowerCase())) {
      const key = m[1]!.toLowerCase();
      i += m[0].length;
      if (q[i] === '"') terms.push({ key, value: readQuoted(), quoted: true });
      else {
        const start = i;
        while (i < n && !/\s/.test(q[i]!)) i++;
        terms.push({ key, value: q.slice(start, i), quoted: false });
      }
    } else if (q[i] === '"') {
      terms.push({ key: null, value: readQuoted(), quoted: true });
    } else {
      const start = i;
      while (i < n && !/\s/.test(q[i]!) && q[i] !== '"') i++;
      terms.push({ key: null, value: q.slice(start, i), quoted: false });
    }
  }
  return terms;
}

/**
 * Parses a search query (the language is described on {@link SearchQuery}).
 * @param q the query as typed
 * @returns the normalised terms
 * @throws AppError 400 `invalid_query` (with `details.reason`): longer than
 *   {@link MAX_QUERY_CHARS} characters (`too_long`), nothing to search for (`empty`), only
 *   stopwords (`only_stopwords`), a filter without a value (`empty_filter`), an unknown
 *   `has:` value (`unknown_has`), more than {@link MAX_TERMS} terms (`too_many_terms`).
 */
export function parseSearchQuery(q: string): SearchQuery {
  if (q.length > MAX_QUERY_CHARS)
    throw invalid('too_long', `the query is longer than ${MAX_QUERY_CHARS} characters`, { max_chars: MAX_QUERY_CHARS });
  const out: SearchQuery = { words: [], phrases: [], subjectWords: [], subjectPhrases: [], from: [], to: [], includes: [], hasAttachment: false, ignored: [] };
  const addWords = (text: string, quoted: boolean, words: string[], phrases: string[]) => {
    const ws = searchWords(text);
    const kept = ws.filter((w) => !ENGLISH_STOPWORDS.has(w));
    if (quoted && ws.length > 0) {
      // A phrase is kept whole (stopwords inside it still count for word positions).
      if (kept.length > 0) phrases.push(ws.join(' '));
      else out.ignored.push(ws.join(' '));
      return;
    }
    for (const w of ws) {
      if (ENGLISH_STOPWORDS.has(w)) out.ignored.push(w);
      else if (!words.includes(w)) words.push(w);
    }
  };
  for (const t of tokenize(q)) {
    if (t.key === null) {
      addWords(t.value, t.quoted, out.words, out.phrases);
      continue;
    }
    if (t.value.trim() === '') throw invalid('empty_filter', `${t.key}: needs a value, e.g. ${t.key}:${t.key === 'has' ? 'attachment' : 'bob'}`, { filter: t.key });
    switch (t.key) {
      case 'has': {
        const v = t.value.trim().toLowerCase();
        if (!HAS_ATTACHMENT.has(v)) throw invalid('unknown_has', `has:${v} is not a filter; use has:attachment`, { filter: 'has', value: v });
        out.hasAttachment = true;
        break;
      }
      case 'subject':
        addWords(t.value, t.quoted, out.subjectWords, out.subjectPhrases);
        break;
      case 'from':
      case 'to':
      case 'includes': {
        const vs = addressValues(t.value);
        if (vs.length === 0) throw invalid('empty_filter', `${t.key}: needs an address or a part of one`, { filter: t.key });
        const list = out[t.key];
        for (const v of vs) if (!list.includes(v)) list.push(v);
        break;
      }
    }
  }
  const terms =
    out.words.length + out.phrases.length + out.subjectWords.length + out.subjectPhrases.length + out.from.length + out.to.length + out.includes.length + (out.hasAttachment ? 1 : 0);
  if (terms === 0) {
    if (out.ignored.length > 0)
      throw invalid('only_stopwords', `the query has only common words that are not indexed (${out.ignored.slice(0, 5).join(', ')}); add a more specific word`, { ignored: out.ignored });
    throw invalid('empty', 'the query is empty: give a word to search for or a filter (from:, to:, includes:, subject:, has:attachment)');
  }
  if (terms > MAX_TERMS) throw invalid('too_many_terms', `the query has ${terms} terms; at most ${MAX_TERMS} are allowed`, { max_terms: MAX_TERMS });
  return out;
}

/**
 * A short fingerprint of a parsed query (hex), stored in search cursors so a cursor is
 * only accepted with the query it was made for.
 */
export function queryFingerprint(q: SearchQuery): string {
  const { ignored: _ignored, ...terms } = q;
  return createHash('sha256').update(JSON.stringify(terms)).digest('hex').slice(0, 16);
}
