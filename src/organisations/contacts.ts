import { sql } from 'kysely';
import type { Deps } from '../context.ts';
import { normalizeAddress } from '../mail/address.ts';
import { badRequest, conflict, notFound } from '../platform/errors.ts';
import { isUniqueViolation, type Queryable } from '../store/db.ts';
import { checkChain } from './chains.ts';
import { decodeCursor, pageOf, type Page } from './pagination.ts';
import { FIELD_KEY } from './templates.ts';

/**
 * Contacts and contact groups of an organisation (issue 4 §5; Voluble seed 002 "REST API":
 * contacts are the people an organisation sends to). A contact has a name, an email
 * address and/or an E.164 phone number, a preferred servicechain and custom fields (the
 * template placeholders `{{fields.KEY}}`). Email and phone are each unique within the
 * organisation.
 */

/** Documented limits on contacts. */
export const CONTACT_LIMITS = {
  /** custom fields per contact */
  fields: 50,
  /** characters of a field value */
  fieldChars: 1000,
  /** characters of a name */
  nameChars: 200,
  /** contacts added to a group in one request */
  groupBatch: 1000,
} as const;

/** E.164 (ITU-T E.164): `+`, a non-zero digit, at most 15 digits in all — the database check too. */
export const E164 = /^\+[1-9][0-9]{1,14}$/;

/**
 * Normalises a phone number to E.164: removes spaces, dashes, dots and parentheses; a number
 * starting with `+` must then be E.164. A number without `+` is refused — country codes are
 * never guessed — unless `defaultCountryCode` (e.g. "44" or "+44") is given: then one leading
 * trunk `0` is dropped and the code prefixed (`020 7946 0958` with 44 → `+442079460958`).
 * @throws AppError 400 `invalid_phone`
 */
export function normalizePhone(raw: string, defaultCountryCode?: string | null): string {
  const compact = raw.replace(/[\s\-.()\u00a0]/g, '');
  let p = compact;
  if (!p.startsWith('+')) {
    const cc = (defaultCountryCode ?? '').replace(/^\+/, '');
    if (!cc) throw badRequest('invalid_phone', `phone "${raw}" is not E.164 (+ and country code); give default_country_code to import national numbers`, { phone: raw });
    if (!/^[1-9][0-9]{0,2}$/.test(cc)) throw badRequest('invalid_country_code', `default_country_code "${defaultCountryCode}" is not 1–3 digits`);
    p = `+${cc}${p.replace(/^0/, '')}`;
  }
  if (!E164.test(p)) throw badRequest('invalid_phone', `phone "${raw}" is not a valid E.164 number (+ then at most 15 digits)`, { phone: raw });
  return p;
}

/** Normalises an email address of a contact. @throws AppError 400 `invalid_email` */
export function normalizeEmail(raw: string): string {
  try {
    return normalizeAddress(raw);
  } catch (e) {
    throw badRequest('invalid_email', (e as Error).message, { email: raw });
  }
}

/** Checks custom fields. @throws AppError 400 `invalid_field` */
export function checkFields(fields: Record<string, unknown>): Record<string, string> {
  const entries = Object.entries(fields);
  if (entries.length > CONTACT_LIMITS.fields) throw badRequest('invalid_field', `at most ${CONTACT_LIMITS.fields} fields per contact`);
  const out: Record<string, string> = {};
  for (const [k, v] of entries) {
    if (!FIELD_KEY.test(k)) throw badRequest('invalid_field', `field name "${k}" must be 1–64 of A–Z a–z 0–9 _ - .`, { field: k });
    if (typeof v !== 'string' || v.length > CONTACT_LIMITS.fieldChars)
      throw badRequest('invalid_field', `field "${k}" must be a string of at most ${CONTACT_LIMITS.fieldChars} characters`, { field: k });
    out[k] = v;
  }
  return out;
}

/** A contact as the API shows it. */
export interface ContactView {
  id: number;
  name: string;
  email: string | null;
  phone: string | null;
  preferred_chain: string[] | null;
  fields: Record<string, string>;
  /** Key of the conversation with this contact; null before the first message. */
  conversation: string | null;
  created_at: string;
}

type ContactRow = {
  id: number;
  name: string;
  email: string | null;
  phone: string | null;
  preferred_chain: string[] | null;
  fields: Record<string, string>;
  created_at: Date;
  conv_key: string | null;
};

function contactsQuery(db: Queryable, orgId: number) {
  return db
    .selectFrom('contacts as c')
    .leftJoin('conversations as cv', 'cv.id', 'c.conv_id')
    .select(['c.id', 'c.name', 'c.email', 'c.phone', 'c.preferred_chain', 'c.fields', 'c.created_at', 'cv.key as conv_key'])
    .where('c.org_id', '=', orgId);
}

function view(r: ContactRow): ContactView {
  return {
    id: r.id,
    name: r.name,
    email: r.email,
    phone: r.phone,
    preferred_chain: r.preferred_chain,
    fields: r.fields ?? {},
    conversation: r.conv_key,
    created_at: new Date(r.created_at).toISOString(),
  };
}

/** What a caller gives to create or change a contact. `null` clears a value (PATCH). */
export interface ContactInput {
  name?: string;
  email?: string | null;
  phone?: string | null;
  preferred_chain?: string[] | null;
  /** Replaces all custom fields. */
  fields?: Record<string, string>;
}

function cleanInput(input: ContactInput): ContactInput {
  const out: ContactInput = {};
  if (input.name !== undefined) out.name = input.name.trim().slice(0, CONTACT_LIMITS.nameChars);
  if (input.email !== undefined) out.email = input.email === null || input.email.trim() === '' ? null : normalizeEmail(input.email);
  if (input.phone !== undefined) out.phone = input.phone === null || input.phone.trim() === '' ? null : normalizePhone(input.phone);
  if (input.preferred_chain !== undefined) {
    if (input.preferred_chain !== null) checkChain(input.preferred_chain);
    out.preferred_chain = input.preferred_chain;
  }
  if (input.fields !== undefined) out.fields = checkFields(input.fields);
  return out;
}

function duplicate(e: unknown): never {
  const c = (e as { constraint?: string }).constraint ?? '';
  const what = c.includes('phone') ? 'phone' : 'email';
  throw conflict('contact_exists', `another contact of this organisation has this ${what}`, { field: what });
}

/**
 * `createContact`. @throws AppError 400 (`invalid_email`, `invalid_phone`, `no_address`,
 *   `invalid_field`, `unknown_plugin`), 409 `contact_exists` (same email or phone)
 */
export async function createContact(deps: Deps, orgId: number, input: ContactInput): Promise<ContactView> {
  const c = cleanInput(input);
  if (!c.email && !c.phone) throw badRequest('no_address', 'a contact needs an email address or a phone number');
  try {
    const r = await deps.db.kysely
      .insertInto('contacts')
      .values({
        org_id: orgId,
        name: c.name ?? '',
        email: c.email ?? null,
        phone: c.phone ?? null,
        preferred_chain: c.preferred_chain ?? null,
        fields: JSON.stringify(c.fields ?? {}),
        conv_id: null,
      })
      .returning('id')
      .executeTakeFirstOrThrow();
    return getContact(deps, orgId, r.id);
  } catch (e) {
    if (isUniqueViolation(e)) duplicate(e);
    throw e;
  }
}

/** One contact. @throws AppError 404 */
export async function getContact(deps: Deps, orgId: number, id: number): Promise<ContactView & { group_ids: number[] }> {
  const r = (await contactsQuery(deps.db.kysely, orgId).where('c.id', '=', id).executeTakeFirst()) as ContactRow | undefined;
  if (!r) throw notFound(`contact ${id}`);
  const groups = await deps.db.kysely.selectFrom('contact_group_members').select('group_id').where('contact_id', '=', id).orderBy('group_id').execute();
  return { ...view(r), group_ids: groups.map((g) => g.group_id) };
}

/**
 * Contacts in id order, paged; optionally only those of a group, or with an exact email or phone.
 * @throws AppError 400 (`invalid_cursor`, `invalid_email`, `invalid_phone`)
 */
export async function listContacts(
  deps: Deps,
  orgId: number,
  opts: { cursor?: string; limit: number; group_id?: number; email?: string; phone?: string },
): Promise<Page<ContactView>> {
  const after = decodeCursor(opts.cursor, 'number');
  let q = contactsQuery(deps.db.kysely, orgId);
  if (after !== null) q = q.where('c.id', '>', after as number);
  if (opts.group_id !== undefined)
    q = q.where('c.id', 'in', (eb) => eb.selectFrom('contact_group_members').select('contact_id').where('group_id', '=', opts.group_id!));
  if (opts.email !== undefined) q = q.where('c.email', '=', normalizeEmail(opts.email));
  if (opts.phone !== undefined) q = q.where('c.phone', '=', normalizePhone(opts.phone));
  const rows = (await q.orderBy('c.id').limit(opts.limit + 1).execute()) as ContactRow[];
  return pageOf(rows.map(view), opts.limit, (c) => c.id);
}

/**
 * `updateContact` — changes the given fields (`null` clears email, phone or preferred_chain;
 * `fields` replaces all custom fields). A contact keeps an email or a phone.
 * @throws AppError 400 (as createContact, `empty_patch`), 404, 409 `contact_exists`
 */
export async function updateContact(deps: Deps, orgId: number, id: number, input: ContactInput): Promise<ContactView> {
  const c = cleanInput(input);
  if (Object.keys(c).length === 0) throw badRequest('empty_patch', 'nothing to change');
  try {
    await deps.db.kysely.transaction().execute(async (tx) => {
      const cur = await tx.selectFrom('contacts').select(['email', 'phone']).where('org_id', '=', orgId).where('id', '=', id).forUpdate().executeTakeFirst();
      if (!cur) throw notFound(`contact ${id}`);
      const email = c.email !== undefined ? c.email : cur.email;
      const phone = c.phone !== undefined ? c.phone : cur.phone;
      if (!email && !phone) throw badRequest('no_address', 'a contact needs an email address or a phone number');
      await tx
        .updateTable('contacts')
        .set({
          ...(c.name !== undefined ? { name: c.name } : {}),
          ...(c.email !== undefined ? { email: c.email } : {}),
          ...(c.phone !== undefined ? { phone: c.phone } : {}),
          ...(c.preferred_chain !== undefined ? { preferred_chain: c.preferred_chain } : {}),
          ...(c.fields !== undefined ? { fields: JSON.stringify(c.fields) } : {}),
        })
        .where('id', '=', id)
        .execute();
    });
  } catch (e) {
    if (isUniqueViolation(e)) duplicate(e);
    throw e;
  }
  return getContact(deps, orgId, id);
}

/**
 * `deleteContact` — removes the contact, its group memberships, its outbound messages and
 * their deliveries (a blast's counts then cover the others). The conversation stays, as
 * the organisation's history. @throws AppError 404
 */
export async function deleteContact(deps: Deps, orgId: number, id: number): Promise<void> {
  const r = await deps.db.kysely.deleteFrom('contacts').where('org_id', '=', orgId).where('id', '=', id).executeTakeFirst();
  if (Number(r.numDeletedRows) === 0) throw notFound(`contact ${id}`);
}

/** A contact group as the API shows it. */
export interface GroupView {
  id: number;
  name: string;
  /** Number of contacts in the group. */
  size: number;
}

function checkGroupName(name: string): string {
  const n = name.trim();
  if (!n || n.length > 200) throw badRequest('invalid_group_name', 'a group name is 1–200 characters');
  return n;
}

/** `createGroup`. @throws AppError 400 `invalid_group_name`, 409 `group_exists` */
export async function createGroup(deps: Deps, orgId: number, name: string): Promise<GroupView> {
  try {
    const r = await deps.db.kysely.insertInto('contact_groups').values({ org_id: orgId, name: checkGroupName(name) }).returning(['id', 'name']).executeTakeFirstOrThrow();
    return { ...r, size: 0 };
  } catch (e) {
    if (isUniqueViolation(e)) throw conflict('group_exists', `a group named "${name.trim()}" exists`);
    throw e;
  }
}

function groupsQuery(db: Queryable, orgId: number) {
  return db
    .selectFrom('contact_groups as g')
    .select(['g.id', 'g.name', sql<number>`(select count(*) from contact_group_members m where m.group_id = g.id)`.as('size')])
    .where('g.org_id', '=', orgId);
}

/** One group with its size. @throws AppError 404 */
export async function getGroup(deps: Deps, orgId: number, id: number): Promise<GroupView> {
  const g = await groupsQuery(deps.db.kysely, orgId).where('g.id', '=', id).executeTakeFirst();
  if (!g) throw notFound(`group ${id}`);
  return { ...g, size: Number(g.size) };
}

/** Groups in id order, paged. */
export async function listGroups(deps: Deps, orgId: number, page: { cursor?: string; limit: number }): Promise<Page<GroupView>> {
  const after = decodeCursor(page.cursor, 'number');
  let q = groupsQuery(deps.db.kysely, orgId);
  if (after !== null) q = q.where('g.id', '>', after as number);
  const rows = await q.orderBy('g.id').limit(page.limit + 1).execute();
  return pageOf(rows.map((g) => ({ ...g, size: Number(g.size) })), page.limit, (g) => g.id);
}

/** `renameGroup`. @throws AppError 400, 404, 409 `group_exists` */
export async function renameGroup(deps: Deps, orgId: number, id: number, name: string): Promise<GroupView> {
  try {
    const r = await deps.db.kysely.updateTable('contact_groups').set({ name: checkGroupName(name) }).where('org_id', '=', orgId).where('id', '=', id).executeTakeFirst();
    if (Number(r.numUpdatedRows) === 0) throw notFound(`group ${id}`);
  } catch (e) {
    if (isUniqueViolation(e)) throw conflict('group_exists', `a group named "${name.trim()}" exists`);
    throw e;
  }
  return getGroup(deps, orgId, id);
}

/** `deleteGroup` — the contacts stay; blasts to it keep their messages. @throws AppError 404 */
export async function deleteGroup(deps: Deps, orgId: number, id: number): Promise<void> {
  const r = await deps.db.kysely.deleteFrom('contact_groups').where('org_id', '=', orgId).where('id', '=', id).executeTakeFirst();
  if (Number(r.numDeletedRows) === 0) throw notFound(`group ${id}`);
}

/**
 * `addToGroup` — adds contacts of the organisation to a group (already members: no change).
 * @returns how many were added now
 * @throws AppError 400 `unknown_contact` (ids not of this organisation; nothing added), 404
 */
export async function addToGroup(deps: Deps, orgId: number, groupId: number, contactIds: number[]): Promise<{ added: number }> {
  const ids = [...new Set(contactIds)];
  return deps.db.kysely.transaction().execute(async (tx) => {
    const g = await tx.selectFrom('contact_groups').select('id').where('org_id', '=', orgId).where('id', '=', groupId).executeTakeFirst();
    if (!g) throw notFound(`group ${groupId}`);
    if (ids.length === 0) return { added: 0 };
    const found = await tx.selectFrom('contacts').select('id').where('org_id', '=', orgId).where('id', 'in', ids).execute();
    const have = new Set(found.map((r) => r.id));
    const missing = ids.filter((i) => !have.has(i));
    if (missing.length) throw badRequest('unknown_contact', `no contact ${missing.slice(0, 20).join(', ')} in this organisation`, { contact_ids: missing.slice(0, 100) });
    const r = await tx
      .insertInto('contact_group_members')
      .values(ids.map((contact_id) => ({ group_id: groupId, contact_id })))
      .onConflict((oc) => oc.doNothing())
      .returning('contact_id')
      .execute();
    return { added: r.length };
  });
}

/** `removeFromGroup`. @throws AppError 404 (no such group, or the contact is not in it) */
export async function removeFromGroup(deps: Deps, orgId: number, groupId: number, contactId: number): Promise<void> {
  const r = await deps.db.kysely
    .deleteFrom('contact_group_members')
    .where('group_id', '=', groupId)
    .where('contact_id', '=', contactId)
    .where('group_id', 'in', (eb) => eb.selectFrom('contact_groups').select('id').where('org_id', '=', orgId))
    .executeTakeFirst();
  if (Number(r.numDeletedRows) === 0) throw notFound(`contact ${contactId} in group ${groupId}`);
}
