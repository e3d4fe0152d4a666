import { parse } from 'csv-parse/sync';
import { sql } from 'kysely';
import type { Deps } from '../context.ts';
import { AppError, badRequest } from '../platform/errors.ts';
import { CONTACT_LIMITS, normalizeEmail, normalizePhone } from './contacts.ts';
import { FIELD_KEY } from './templates.ts';

/**
 * CSV import of contacts (`POST /api/organisations/{slug}/contacts/import`, body `text/csv`;
 * docs/organisations.md "CSV import").
 *
 * - RFC 4180 CSV, UTF-8 (a BOM is ignored), first row a header. Known columns (any case):
 *   `name`, `email`, `phone`, `group`; every other column is a custom field of that name
 *   (1–64 of `A–Z a–z 0–9 _ - .`). There must be an `email` or a `phone` column.
 * - Each row is matched to an existing contact by email, else by phone, and updated (name
 *   and phone/email when given; custom fields merged, non-empty values win), or created.
 * - A row is **skipped** (reported with its line number and the reason, the others still
 *   imported) when: its phone is not E.164 after removing spaces, dashes, dots and
 *   parentheses (country codes are not guessed unless `default_country_code` is given), its
 *   email is invalid, it has neither, it has more cells than the header, a field value is
 *   too long, or its email and phone belong to two different contacts.
 * - `group`: the contact is added to that group (several separated by `;`), created if needed.
 * - At most IMPORT_MAX_ROWS data rows per import (more → 400 `too_many_rows`, nothing imported).
 * - All or nothing for the rows kept: one transaction.
 */

/** Most data rows in one import. */
export const IMPORT_MAX_ROWS = 10_000;
/** Largest CSV body accepted, in bytes. */
export const IMPORT_MAX_BYTES = 5 * 1024 * 1024;

/** Outcome of an import. `line` is the CSV line number (the header is line 1). */
export interface ImportResult {
  created: number;
  updated: number;
  skipped: { line: number; reason: string }[];
}

interface Row {
  line: number;
  name: string | null;
  email: string | null;
  phone: string | null;
  groups: string[];
  fields: Record<string, string>;
}

interface Target {
  id: number | null; // null: new in this import
  name: string;
  email: string | null;
  phone: string | null;
  fields: Record<string, string>;
  groups: Set<string>;
  dirty: boolean;
  existing: boolean;
}

const KNOWN = ['name', 'email', 'phone', 'group'];

/** Parses and checks the rows (no database). @throws AppError 400 `invalid_csv` / `invalid_header` / `too_many_rows` */
function parseRows(csv: string, defaultCountryCode: string | undefined, skipped: ImportResult['skipped']): Row[] {
  let records: { record: string[]; info: { lines: number } }[];
  try {
    records = parse(csv, { bom: true, skip_empty_lines: true, relax_column_count: true, info: true, trim: true }) as any;
  } catch (e) {
    const err = e as { message: string; lines?: number };
    throw badRequest('invalid_csv', `the CSV could not be parsed: ${err.message}`, err.lines ? { line: err.lines } : undefined);
  }
  if (records.length === 0) throw badRequest('invalid_csv', 'the CSV is empty: a header row is needed');
  const header = records[0].record.map((h) => h.trim());
  const cols = header.map((h) => (KNOWN.includes(h.toLowerCase()) ? h.toLowerCase() : h));
  const badFields = cols.filter((c) => !KNOWN.includes(c) && !FIELD_KEY.test(c));
  if (badFields.length)
    throw badRequest('invalid_header', `column names must be name, email, phone, group or field names of 1–64 of A–Z a–z 0–9 _ - . (got ${badFields.map((c) => JSON.stringify(c)).join(', ')})`, { columns: badFields });
  const dup = cols.find((c, i) => cols.indexOf(c) !== i);
  if (dup) throw badRequest('invalid_header', `column "${dup}" appears twice`, { columns: [dup] });
  if (!cols.includes('email') && !cols.includes('phone')) throw badRequest('invalid_header', 'the header needs an email or a phone column');
  const fieldCols = cols.filter((c) => !KNOWN.includes(c));
  if (fieldCols.length > CONTACT_LIMITS.fields) throw badRequest('invalid_header', `at most ${CONTACT_LIMITS.fields} field columns`);
  if (records.length - 1 > IMPORT_MAX_ROWS)
    throw badRequest('too_many_rows', `at most ${IMPORT_MAX_ROWS} rows per import; split the file`, { max_rows: IMPORT_MAX_ROWS, rows: records.length - 1 });
  if (defaultCountryCode !== undefined && !/^\+?[1-9][0-9]{0,2}$/.test(defaultCountryCode))
    throw badRequest('invalid_country_code', `default_country_code "${defaultCountryCode}" is not 1–3 digits`);
  const rows: Row[] = [];
  for (const { record, info } of records.slice(1)) {
    const line = info.lines;
    if (record.length > cols.length) {
      skipped.push({ line, reason: `${record.length} cells but the header has ${cols.length}` });
      continue;
    }
    const cell = (c: string) => {
      const i = cols.indexOf(c);
      return i >= 0 && i < record.length ? record[i] : '';
    };
    try {
      const email = cell('email') ? normalizeEmail(cell('email')) : null;
      const phone = cell('phone') ? normalizePhone(cell('phone'), defaultCountryCode) : null;
      if (!email && !phone) throw badRequest('no_address', 'neither an email address nor a phone number');
      const fields: Record<string, string> = {};
      for (const f of fieldCols) {
        const v = cell(f);
        if (v.length > CONTACT_LIMITS.fieldChars) throw badRequest('invalid_field', `field ${f} is longer than ${CONTACT_LIMITS.fieldChars} characters`);
        if (v !== '') fields[f] = v;
      }
      const groups = cell('group')
        .split(';')
        .map((g) => g.trim())
        .filter((g) => g !== '');
      if (groups.some((g) => g.length > 200)) throw badRequest('invalid_group_name', 'a group name is at most 200 characters');
      const name = cell('name') ? cell('name').slice(0, CONTACT_LIMITS.nameChars) : null;
      rows.push({ line, name, email, phone, groups, fields });
    } catch (e) {
      if (e instanceof AppError && e.status === 400) skipped.push({ line, reason: e.message });
      else throw e;
    }
  }
  return rows;
}

/** Advisory lock namespace of contact imports (one import at a time per organisation). */
const IMPORT_LOCK = 0x4f524749; // 'ORGI'

/**
 * `importContacts` — see the module comment for the rules.
 * @param defaultCountryCode digits prefixed to national numbers (trunk 0 dropped); absent: only E.164 accepted
 * @throws AppError 400 (`invalid_csv`, `invalid_header`, `too_many_rows`, `invalid_country_code`)
 */
export async function importContacts(deps: Deps, orgId: number, csv: string, defaultCountryCode?: string): Promise<ImportResult> {
  const skipped: ImportResult['skipped'] = [];
  const rows = parseRows(csv, defaultCountryCode, skipped);
  let created = 0;
  let updated = 0;
  await deps.db.kysely.transaction().execute(async (tx) => {
    await sql`select pg_advisory_xact_lock(${IMPORT_LOCK}, ${orgId}::int)`.execute(tx);
    const emails = [...new Set(rows.map((r) => r.email).filter((x): x is string => !!x))];
    const phones = [...new Set(rows.map((r) => r.phone).filter((x): x is string => !!x))];
    const existing = emails.length + phones.length
      ? await tx
          .selectFrom('contacts')
          .select(['id', 'name', 'email', 'phone', 'fields'])
          .where('org_id', '=', orgId)
          .where((eb) => eb.or([eb('email', '=', sql<string>`any(${emails}::text[])`), eb('phone', '=', sql<string>`any(${phones}::text[])`)]))
          .execute()
      : [];
    const byEmail = new Map<string, Target>();
    const byPhone = new Map<string, Target>();
    const targets: Target[] = [];
    for (const c of existing) {
      const t: Target = { id: c.id, name: c.name, email: c.email, phone: c.phone, fields: { ...(c.fields ?? {}) }, groups: new Set(), dirty: false, existing: true };
      targets.push(t);
      if (c.email) byEmail.set(c.email, t);
      if (c.phone) byPhone.set(c.phone, t);
    }
    const counted = new Set<Target>();
    for (const r of rows) {
      const a = r.email ? byEmail.get(r.email) : undefined;
      const b = r.phone ? byPhone.get(r.phone) : undefined;
      if (a && b && a !== b) {
        skipped.push({ line: r.line, reason: `email ${r.email} and phone ${r.phone} belong to two different contacts` });
        continue;
      }
      let t = a ?? b;
      if (t && !a && r.email && t.email && t.email !== r.email) {
        skipped.push({ line: r.line, reason: `phone ${r.phone} belongs to a contact with another email (${t.email})` });
        continue;
      }
      if (Object.keys({ ...(t?.fields ?? {}), ...r.fields }).length > CONTACT_LIMITS.fields) {
        skipped.push({ line: r.line, reason: `more than ${CONTACT_LIMITS.fields} fields` });
        continue;
      }
      if (!t) {
        t = { id: null, name: '', email: null, phone: null, fields: {}, groups: new Set(), dirty: true, existing: false };
        targets.push(t);
        created++;
        counted.add(t);
      } else if (!counted.has(t)) {
        updated++;
        counted.add(t);
      }
      if (r.name !== null) t.name = r.name;
      if (r.email && t.email !== r.email) t.email = r.email;
      // A replaced phone stays mapped to its old owner: a later row claiming it is skipped
      // rather than racing the unique constraint.
      if (r.phone && t.phone !== r.phone) t.phone = r.phone;
      if (t.email) byEmail.set(t.email, t);
      if (t.phone) byPhone.set(t.phone, t);
      Object.assign(t.fields, r.fields);
      t.dirty = true;
      for (const g of r.groups) t.groups.add(g);
    }
    const CHUNK = 1000;
    const changed = targets.filter((t) => t.existing && t.dirty);
    for (let i = 0; i < changed.length; i += CHUNK) {
      const part = changed.slice(i, i + CHUNK);
      await sql`
        update contacts c set name = v.name, email = v.email, phone = v.phone, fields = v.fields
          from unnest(${part.map((t) => t.id)}::bigint[], ${part.map((t) => t.name)}::text[], ${part.map((t) => t.email)}::text[],
                      ${part.map((t) => t.phone)}::text[], ${part.map((t) => JSON.stringify(t.fields))}::jsonb[]) as v(id, name, email, phone, fields)
         where c.id = v.id and c.org_id = ${orgId}`.execute(tx);
    }
    const fresh = targets.filter((t) => !t.existing);
    for (let i = 0; i < fresh.length; i += CHUNK) {
      const part = fresh.slice(i, i + CHUNK);
      const ids = await sql<{ id: number }>`
        insert into contacts (org_id, name, email, phone, fields)
        select ${orgId}, t.name, t.email, t.phone, t.fields
          from unnest(${part.map((t) => t.name)}::text[], ${part.map((t) => t.email)}::text[], ${part.map((t) => t.phone)}::text[],
                      ${part.map((t) => JSON.stringify(t.fields))}::jsonb[]) with ordinality as t(name, email, phone, fields, n)
         order by t.n
        returning id`.execute(tx);
      ids.rows.forEach((r, j) => (part[j].id = r.id));
    }
    const groupNames = [...new Set(targets.flatMap((t) => [...t.groups]))];
    if (groupNames.length) {
      await tx
        .insertInto('contact_groups')
        .values(groupNames.map((name) => ({ org_id: orgId, name })))
        .onConflict((oc) => oc.columns(['org_id', 'name']).doNothing())
        .execute();
      const gs = await tx.selectFrom('contact_groups').select(['id', 'name']).where('org_id', '=', orgId).where('name', 'in', groupNames).execute();
      const gid = new Map(gs.map((g) => [g.name, g.id]));
      const members = targets.flatMap((t) => [...t.groups].map((g) => ({ group_id: gid.get(g)!, contact_id: t.id! })));
      for (let i = 0; i < members.length; i += CHUNK) {
        await tx.insertInto('contact_group_members').values(members.slice(i, i + CHUNK)).onConflict((oc) => oc.doNothing()).execute();
      }
    }
  });
  skipped.sort((x, y) => x.line - y.line);
  return { created, updated, skipped };
}
