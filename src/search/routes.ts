import type { FastifyInstance } from 'fastify';
import type { Deps } from '../context.ts';
import { requireUser } from '../http/server.ts';
import { MAX_QUERY_CHARS, MAX_TERMS } from './query.ts';
import { searchConversations } from './search.ts';

const err = { $ref: 'Error#' };

const SearchQuerystring = {
  type: 'object',
  additionalProperties: false,
  properties: {
    q: { type: 'string', default: '', description: `the query, at most ${MAX_QUERY_CHARS} characters` },
    cursor: { type: 'string', maxLength: 500, description: '`next_cursor` of the previous page (same `q`)' },
    limit: { type: 'integer', minimum: 1, maximum: 100, default: 20 },
  },
} as const;

const SearchHitSchema = {
  type: 'object',
  properties: {
    key: { type: 'string' },
    subject: { type: 'string', description: 'as the caller sees it (a removed participant: the subject at the removal)' },
    creator: { type: 'string' },
    published: { type: 'boolean' },
    created_at: { type: 'string', format: 'date-time' },
    updated_at: { type: 'string', format: 'date-time' },
    last_action_id: { type: 'integer' },
    message_count: { type: 'integer' },
    unseen: { type: 'boolean' },
    muted: { type: 'boolean' },
    removed: { type: 'boolean' },
    flags: { type: 'object', properties: { inbox: { type: 'boolean' }, deleted: { type: 'boolean' }, spam: { type: 'boolean' } } },
    labels: { type: 'array', items: { type: 'integer' } },
    rank: { type: 'number', description: 'relevance, higher is better; 0 for a query of filters only' },
    snippet: {
      type: 'object',
      nullable: true,
      description:
        'An excerpt of the best matching message the caller may see (or, when no message text matched, the start of the latest one); null when the caller sees no message.',
      properties: {
        message_id: { type: 'integer' },
        text: { type: 'string', description: 'plain text; HTML tags removed; fragments joined by " … "' },
        highlights: {
          type: 'array',
          description: 'matched spans of `text`, [start, end) in UTF-16 code units',
          items: { type: 'array', items: { type: 'integer' }, minItems: 2, maxItems: 2 },
        },
      },
    },
  },
} as const;

const DESCRIPTION = `Full-text search over the conversations the caller may see: subject, message bodies, participant addresses and file names.

**Query language** (every term must hold; no OR, no negation; case-insensitive):
- \`word\` — prefix match anywhere: subject, a message body, a participant's address, a file name (\`meet\` matches "meeting"; English stems match too).
- \`"a phrase"\` — these words in this order in the subject or in one message (no prefix matching).
- \`from:X\` — a visible message was written by an address matching X.
- \`to:X\` — X is a recipient: a participant other than the creator.
- \`includes:X\` — X is in the conversation in any role, the creator included.
- \`subject:word\`, \`subject:"a phrase"\` — in the subject.
- \`has:attachment\` — a visible message has files.

An address X matches when it is a prefix of the whole address, its local part (or a piece of it split at \`. + _ -\`), its domain or a parent domain: \`bob\`, \`bob@ex\`, \`example.com\` and \`smith\` all match \`bob.smith@example.com\`.
Filters are checked independently over the conversation (\`from:bob has:attachment\`: bob wrote in it and some message has files). English stopwords are ignored and listed in \`ignored\`.

**Visibility**: conversations the caller participates in, in every folder (spam and deleted too; \`flags\` tells where); drafts only for their creator; deleted messages never match. A removed participant searches the conversation as at the removal: the messages added by then as they were then, the subject then, the participants added by then.

**Order and paging**: best rank first (subject and best message), then newest activity; pass \`next_cursor\` as \`cursor\` with the same \`q\` for the next page. Results can shift between pages when conversations change meanwhile.

**Errors**: 400 \`invalid_query\` (\`details.reason\`: \`empty\`, \`only_stopwords\`, \`too_long\` over ${MAX_QUERY_CHARS} characters, \`too_many_terms\` over ${MAX_TERMS}, \`empty_filter\`, \`unknown_has\`); 400 \`invalid_cursor\`.`;

/**
 * Search routes (issue 2, "Search"; client API):
 * `GET /api/search?q=&cursor=&limit=` — conversations the caller may see matching `q`
 * (language: src/search/query.ts), best rank then newest activity first, cursor-paged
 * (limit 1–100, default 20). Answers `{items, next_cursor, ignored}`; each item is a
 * conversation list row plus `rank` and `snippet`.
 * Errors: 400 `invalid_query`, 400 `invalid_cursor`, 401 without a session.
 */
export async function searchRoutes(app: FastifyInstance, deps: Deps): Promise<void> {
  const auth = requireUser(deps);
  app.get('/api/search', {
    preHandler: auth,
    schema: {
      tags: ['search'],
      summary: 'Search conversations (full text with from:, to:, includes:, subject:, has:attachment; prefix matching; cursor paging)',
      description: DESCRIPTION,
      security: [{ bearer: [] }, { cookie: [] }],
      querystring: SearchQuerystring,
      response: {
        200: {
          type: 'object',
          properties: {
            items: { type: 'array', items: SearchHitSchema },
            next_cursor: { type: 'string', nullable: true },
            ignored: { type: 'array', items: { type: 'string' }, description: 'stopwords of the query that were left out' },
          },
        },
        400: err,
        401: err,
      },
    },
  }, async (req) => {
    const q = req.query as { q: string; cursor?: string; limit: number };
    return searchConversations(deps, { id: req.user!.id, address: req.user!.address }, q);
  });
}
