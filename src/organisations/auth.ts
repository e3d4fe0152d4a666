import { createHash, randomBytes } from 'node:crypto';
import type { FastifyRequest } from 'fastify';
import type { Deps } from '../context.ts';
import type { AuthUser } from '../accounts/sessions.ts';
import { requireUser } from '../http/server.ts';
import { AppError, badRequest, forbidden, notFound, unauthorized } from '../platform/errors.ts';
import { findOrg, type Org, type Role } from './orgs.ts';
import { decodeCursor, pageOf, type Page } from './pagination.ts';

/**
 * Authentication and authorisation of the organisation API (issue 4 §5: "API tokens with
 * scopes"; docs/organisations.md "Authentication").
 *
 * Two kinds of caller reach `/api/organisations/{slug}/…`:
 * - an **application** with an API token: `Authorization: Bearer pat_…` (the `pat_` prefix
 *   tells it from a user session token, `prl_…`), scoped to one organisation and to the
 *   scopes it was created with;
 * - a **member** logged in with a session (bearer `prl_…` or the cookie), whose role implies
 *   scopes (ROLE_SCOPES).
 */

/** The scopes of API tokens. */
export const SCOPES = ['contacts:read', 'contacts:write', 'messages:send', 'blasts:send', 'deliveries:read', 'deliveries:write'] as const;
export type Scope = (typeof SCOPES)[number];

/** What each role may do through its session: owners and admins everything, members all but blasts and dead-letter handling. */
export const ROLE_SCOPES: Record<Role, readonly Scope[]> = {
  owner: SCOPES,
  admin: SCOPES,
  member: ['contacts:read', 'contacts:write', 'messages:send', 'deliveries:read'],
};

/** Prefix of API token secrets. */
export const TOKEN_PREFIX = 'pat_';

/** Who is calling an organisation route, set on the request by `requireScope` / `requireRole`. */
export interface OrgAuth {
  org: Org;
  via: 'token' | 'session';
  /** The API token's public id (via token). */
  tokenId: string | null;
  /** The member (via session). */
  user: AuthUser | null;
  role: Role | null;
  scopes: ReadonlySet<Scope>;
  /** A label for logs and `created_by`: the member's address or `token:<id>`. */
  actor: string;
}

declare module 'fastify' {
  interface FastifyRequest {
    /** Set by requireScope / requireRole on organisation routes. */
    orgAuth?: OrgAuth;
  }
}

/** The organisation caller of a request that passed requireScope/requireRole. */
export function orgAuthOf(req: FastifyRequest): OrgAuth {
  if (!req.orgAuth) throw new AppError(500, 'internal', 'organisation route without requireScope');
  return req.orgAuth;
}

const sha256 = (s: string) => createHash('sha256').update(s).digest('hex');

function bearer(req: FastifyRequest): string | null {
  const h = req.headers.authorization;
  return h?.startsWith('Bearer ') ? h.slice(7).trim() : null;
}

function slugOf(req: FastifyRequest): string {
  const slug = (req.params as { slug?: string } | undefined)?.slug;
  if (!slug) throw new AppError(500, 'internal', 'organisation route without a :slug parameter');
  return slug;
}

async function orgOrNotFound(deps: Deps, slug: string): Promise<Org> {
  const org = await findOrg(deps.db.kysely, slug);
  if (!org) throw notFound(`organisation ${slug}`);
  return org;
}

/** Resolves an API token of `slug`. @throws AppError 401 `invalid_token`, 403 `wrong_organisation`, 404 */
async function tokenAuth(deps: Deps, token: string, slug: string): Promise<OrgAuth> {
  if (token.length > 200) throw unauthorized('invalid API token', 'invalid_token');
  const t = await deps.db.kysely
    .selectFrom('api_tokens')
    .select(['id', 'org_id', 'scopes', 'revoked_at', 'last_used_at'])
    .where('token_hash', '=', sha256(token))
    .executeTakeFirst();
  if (!t || t.revoked_at) throw unauthorized('invalid or revoked API token', 'invalid_token');
  const org = await orgOrNotFound(deps, slug);
  if (org.id !== t.org_id) throw forbidden('wrong_organisation', `this API token belongs to another organisation than ${slug}`);
  const now = deps.clock.now();
  if (!t.last_used_at || now - new Date(t.last_used_at).getTime() > 60_000)
    await deps.db.kysely.updateTable('api_tokens').set({ last_used_at: new Date(now) }).where('id', '=', t.id).execute();
  return { org, via: 'token', tokenId: t.id, user: null, role: null, scopes: new Set(t.scopes as Scope[]), actor: `token:${t.id}` };
}

/** Resolves a member's session. @throws AppError 401, 404 (no such organisation, or not a member) */
async function sessionAuth(deps: Deps, req: FastifyRequest, slug: string): Promise<OrgAuth> {
  await requireUser(deps)(req);
  const user = req.user!;
  const org = await orgOrNotFound(deps, slug);
  const m = await deps.db.kysely
    .selectFrom('organisation_members')
    .select('role')
    .where('org_id', '=', org.id)
    .where('user_id', '=', user.id)
    .executeTakeFirst();
  if (!m) throw notFound(`organisation ${slug}`);
  return { org, via: 'session', tokenId: null, user, role: m.role, scopes: new Set(ROLE_SCOPES[m.role]), actor: user.address };
}

async function authenticate(deps: Deps, req: FastifyRequest): Promise<OrgAuth> {
  const slug = slugOf(req);
  const token = bearer(req);
  return token?.startsWith(TOKEN_PREFIX) ? tokenAuth(deps, token, slug) : sessionAuth(deps, req, slug);
}

/**
 * A fastify preHandler for routes under `/api/organisations/:slug/…` (the route MUST have a
 * `slug` param): accepts an API token of that organisation holding `scope`, or the session
 * of a member whose role implies `scope` (ROLE_SCOPES). `scope` null: any token or member.
 * Sets `req.orgAuth` (read it with `orgAuthOf(req)`).
 * @throws AppError 401 (`unauthorized`, `invalid_token`), 403 `insufficient_scope`
 *   (`details.scope` names the missing scope) or `wrong_organisation`, 404 (no such
 *   organisation, or the user is not a member)
 */
export function requireScope(deps: Deps, scope: Scope | null) {
  return async (req: FastifyRequest) => {
    const auth = await authenticate(deps, req);
    if (scope && !auth.scopes.has(scope))
      throw forbidden(
        'insufficient_scope',
        auth.via === 'token' ? `this API token lacks the scope ${scope}` : `the role ${auth.role} does not allow ${scope}`,
        { scope, ...(auth.via === 'token' ? { granted: [...auth.scopes] } : { role: auth.role }) },
      );
    req.orgAuth = auth;
  };
}

/**
 * A preHandler for management routes (tokens, members, settings): only a member's session
 * with one of `roles` passes; API tokens never do.
 * @throws AppError 401, 403 (`session_required` for tokens, `insufficient_role`), 404
 */
export function requireRole(deps: Deps, roles: readonly Role[]) {
  return async (req: FastifyRequest) => {
    const slug = slugOf(req);
    if (bearer(req)?.startsWith(TOKEN_PREFIX)) throw forbidden('session_required', 'managing an organisation needs a member’s session, not an API token');
    const auth = await sessionAuth(deps, req, slug);
    if (!roles.includes(auth.role!))
      throw forbidden('insufficient_role', `this needs the role ${roles.join(' or ')}; you are ${auth.role}`, { required: [...roles], role: auth.role });
    req.orgAuth = auth;
  };
}

/** An API token as listed (never its secret). */
export interface TokenView {
  id: string;
  name: string;
  scopes: string[];
  created_by: string | null;
  created_at: string;
  last_used_at: string | null;
  revoked_at: string | null;
}

/**
 * `createToken` — a new API token of the organisation: a random 256-bit secret, returned
 * once and stored only as its SHA-256.
 * @throws AppError 400 `invalid_scope`
 */
export async function createToken(
  deps: Deps,
  orgId: number,
  createdBy: number,
  input: { name?: string; scopes: string[] },
): Promise<TokenView & { token: string }> {
  const bad = input.scopes.filter((s) => !(SCOPES as readonly string[]).includes(s));
  if (bad.length) throw badRequest('invalid_scope', `unknown scope${bad.length > 1 ? 's' : ''} ${bad.join(', ')}`, { unknown: bad, known: [...SCOPES] });
  const id = `tok_${randomBytes(9).toString('base64url')}`;
  const token = `${TOKEN_PREFIX}${randomBytes(32).toString('base64url')}`;
  const r = await deps.db.kysely
    .insertInto('api_tokens')
    .values({ id, org_id: orgId, name: (input.name ?? '').trim(), token_hash: sha256(token), scopes: [...new Set(input.scopes)], created_by: createdBy })
    .returning(['id', 'name', 'scopes', 'created_at'])
    .executeTakeFirstOrThrow();
  const by = await deps.db.kysely.selectFrom('users').select('address').where('id', '=', createdBy).executeTakeFirst();
  return {
    id: r.id,
    token,
    name: r.name,
    scopes: r.scopes,
    created_by: by?.address ?? null,
    created_at: new Date(r.created_at).toISOString(),
    last_used_at: null,
    revoked_at: null,
  };
}

/** The organisation's API tokens, newest first, paged. */
export async function listTokens(deps: Deps, orgId: number, page: { cursor?: string; limit: number }): Promise<Page<TokenView>> {
  const after = decodeCursor(page.cursor, 'string');
  let q = deps.db.kysely
    .selectFrom('api_tokens as t')
    .leftJoin('users as u', 'u.id', 't.created_by')
    .select(['t.id', 't.name', 't.scopes', 'u.address as created_by', 't.created_at', 't.last_used_at', 't.revoked_at'])
    .where('t.org_id', '=', orgId);
  if (after !== null) q = q.where('t.id', '>', after as string);
  const rows = await q.orderBy('t.id').limit(page.limit + 1).execute();
  const iso = (d: Date | string | null) => (d ? new Date(d).toISOString() : null);
  return pageOf(
    rows.map((r) => ({ ...r, created_at: iso(r.created_at)!, last_used_at: iso(r.last_used_at), revoked_at: iso(r.revoked_at) })),
    page.limit,
    (t) => t.id,
  );
}

/** `revokeToken` — the token stops working at once. @throws AppError 404 (no such live token) */
export async function revokeToken(deps: Deps, orgId: number, id: string): Promise<void> {
  const r = await deps.db.kysely
    .updateTable('api_tokens')
    .set({ revoked_at: new Date(deps.clock.now()) })
    .where('org_id', '=', orgId)
    .where('id', '=', id)
    .where('revoked_at', 'is', null)
    .executeTakeFirst();
  if (Number(r.numUpdatedRows) === 0) throw notFound(`token ${id}`);
}
