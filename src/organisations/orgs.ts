import { sql } from 'kysely';
import { type Deps, isLocalAddress } from '../context.ts';
import { normalizeAddress } from '../mail/address.ts';
import { badRequest, conflict, forbidden, notFound } from '../platform/errors.ts';
import { isUniqueViolation, type Queryable } from '../store/db.ts';
import { checkChain, checkPluginConfig } from './chains.ts';
import { decodeCursor, encodeCursor, type Page } from './pagination.ts';

/**
 * Organisations (tenants) and their members (issue 4 §5; Voluble seed 002 "Client/User
 * creation": sysadmin → organisation → admins → regular users). Platform admins create
 * organisations; each has its own address (a local user of type `shared` or `bot`),
 * members with a role, and settings: default servicechain, fallback windows, plugin
 * configuration, quota and rate limit.
 */

/** Roles of members, strongest first: `owner` > `admin` > `member` (see ROLE_SCOPES in auth.ts). */
export const ROLES = ['owner', 'admin', 'member'] as const;
export type Role = (typeof ROLES)[number];

/** A slug: 2–40 of a–z, 0–9 and `-`, starting with a letter or digit. */
export const SLUG_PATTERN = '^[a-z0-9][a-z0-9-]{1,39}$';

/** An organisation row with its address, as commands use it. */
export interface Org {
  id: number;
  slug: string;
  name: string;
  user_id: number;
  /** The organisation's own address (creator of its conversations with contacts). */
  address: string;
  default_chain: string[];
  fallback: { not_delivered_s?: number; not_read_s?: number };
  plugin_config: Record<string, Record<string, unknown>>;
  quota_per_day: number;
  rate_per_minute: number;
  created_at: Date;
}

/** The organisation as the API shows it (plugin secrets redacted). Times UTC ISO 8601. */
export interface OrgView {
  id: number;
  slug: string;
  name: string;
  address: string;
  default_chain: string[];
  fallback: { not_delivered_s?: number; not_read_s?: number };
  /** Per plugin settings; values of keys named like secret/token/password/key are shown as "***". */
  plugin_config: Record<string, Record<string, unknown>>;
  quota_per_day: number;
  rate_per_minute: number;
  created_at: string;
}

const ORG_COLUMNS = [
  'organisations.id',
  'organisations.slug',
  'organisations.name',
  'organisations.user_id',
  'users.address',
  'organisations.default_chain',
  'organisations.fallback',
  'organisations.plugin_config',
  'organisations.quota_per_day',
  'organisations.rate_per_minute',
  'organisations.created_at',
] as const;

/** Loads an organisation by slug, or undefined. */
export async function findOrg(db: Queryable, slug: string): Promise<Org | undefined> {
  return db
    .selectFrom('organisations')
    .innerJoin('users', 'users.id', 'organisations.user_id')
    .select([...ORG_COLUMNS])
    .where('organisations.slug', '=', slug)
    .executeTakeFirst() as Promise<Org | undefined>;
}

/** Loads an organisation by id. @throws AppError 404 */
export async function orgById(db: Queryable, id: number): Promise<Org> {
  const o = (await db
    .selectFrom('organisations')
    .innerJoin('users', 'users.id', 'organisations.user_id')
    .select([...ORG_COLUMNS])
    .where('organisations.id', '=', id)
    .executeTakeFirst()) as Org | undefined;
  if (!o) throw notFound('organisation');
  return o;
}

const SECRET_KEY = /secret|token|password|key|auth/i;

/** The API view of an organisation. */
export function orgView(o: Org): OrgView {
  const plugin_config: Record<string, Record<string, unknown>> = {};
  for (const [plugin, cfg] of Object.entries(o.plugin_config ?? {})) {
    plugin_config[plugin] = Object.fromEntries(Object.entries(cfg ?? {}).map(([k, v]) => [k, SECRET_KEY.test(k) && v ? '***' : v]));
  }
  return {
    id: o.id,
    slug: o.slug,
    name: o.name,
    address: o.address,
    default_chain: o.default_chain,
    fallback: o.fallback ?? {},
    plugin_config,
    quota_per_day: o.quota_per_day,
    rate_per_minute: o.rate_per_minute,
    created_at: new Date(o.created_at).toISOString(),
  };
}

function parseAddress(a: string, field: string): string {
  try {
    return normalizeAddress(a);
  } catch (e) {
    throw badRequest('invalid_address', `${field}: ${(e as Error).message}`, { field });
  }
}

/** What a platform admin gives to create an organisation (POST /api/admin/organisations). */
export interface NewOrganisation {
  slug: string;
  name: string;
  /** The organisation's own address: a NEW local user is created for it (no password). */
  address: string;
  /** 'shared' (default: a shared mailbox) or 'bot'. */
  address_type?: 'shared' | 'bot';
  /** Address of an existing local user who becomes the first owner. */
  owner: string;
  default_chain?: string[];
  quota_per_day?: number;
  rate_per_minute?: number;
}

/**
 * `createOrganisation` — creates, in ONE transaction, the organisation's address (a local
 * user of type `shared` or `bot`, without password: nobody logs in as it), the
 * organisation and its first owner.
 * @throws AppError 400 (`invalid_address`, `foreign_domain`, `unknown_owner`, `unknown_plugin`),
 *   409 (`slug_taken`, `user_exists`: the address is already a user)
 */
export async function createOrganisation(deps: Deps, input: NewOrganisation): Promise<OrgView> {
  const address = parseAddress(input.address, 'address');
  const owner = parseAddress(input.owner, 'owner');
  if (!isLocalAddress(deps, address))
    throw badRequest('foreign_domain', `${address} is not in this platform's domains (${deps.config.domains.join(', ')})`, { domains: deps.config.domains });
  if (input.default_chain) checkChain(input.default_chain);
  const id = await deps.db.kysely.transaction().execute(async (tx) => {
    const ownerRow = await tx.selectFrom('users').select(['id', 'status']).where('address', '=', owner).executeTakeFirst();
    if (!ownerRow) throw badRequest('unknown_owner', `no user ${owner} on this platform`, { owner });
    let userId: number;
    try {
      const u = await tx
        .insertInto('users')
        .values({ address, name: input.name.trim(), type: input.address_type ?? 'shared', password_hash: null })
        .returning('id')
        .executeTakeFirstOrThrow();
      userId = u.id;
    } catch (e) {
      if (isUniqueViolation(e)) throw conflict('user_exists', `${address} already exists; an organisation gets a new address`);
      throw e;
    }
    let orgId: number;
    try {
      const o = await tx
        .insertInto('organisations')
        .values({
          slug: input.slug,
          name: input.name.trim(),
          user_id: userId,
          ...(input.default_chain ? { default_chain: input.default_chain } : {}),
          ...(input.quota_per_day !== undefined ? { quota_per_day: input.quota_per_day } : {}),
          ...(input.rate_per_minute !== undefined ? { rate_per_minute: input.rate_per_minute } : {}),
        })
        .returning('id')
        .executeTakeFirstOrThrow();
      orgId = o.id;
    } catch (e) {
      if (isUniqueViolation(e)) throw conflict('slug_taken', `an organisation ${input.slug} exists`);
      throw e;
    }
    await tx.insertInto('organisation_members').values({ org_id: orgId, user_id: ownerRow.id, role: 'owner' }).execute();
    return orgId;
  });
  return orgView(await orgById(deps.db.kysely, id));
}

/** Settings owners and admins change (PATCH /api/organisations/{slug}). */
export interface OrgSettingsPatch {
  name?: string;
  default_chain?: string[];
  fallback?: { not_delivered_s?: number; not_read_s?: number };
  /** Replaces the configuration of the plugins named (others are kept); `null` removes one. */
  plugin_config?: Record<string, Record<string, unknown> | null>;
}

/** Limits only platform admins change (PATCH /api/admin/organisations/{slug}). */
export interface OrgLimitsPatch {
  quota_per_day?: number;
  rate_per_minute?: number;
}

/**
 * `updateOrganisation` — changes settings and/or limits (the route decides who may change what).
 * @throws AppError 400 `unknown_plugin` / `empty_patch`, 404
 */
export async function updateOrganisation(deps: Deps, orgId: number, patch: OrgSettingsPatch & OrgLimitsPatch): Promise<OrgView> {
  if (Object.values(patch).every((v) => v === undefined)) throw badRequest('empty_patch', 'nothing to change');
  if (patch.default_chain) checkChain(patch.default_chain);
  for (const [plugin, cfg] of Object.entries(patch.plugin_config ?? {})) if (cfg !== null) await checkPluginConfig(deps, plugin, cfg);
  await deps.db.kysely.transaction().execute(async (tx) => {
    const cur = await tx.selectFrom('organisations').select(['plugin_config']).where('id', '=', orgId).forUpdate().executeTakeFirst();
    if (!cur) throw notFound('organisation');
    let pluginConfig: string | undefined;
    if (patch.plugin_config) {
      const next = { ...(cur.plugin_config ?? {}) };
      for (const [k, v] of Object.entries(patch.plugin_config)) {
        if (v === null) delete next[k];
        else next[k] = v;
      }
      pluginConfig = JSON.stringify(next);
    }
    await tx
      .updateTable('organisations')
      .set({
        ...(patch.name !== undefined ? { name: patch.name.trim() } : {}),
        ...(patch.default_chain !== undefined ? { default_chain: patch.default_chain } : {}),
        ...(patch.fallback !== undefined ? { fallback: JSON.stringify(patch.fallback) } : {}),
        ...(pluginConfig !== undefined ? { plugin_config: pluginConfig } : {}),
        ...(patch.quota_per_day !== undefined ? { quota_per_day: patch.quota_per_day } : {}),
        ...(patch.rate_per_minute !== undefined ? { rate_per_minute: patch.rate_per_minute } : {}),
      })
      .where('id', '=', orgId)
      .execute();
  });
  return orgView(await orgById(deps.db.kysely, orgId));
}

/** The organisations `userId` is a member of, with their role, by slug, paged. */
export async function listMyOrganisations(
  deps: Deps,
  userId: number,
  page: { cursor?: string; limit: number },
): Promise<Page<OrgView & { role: Role }>> {
  const after = decodeCursor(page.cursor, 'string');
  let q = deps.db.kysely
    .selectFrom('organisation_members as m')
    .innerJoin('organisations', 'organisations.id', 'm.org_id')
    .innerJoin('users', 'users.id', 'organisations.user_id')
    .select([...ORG_COLUMNS, 'm.role'])
    .where('m.user_id', '=', userId);
  if (after !== null) q = q.where('organisations.slug', '>', after as string);
  const rows = (await q.orderBy('organisations.slug').limit(page.limit + 1).execute()) as (Org & { role: Role })[];
  const items = rows.slice(0, page.limit).map((r) => ({ ...orgView(r), role: r.role }));
  return { items, next_cursor: rows.length > page.limit ? encodeCursor(items[items.length - 1].slug) : null };
}

/** A member as listed. */
export interface MemberView {
  address: string;
  name: string;
  role: Role;
}

/** Members of an organisation in address order, paged. */
export async function listMembers(deps: Deps, orgId: number, page: { cursor?: string; limit: number }): Promise<Page<MemberView>> {
  const after = decodeCursor(page.cursor, 'string');
  let q = deps.db.kysely
    .selectFrom('organisation_members as m')
    .innerJoin('users as u', 'u.id', 'm.user_id')
    .select(['u.address', 'u.name', 'm.role'])
    .where('m.org_id', '=', orgId);
  if (after !== null) q = q.where('u.address', '>', after as string);
  const rows = await q.orderBy('u.address').limit(page.limit + 1).execute();
  const items = rows.slice(0, page.limit);
  return { items, next_cursor: rows.length > page.limit ? encodeCursor(items[items.length - 1].address) : null };
}

/** Serialises membership changes of one organisation (the last-owner rule). */
async function lockMembers(tx: Queryable, orgId: number): Promise<void> {
  await sql`select id from organisations where id = ${orgId} for update`.execute(tx);
}

/**
 * `setMember` — adds a local user as a member or changes their role. Only an owner gives,
 * changes or takes away the `owner` role; an organisation always keeps at least one owner.
 * @param actorRole the role of the member making the change (owner or admin)
 * @throws AppError 400 (`invalid_address`, `unknown_user`, `last_owner`), 403 `owner_only`
 */
export async function setMember(deps: Deps, orgId: number, actorRole: Role, address: string, role: Role): Promise<MemberView> {
  const a = parseAddress(address, 'address');
  return deps.db.kysely.transaction().execute(async (tx) => {
    await lockMembers(tx, orgId);
    const u = await tx.selectFrom('users').select(['id', 'name']).where('address', '=', a).executeTakeFirst();
    if (!u) throw badRequest('unknown_user', `no user ${a} on this platform`, { address: a });
    const cur = await tx.selectFrom('organisation_members').select('role').where('org_id', '=', orgId).where('user_id', '=', u.id).executeTakeFirst();
    if ((role === 'owner' || cur?.role === 'owner') && actorRole !== 'owner')
      throw forbidden('owner_only', 'only an owner gives or takes away the owner role');
    if (cur?.role === 'owner' && role !== 'owner') await assertNotLastOwner(tx, orgId);
    await tx
      .insertInto('organisation_members')
      .values({ org_id: orgId, user_id: u.id, role })
      .onConflict((oc) => oc.columns(['org_id', 'user_id']).doUpdateSet({ role }))
      .execute();
    return { address: a, name: u.name, role };
  });
}

async function assertNotLastOwner(tx: Queryable, orgId: number): Promise<void> {
  const r = await tx
    .selectFrom('organisation_members')
    .select((eb) => eb.fn.countAll<number>().as('n'))
    .where('org_id', '=', orgId)
    .where('role', '=', 'owner')
    .executeTakeFirstOrThrow();
  if (Number(r.n) <= 1) throw badRequest('last_owner', 'an organisation keeps at least one owner');
}

/**
 * `removeMember` — takes a member out of the organisation (their conversations stay theirs).
 * @throws AppError 400 `last_owner`, 403 `owner_only`, 404 (not a member)
 */
export async function removeMember(deps: Deps, orgId: number, actorRole: Role, address: string): Promise<void> {
  const a = parseAddress(address, 'address');
  await deps.db.kysely.transaction().execute(async (tx) => {
    await lockMembers(tx, orgId);
    const cur = await tx
      .selectFrom('organisation_members as m')
      .innerJoin('users as u', 'u.id', 'm.user_id')
      .select(['m.user_id', 'm.role'])
      .where('m.org_id', '=', orgId)
      .where('u.address', '=', a)
      .executeTakeFirst();
    if (!cur) throw notFound(`member ${a}`);
    if (cur.role === 'owner') {
      if (actorRole !== 'owner') throw forbidden('owner_only', 'only an owner removes an owner');
      await assertNotLastOwner(tx, orgId);
    }
    await tx.deleteFrom('organisation_members').where('org_id', '=', orgId).where('user_id', '=', cur.user_id).execute();
  });
}
