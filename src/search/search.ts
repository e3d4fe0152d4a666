import { type RawBuilder, sql } from 'kysely';
import type { Deps } from '../context.ts';
import type { Actor } from '../conversations/commands/apply-actions.ts';
import { conversationSummary, type ConversationSummary } from '../conversations/queries.ts';
import { badRequest } from '../platform/errors.ts';
import { parseSearchQuery, queryFingerprint } from './query.ts';

/**
 * Full-text search over the conversations a user may see (issue 2, "Search"). The query
 * language is parsed by src/search/query.ts; the tokens are built in SQL by the functions
 * of src/store/migrations/002_search.sql.
 *
 * What "may see" means, exactly as the rest of the client API:
 * - the caller has a participant row (participants.user_id = caller);
 * - a draft only for its creator;
 * - a removed participant sees the conversation as at their removal: messages added up to
 *   the removing action, each as it was then (a later edit or deletion does not count),
 *   the subject then (the removal snapshot), and the participants added by then;
 * - deleted messages never match.
 */

/** Where the best match of a result is: an excerpt of one message with highlights. */
export interface SearchSnippet {
  /** Id of the message (its message:add action). */
  message_id: number;
  /** Plain text excerpt (HTML tags removed); fragments joined by " … ". */
  text: string;
  /** Highlighted spans of `text` as [start, end) offsets in UTF-16 code units. */
  highlights: [number, number][];
}

/** One search result: a conversation list row plus its rank and a snippet. */
export interface SearchHit extends ConversationSummary {
  /** Relevance (higher is better; 0 when the query has only filters). */
  rank: number;
  /**
   * The best matching visible message around the match, or — when the match is in the
   * subject or the addresses only, or the query has only filters — the start of the latest
   * visible message; null when the caller sees no message.
   */
  snippet: SearchSnippet | null;
}

/** A page of search results. */
export interface SearchPage {
  items: SearchHit[];
  /** Pass as `cursor` for the next page; null on the last page. */
  next_cursor: string | null;
  /** Stopwords of the query that were left out. */
  ignored: string[];
}

/** Characters of a message body given to ts_headline. */
const HEADLINE_CHARS = 100_000;
/** Highlight delimiters (private-use code points, removed from bodies before highlighting). */
const START_SEL = '\uE000';
const STOP_SEL = '\uE001';
/** Characters of the excerpt shown when no message text matched. */
const EXCERPT_CHARS = 160;

interface Cursor {
  fp: string;
  rank: string;
  us: string;
  id: number;
}

function encodeCursor(c: Cursor): string {
  return Buffer.from(JSON.stringify([c.fp, c.rank, c.us, c.id])).toString('base64url');
}

function decodeCursor(s: string, fp: string): Cursor {
  const bad = () => badRequest('invalid_cursor', 'cursor is not one this API returned for this query');
  let v: unknown;
  try {
    v = JSON.parse(Buffer.from(s, 'base64url').toString('utf8'));
  } catch {
    throw bad();
  }
  if (!Array.isArray(v) || v.length !== 4) throw bad();
  const [f, rank, us, id] = v as unknown[];
  if (typeof f !== 'string' || typeof rank !== 'string' || typeof us !== 'string' || typeof id !== 'number') throw bad();
  if (!/^\d{1,12}(\.\d{1,6})?$/.test(rank) || !/^-?\d{1,19}$/.test(us) || !Number.isSafeInteger(id) || id < 1) throw bad();
  if (f !== fp) throw badRequest('invalid_cursor', 'the cursor was made for another query; start again without cursor');
  return { fp, rank, us, id };
}

/** A tsquery literal matching lexemes that start with `prefix` (escaped for tsquery input). */
function prefixLiteral(prefix: string): string {
  return `'${prefix.replace(/\\/g, '\\\\').replace(/'/g, "''")}':*`;
}

/** A free or subject word: its English stem as a prefix, or the word as typed as a prefix. */
const wordQuery = (w: string) => sql`(to_tsquery('english', ${`${w}:*`}) || ${prefixLiteral(w)}::tsquery)`;
/** A phrase: the English stems in order. */
const phraseQuery = (p: string) => sql`phraseto_tsquery('english', ${p})`;

/** Splits highlighted headline text into plain text and [start, end) spans. */
function highlightSpans(marked: string): { text: string; highlights: [number, number][] } {
  let text = '';
  const highlights: [number, number][] = [];
  let start = -1;
  for (const ch of marked) {
    if (ch === START_SEL) start = text.length;
    else if (ch === STOP_SEL) {
      if (start >= 0 && text.length > start) highlights.push([start, text.length]);
      start = -1;
    } else text += ch;
  }
  return { text, highlights };
}

/** The start of a text, white space collapsed, cut at a word boundary near {@link EXCERPT_CHARS}. */
function excerpt(text: string): string {
  const t = text.replace(/\s+/g, ' ').trim();
  if (t.length <= EXCERPT_CHARS) return t;
  const cut = t.lastIndexOf(' ', EXCERPT_CHARS);
  return `${t.slice(0, cut > EXCERPT_CHARS / 2 ? cut : EXCERPT_CHARS)} …`;
}

/**
 * `searchConversations` — client API `GET /api/search`: the conversations the caller may
 * see that match every term of `q`, best rank first (ts_rank of the subject and of the
 * best matching message), then newest activity, then newest conversation; cursor-paged.
 * @param opts.q the query (language: src/search/query.ts)
 * @param opts.cursor `next_cursor` of the previous page of the same query
 * @param opts.limit page size, 1–100
 * @throws AppError 400 `invalid_query` (see parseSearchQuery), 400 `invalid_cursor`
 */
export async function searchConversations(
  deps: Deps,
  user: Actor,
  opts: { q: string; cursor?: string; limit: number },
): Promise<SearchPage> {
  const query = parseSearchQuery(opts.q);
  const fp = queryFingerprint(query);
  const cursor = opts.cursor ? decodeCursor(opts.cursor, fp) : null;

  // Text terms, each a tsquery computed once in the `qs` row: free terms match the
  // caller's header (subject + addresses) or a visible message; subject terms the subject.
  const free: RawBuilder<unknown>[] = [...query.words.map(wordQuery), ...query.phrases.map(phraseQuery)];
  const subject: RawBuilder<unknown>[] = [...query.subjectWords.map(wordQuery), ...query.subjectPhrases.map(phraseQuery)];
  const textTerms = [...free, ...subject];
  const qcols = textTerms.map((q, i) => sql`${q} as ${sql.ref(`q${i}`)}`);
  const qref = (i: number) => sql.ref(`qs.q${i}`);
  // qr: any text term, for ranking and highlighting.
  const rankQuery = textTerms.length > 0 ? sql.join(textTerms.map((_, i) => sql.ref(`t.q${i}`)), sql` || `) : null;
  qcols.push(sql`null::tsquery as qnone`); // a query of filters only still needs one column

  // Every condition is checked per conversation of the caller (they are few next to the
  // whole table; a global GIN scan of a common word costs more than that). Cheap tsvector
  // tests on the current rows come first where they are a superset of the exact test.
  const conds: RawBuilder<unknown>[] = [];
  /** Some message the caller may see satisfies `cond` (on `vm`: id, author, body, format, files, search). */
  const someMessage = (cond: RawBuilder<unknown>) =>
    sql`(case when p.removed_id is null
              then exists (select 1 from messages vm where vm.conv_id = c.id and not vm.deleted and ${cond})
              else exists (select 1 from parley_visible_messages(c.id, p.removed_id) vm where ${cond}) end)`;
  free.forEach((_, i) => {
    conds.push(sql`(h.hv @@ ${qref(i)} or ${someMessage(sql`vm.search @@ ${qref(i)}`)})`);
  });
  subject.forEach((_, j) => {
    const i = free.length + j;
    conds.push(sql`h.hv @@ ${qref(i)} and parley_text_vector(h.subject) @@ ${qref(i)}`);
  });
  // Address filters: the addresses matching X among the participants of the caller's
  // conversations (authors are participants too), found once per query — each distinct
  // address is tokenised once, not once per conversation or message.
  const addressCtes: RawBuilder<unknown>[] = [];
  const matching = new Map<string, string>();
  const addressesMatching = (x: string): string => {
    let name = matching.get(x);
    if (!name) {
      name = `a${matching.size}`;
      matching.set(x, name);
      addressCtes.push(sql`${sql.ref(name)} as materialized (
        select d.address from (select distinct q.address from participants mine join participants q on q.conv_id = mine.conv_id
                                where mine.user_id = ${user.id} offset 0) d
         where parley_address_matches(d.address, ${x}))`);
    }
    return name;
  };
  const participantMatch = (x: string, recipientsOnly: boolean) => {
    conds.push(sql`exists (select 1 from participants q
                            where q.conv_id = c.id and (p.removed_id is null or q.added_id <= p.removed_id)
                              ${recipientsOnly ? sql`and q.address <> c.creator` : sql``}
                              and q.address in (select address from ${sql.table(addressesMatching(x))}))`);
  };
  for (const x of query.to) participantMatch(x, true);
  for (const x of query.includes) participantMatch(x, false);
  for (const x of query.from) conds.push(someMessage(sql`vm.author in (select address from ${sql.table(addressesMatching(x))})`));
  if (query.hasAttachment) conds.push(someMessage(sql`jsonb_array_length(vm.files) > 0`));

  const rankExpr = rankQuery
    ? sql`round((ts_rank(h.hv, qs.qr) + coalesce(case when p.removed_id is null
                 then (select max(ts_rank(vm.search, qs.qr)) from messages vm where vm.conv_id = c.id and not vm.deleted and vm.search @@ qs.qr)
                 else (select max(ts_rank(vm.search, qs.qr)) from parley_visible_messages(c.id, p.removed_id) vm where vm.search @@ qs.qr) end, 0))::numeric, 6)`
    : sql`0::numeric`;
  const after = cursor
    ? sql`where (r.rank, r.sort_us, r.id) < (${cursor.rank}::numeric, ${cursor.us}::bigint, ${cursor.id}::bigint)`
    : sql``;
  const cleanBody = sql`translate(case when s0.format = 'html' then regexp_replace(left(s0.body, ${HEADLINE_CHARS}), '<[^>]*>', ' ', 'g')
                                       else left(s0.body, ${HEADLINE_CHARS}) end, ${START_SEL + STOP_SEL}, '')`;
  const headlineOpts = `StartSel="${START_SEL}", StopSel="${STOP_SEL}", MaxWords=30, MinWords=12, ShortWord=2, MaxFragments=2, FragmentDelimiter=" … "`;

  const rows = await sql<any>`
    with qs as materialized (select t.*, ${rankQuery ?? sql`null::tsquery`} as qr from (select ${sql.join(qcols, sql`, `)}) t),
    ${sql.join([...addressCtes, sql``], sql`, `)}
    page as (
      select r.* from (
        select c.id, c.key, h.subject, c.creator, c.published, c.created_at, c.last_ts, c.last_id, c.message_count,
               p.seen, p.muted, p.inbox, p.deleted, p.spam, p.removed_id, p.snapshot,
               (extract(epoch from coalesce(p.last_event_ts, c.created_at)) * 1000000)::bigint as sort_us,
               ${rankExpr} as rank,
               coalesce((select array_agg(cl.label_id order by cl.label_id) from conversation_labels cl
                          where cl.conv_id = c.id and cl.user_id = ${user.id}), '{}') as labels
          from qs, participants p
          -- one index lookup per conversation of the caller (offset 0 keeps the planner from
          -- hashing the whole conversations table instead)
          cross join lateral (select c0.* from conversations c0
                               where c0.id = p.conv_id and (c0.published or c0.creator = ${user.address}) offset 0) c
          cross join lateral (
            select case when p.removed_id is null then c.subject else coalesce(p.snapshot->>'subject', c.subject) end as subject,
                   case when p.removed_id is null then c.search_header
                        else parley_search_header(coalesce(p.snapshot->>'subject', c.subject),
                               array(select q.address from participants q where q.conv_id = c.id and q.added_id <= p.removed_id))
                   end as hv
          ) h
         where p.user_id = ${user.id}
           ${conds.length > 0 ? sql`and ${sql.join(conds, sql` and `)}` : sql``}
      ) r
      ${after}
      order by r.rank desc, r.sort_us desc, r.id desc
      limit ${opts.limit + 1}
    )
    select page.*, s.message_id, s.matched,
           case when s.matched then ts_headline('simple', s.clean, qs.qr, ${headlineOpts}) else left(s.clean, 300) end as snippet
      from page
      cross join qs
      left join lateral (
        select s0.id as message_id, coalesce(qs.qr is not null and s0.search @@ qs.qr, false) as matched, ${cleanBody} as clean
          from parley_visible_messages(page.id, page.removed_id) s0
         order by 2 desc, case when qs.qr is null then 0 else ts_rank(s0.search, qs.qr) end desc, s0.id desc
         limit 1
      ) s on true
     order by page.rank desc, page.sort_us desc, page.id desc`.execute(deps.db.kysely);

  const page = rows.rows.slice(0, opts.limit);
  const items = page.map((r): SearchHit => {
    const snippet: SearchSnippet | null =
      r.message_id === null || r.message_id === undefined
        ? null
        : { message_id: r.message_id, ...(r.matched ? highlightSpans(String(r.snippet ?? '')) : { text: excerpt(String(r.snippet ?? '')), highlights: [] }) };
    return {
      ...conversationSummary(r),
      rank: Number(r.rank),
      snippet,
    };
  });
  const last = page[page.length - 1];
  return {
    items,
    next_cursor: rows.rows.length > opts.limit && last ? encodeCursor({ fp, rank: String(last.rank), us: String(last.sort_us), id: last.id }) : null,
    ignored: query.ignored,
  };
}
