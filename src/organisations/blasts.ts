import { sql } from 'kysely';
import type { Deps } from '../context.ts';
import { coalescingRunner } from '../platform/coalesce.ts';
import { LIMITS } from '../core/actions.ts';
import { AppError, badRequest, conflict, notFound } from '../platform/errors.ts';
import type { Tx } from '../store/db.ts';
import { chainFor, checkChain } from './chains.ts';
import { orgById, type Org } from './orgs.ts';
import { decodeCursor, pageOf, type Page } from './pagination.ts';
import { checkQuota, lockQuota, rateBudget } from './quota.ts';
import { inSavepoint, markPrepared, type PreparedMark, prepareMessage, SEND_CONTACT_COLUMNS, type SendContact, withRetry } from './send.ts';
import { checkTemplates, renderTemplate } from './templates.ts';

/**
 * Blasts: one message to every contact of a group, tracked as a whole (issue 4 §5;
 * Voluble seed 002 "blasts"; docs/organisations.md "Blasts").
 *
 * Creation is ONE transaction and O(contacts) bulk inserts: quota check (a blast larger
 * than the remaining daily quota is refused with 429 before anything is created), the
 * `blasts` row, and one rendered `outbound_messages` row per contact of the group at that
 * moment (the recipient list is fixed then). The answer is 202: the messages are then
 * **prepared** in the background — each one's `message:add` in the contact's conversation
 * and its delivery — in chunks of PREPARE_CHUNK, each chunk one transaction that claims
 * unprepared rows with `FOR UPDATE SKIP LOCKED` and marks them prepared, so preparation is
 * resumable (a process that dies mid-chunk rolls the chunk back; any web process resumes
 * it) and never prepares a message twice (and the delivery's idempotency key `om:<id>`
 * would refuse a second delivery anyway). Preparation is paced by the organisation's
 * `rate_per_minute`.
 *
 * Counts are computed from the `deliveries` rows of the blast at each read (exact, never
 * drifting counters).
 */

/** Most contacts in one blast. */
export const MAX_BLAST = 100_000;
/** Messages prepared per transaction. */
export const PREPARE_CHUNK = 100;

/** What an application gives to start a blast. */
export interface BlastInput {
  group_id: number;
  subject?: string;
  /** The body template (templates.ts). */
  template: string;
  chain?: string[];
  idempotency_key?: string;
}

/** Counts of a blast's deliveries by state. */
export interface StateCounts {
  pending: number;
  sending: number;
  sent: number;
  delivered: number;
  read: number;
  replied: number;
  failed: number;
  cancelled: number;
}

/** A blast as the API shows it. Times UTC ISO 8601. */
export interface BlastView {
  id: number;
  group_id: number | null;
  subject: string;
  template: string;
  /** The chain given for the blast (null: each contact's preferred chain, else the organisation's). */
  chain: string[] | null;
  /** Contacts it was sent to (the group's size at creation). */
  total: number;
  created_by: string;
  idempotency_key: string | null;
  created_at: string;
  /** When every message had been prepared; null while preparing. */
  prepared_at: string | null;
  /** Messages not prepared yet (no delivery yet), and those that could not be (no delivery, never will). */
  preparing: number;
  errors: number;
  /** Deliveries by state, counted from the rows now. */
  counts: StateCounts;
  /** The same by the plugin of each delivery's current (or last) chain step. */
  by_plugin: Record<string, Partial<StateCounts>>;
}

const emptyCounts = (): StateCounts => ({ pending: 0, sending: 0, sent: 0, delivered: 0, read: 0, replied: 0, failed: 0, cancelled: 0 });

/**
 * `createBlast` — see the module comment.
 * @returns the blast, and `replayed` when the idempotency key was used before (nothing created)
 * @throws AppError 400 (`unknown_placeholder`, `invalid_chain`, `unknown_plugin`, `empty_group`,
 *   `blast_too_large`), 404 (no such group), 409 `idempotency_key_reused`, 429 `quota_exceeded`
 */
export async function createBlast(deps: Deps, org: Org, actor: string, input: BlastInput): Promise<{ blast: BlastView; replayed: boolean }> {
  checkTemplates({ template: input.template, subject: input.subject });
  if (input.chain) checkChain(input.chain);
  const r = await withRetry(deps, async (tx) => {
    await lockQuota(tx, org.id);
    if (input.idempotency_key !== undefined) {
      const prior = await tx.selectFrom('blasts').select(['id', 'group_id']).where('org_id', '=', org.id).where('client_key', '=', input.idempotency_key).executeTakeFirst();
      if (prior) {
        if (prior.group_id !== input.group_id) throw conflict('idempotency_key_reused', 'this idempotency_key was used for a blast to another group', { blast_id: prior.id });
        return { id: prior.id, replayed: true };
      }
      const msg = await tx.selectFrom('outbound_messages').select('id').where('org_id', '=', org.id).where('client_key', '=', input.idempotency_key).executeTakeFirst();
      if (msg) throw conflict('idempotency_key_reused', 'this idempotency_key was used for a message', { message_id: msg.id });
    }
    const g = await tx.selectFrom('contact_groups').select('id').where('org_id', '=', org.id).where('id', '=', input.group_id).executeTakeFirst();
    if (!g) throw notFound(`group ${input.group_id}`);
    const contacts = (await tx
      .selectFrom('contacts as c')
      .innerJoin('contact_group_members as m', 'm.contact_id', 'c.id')
      .select(['c.id', 'c.name', 'c.email', 'c.phone', 'c.preferred_chain', 'c.fields'])
      .where('m.group_id', '=', input.group_id)
      .where('c.org_id', '=', org.id)
      .orderBy('c.id')
      .execute()) as Omit<SendContact, 'conv_id'>[];
    if (contacts.length === 0) throw badRequest('empty_group', `group ${input.group_id} has no contacts`);
    if (contacts.length > MAX_BLAST) throw badRequest('blast_too_large', `a blast reaches at most ${MAX_BLAST} contacts`, { max: MAX_BLAST, group_size: contacts.length });
    await checkQuota(tx, deps, org, contacts.length);
    const now = new Date(deps.clock.now());
    const blast = await tx
      .insertInto('blasts')
      .values({
        org_id: org.id,
        group_id: input.group_id,
        subject: input.subject ?? '',
        template: input.template,
        chain: input.chain ?? null,
        total: contacts.length,
        created_by: actor,
        client_key: input.idempotency_key ?? null,
        created_at: now,
      })
      .returning('id')
      .executeTakeFirstOrThrow();
    const CHUNK = 2000;
    for (let i = 0; i < contacts.length; i += CHUNK) {
      const part = contacts.slice(i, i + CHUNK);
      const bodies = part.map((c) => renderTemplate(input.template, c).slice(0, LIMITS.bodyChars));
      const subjects = part.map((c) => renderTemplate(input.subject ?? '', c).replace(/[\r\n]+/g, ' ').slice(0, LIMITS.subjectChars));
      const chains = part.map((c) => `{${chainFor(input.chain, c, org.default_chain).join(',')}}`);
      await sql`
        insert into outbound_messages (org_id, contact_id, blast_id, subject, body, chain, created_at, author)
        select ${org.id}, t.contact_id, ${blast.id}, t.subject, t.body, t.chain::text[], ${now}, ${org.address}
          from unnest(${part.map((c) => c.id)}::bigint[], ${subjects}::text[], ${bodies}::text[], ${chains}::text[])
               as t(contact_id, subject, body, chain)`.execute(tx);
    }
    return { id: blast.id, replayed: false };
  });
  return { blast: await getBlast(deps, org.id, r.id), replayed: r.replayed };
}

/** One blast with its live counts. @throws AppError 404 */
export async function getBlast(deps: Deps, orgId: number, id: number): Promise<BlastView> {
  const db = deps.db.kysely;
  const b = await db.selectFrom('blasts').selectAll().where('org_id', '=', orgId).where('id', '=', id).executeTakeFirst();
  if (!b) throw notFound(`blast ${id}`);
  const rows = await db
    .selectFrom('deliveries')
    .select(['state', 'plugin', (eb) => eb.fn.countAll<number>().as('n')])
    .where('blast_id', '=', id)
    .groupBy(['state', 'plugin'])
    .execute();
  const counts = emptyCounts();
  const by_plugin: Record<string, Partial<StateCounts>> = {};
  for (const r of rows) {
    const n = Number(r.n);
    counts[r.state as keyof StateCounts] += n;
    const p = (by_plugin[r.plugin] ??= {});
    p[r.state as keyof StateCounts] = (p[r.state as keyof StateCounts] ?? 0) + n;
  }
  const unprepared = await db
    .selectFrom('outbound_messages')
    .select((eb) => [
      eb.fn.countAll<number>().filterWhere('error', 'is', null).as('preparing'),
      eb.fn.countAll<number>().filterWhere('error', 'is not', null).as('errors'),
    ])
    .where('blast_id', '=', id)
    .where('prepared_at', 'is', null)
    .executeTakeFirstOrThrow();
  return {
    id: b.id,
    group_id: b.group_id,
    subject: b.subject,
    template: b.template,
    chain: b.chain,
    total: b.total,
    created_by: b.created_by,
    idempotency_key: b.client_key,
    created_at: new Date(b.created_at).toISOString(),
    prepared_at: b.prepared_at ? new Date(b.prepared_at).toISOString() : null,
    preparing: Number(unprepared.preparing),
    errors: Number(unprepared.errors),
    counts,
    by_plugin,
  };
}

/** Blasts, newest first, paged (each with its counts). */
export async function listBlasts(deps: Deps, orgId: number, page: { cursor?: string; limit: number }): Promise<Page<BlastView>> {
  const before = decodeCursor(page.cursor, 'number');
  let q = deps.db.kysely.selectFrom('blasts').select('id').where('org_id', '=', orgId);
  if (before !== null) q = q.where('id', '<', before as number);
  const ids = await q.orderBy('id', 'desc').limit(Math.min(page.limit, 100) + 1).execute();
  const p = pageOf(ids, Math.min(page.limit, 100), (r) => r.id);
  return { items: await Promise.all(p.items.map((r) => getBlast(deps, orgId, r.id))), next_cursor: p.next_cursor };
}

/**
 * Prepares up to `limit` messages of blast `blastId` in one transaction (see the module
 * comment). A message that cannot be prepared (a 4xx from the conversation write) gets its
 * `error` and no delivery; the others go on.
 * @returns how many rows were claimed (0: nothing left to claim)
 */
export async function prepareChunk(deps: Deps, org: Org, blastId: number, limit: number): Promise<number> {
  try {
    return await prepareChunkOnce(deps, org, blastId, limit, false);
  } catch (e) {
    // Optimistic first: no savepoint per message. A message that cannot be prepared aborts
    // that attempt; the chunk is then redone isolating each message in a savepoint.
    if (!(e instanceof AppError) || e.status >= 500) throw e;
    return prepareChunkOnce(deps, org, blastId, limit, true);
  }
}

async function prepareChunkOnce(deps: Deps, org: Org, blastId: number, limit: number, careful: boolean): Promise<number> {
  return withRetry(deps, async (tx: Tx) => {
    const rows = await tx
      .selectFrom('outbound_messages')
      .select(['id', 'contact_id', 'subject', 'body', 'chain', 'blast_id'])
      .where('blast_id', '=', blastId)
      .where('prepared_at', 'is', null)
      .where('error', 'is', null)
      .orderBy('id')
      .limit(limit)
      .forUpdate()
      .skipLocked()
      .execute();
    if (rows.length === 0) return 0;
    // Lock order: contacts (id order), then their conversations (id order), then whatever
    // the conversation writes take — as a single send does — so chunks never deadlock with it.
    const contacts = (await tx
      .selectFrom('contacts')
      .select([...SEND_CONTACT_COLUMNS])
      .where('id', 'in', rows.map((r) => r.contact_id))
      .orderBy('id')
      .forUpdate()
      .execute()) as SendContact[];
    const convIds = contacts.map((c) => c.conv_id).filter((x): x is number => x !== null).sort((a, b) => a - b);
    // The contacts' conversations, locked and read at once (prepareMessage then doesn't read each again).
    const convs = convIds.length ? await tx.selectFrom('conversations').selectAll().where('id', 'in', convIds).orderBy('id').forUpdate().execute() : [];
    const convById = new Map(convs.map((c) => [c.id, c]));
    const byId = new Map(contacts.map((c) => [c.id, c]));
    const marks: PreparedMark[] = [];
    for (const r of rows) {
      const contact = byId.get(r.contact_id)!;
      const om = { id: r.id, subject: r.subject, body: r.body, chain: r.chain, blast_id: r.blast_id };
      // A conversation row is current only until the first append to it.
      const conv = contact.conv_id !== null ? convById.get(contact.conv_id) : undefined;
      if (conv) convById.delete(conv.id);
      const opts = { conv, deferMark: true };
      if (!careful) {
        marks.push((await prepareMessage(tx, deps, org, contact, om, opts)).mark);
        continue;
      }
      try {
        marks.push((await inSavepoint(tx, () => prepareMessage(tx, deps, org, contact, om, opts))).mark);
      } catch (e) {
        if (!(e instanceof AppError) || e.status >= 500) throw e;
        await tx.updateTable('outbound_messages').set({ error: `${e.message} (${e.code})`.slice(0, 2000) }).where('id', '=', r.id).execute();
      }
    }
    // Every message of the chunk marked prepared in one statement.
    await markPrepared(tx, deps, org.id, marks);
    return rows.length;
  });
}

/** Marks a blast prepared when none of its messages is left to prepare. */
async function finishIfDone(deps: Deps, blastId: number): Promise<boolean> {
  const r = await sql<{ id: number }>`
    update blasts set prepared_at = ${new Date(deps.clock.now())}
     where id = ${blastId} and prepared_at is null
       and not exists (select 1 from outbound_messages where blast_id = ${blastId} and prepared_at is null and error is null)
    returning id`.execute(deps.db.kysely);
  return r.rows.length > 0;
}

/** The background preparer of blasts in a web process. */
export interface BlastPreparer {
  /** Looks for work now (after a blast is created). */
  kick(): void;
  /** Resolves when no blast is being prepared by this process (tests). */
  idle(): Promise<void>;
  stop(): Promise<void>;
}

/**
 * Starts the blast preparer: on `kick()` and every `pollMs` (resuming blasts left half
 * prepared by a process that stopped, and paced blasts), prepares every unprepared blast,
 * oldest first, chunk by chunk, within each organisation's rate budget.
 */
export function startBlastPreparer(deps: Deps, opts: { pollMs?: number; chunk?: number } = {}): BlastPreparer {
  const chunk = opts.chunk ?? PREPARE_CHUNK;
  let stopped = false;
  const round = async () => {
    const blasts = await deps.db.kysely.selectFrom('blasts').select(['id', 'org_id']).where('prepared_at', 'is', null).orderBy('id').limit(100).execute();
    for (const b of blasts) {
      while (!stopped) {
        const org = await orgById(deps.db.kysely, b.org_id);
        const budget = Math.min(chunk, await rateBudget(deps.db.kysely, deps, org));
        if (budget <= 0) break; // paced: the poll comes back for it
        const n = await prepareChunk(deps, org, b.id, budget);
        if (n === 0) {
          await finishIfDone(deps, b.id);
          break;
        }
      }
      if (stopped) return;
    }
  };
  const runner = coalescingRunner(round, (e) => deps.log.error({ err: e }, 'blast preparation round failed'));
  const kick = runner.kick;
  const timer = setInterval(kick, opts.pollMs ?? 1000);
  timer.unref();
  kick();
  return {
    kick,
    idle: runner.idle,
    stop: async () => {
      stopped = true;
      clearInterval(timer);
      await runner.stop();
    },
  };
}
