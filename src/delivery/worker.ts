import { randomBytes } from 'node:crypto';
import pg from 'pg';
import { sql, type Updateable } from 'kysely';
import type { Deps } from '../context.ts';
import { DELIVERIES_CHANNEL } from '../mail/outbound/enqueue.ts';
import { listen } from '../store/listen.ts';
import type { DeliveriesTable } from '../store/schema.ts';
import { applyEarlyReceipts } from './inbound.ts';
import { orgConfigCache } from './org-config.ts';
import { type Delivery, type DeliveryPlugin, type RetryPolicy, type SendResult, inFlightLimit, retryDelayMs, retryPolicyFor } from './plugin.ts';
import { knownPlugins } from './registry.ts';
import { type ChainStep, type FallbackPolicy, fallbackDeadline, fallbackDetail, moveOnChange, recordFallback, wakeWorkers } from './state.ts';

export { builtinPlugins } from './registry.ts';

/** Rows claimed by one statement at most, and outcomes recorded by one statement at most. */
const DEFAULT_BATCH = 200;
/** Attempts in flight at once (lanes mostly wait on the counterpart's answer). */
const DEFAULT_CONCURRENCY = 64;

/** Options of a delivery worker. Defaults suit production; tests shorten the timings. */
export interface WorkerOptions {
  /** The plugins this worker may use (default: every plugin known to the process). */
  plugins?: Map<string, DeliveryPlugin>;
  /** Most rows claimed by one statement, and most outcomes recorded by one (default PARLEY_DELIVERY_BATCH, 200). */
  batch?: number;
  /** Attempts in flight at once (default PARLEY_DELIVERY_CONCURRENCY, 64). */
  concurrency?: number;
  /** Safety-net poll for scheduled retries and fallback windows, in ms (default 1000). */
  pollMs?: number;
  /** Lease of a claim in ms (default PARLEY_DELIVERY_LEASE_MS, 120000). */
  leaseMs?: number;
  /** Per-plugin overrides of RETRY_POLICIES (key `default` for all). */
  policies?: Record<string, Partial<RetryPolicy>>;
  /** The worker's name in `delivery_attempts.worker` and `deliveries.locked_by` (default `w-<pid>-<random>`). */
  name?: string;
}

/** A running delivery worker (the `worker` role). */
export interface DeliveryWorker {
  name: string;
  /** Plugins disabled at start-up because `validate()` failed, with the reason. */
  disabled: ReadonlyMap<string, string>;
  /** Claims and attempts what is due now until nothing is, waits for the outcomes to be recorded, runs the fallback sweep; resolves with the number of rows handled. */
  runOnce(): Promise<number>;
  stop(): Promise<void>;
}

/**
 * Validates every plugin at start-up (issue 4 §1; Voluble seed: "the server validates plugins
 * and refuses broken ones"). A plugin whose `validate(deps)` throws is disabled: logged as an
 * error, and rows for it move on to the next step of their chain with the reason.
 * @returns the disabled plugins and why
 */
export async function validatePlugins(deps: Deps, plugins: Map<string, DeliveryPlugin>): Promise<Map<string, string>> {
  const disabled = new Map<string, string>();
  for (const p of plugins.values()) {
    try {
      await p.validate(deps);
    } catch (e) {
      const reason = (e as Error).message ?? String(e);
      disabled.set(p.name, reason);
      deps.log.error({ plugin: p.name, reason }, 'delivery plugin disabled: validation failed');
    }
  }
  return disabled;
}

/**
 * Claims due deliveries with `FOR UPDATE SKIP LOCKED`, so many workers on one PostgreSQL
 * never attempt the same delivery at once; a claim is a lease (`locked_until`, `leaseMs`), so
 * a worker killed mid-attempt loses nothing: the row is claimed again when the lease ends and
 * attempted with the same idempotency key. Each claim counts as an attempt of the step.
 */
export async function claimDue(deps: Deps, worker: string, limit: number, leaseMs = deps.config.deliveryLeaseMs): Promise<Delivery[]> {
  return claimWith((q) => deps.db.pool.query(q), worker, limit, leaseMs);
}

/**
 * The claim (see claimDue): the due rows' ids are picked by an InitPlan over the `deliveries_due`
 * index, then updated by primary key. Rows whose ids are in `$4` (those the claiming worker
 * still holds: attempts in flight or outcomes not yet recorded, whose lease may have run out)
 * are left alone; `filter` narrows the rows picked to some plugins (`$5`): `only` one, or all
 * `except` some.
 */
const claimSql = (filter: string) => `
update deliveries d
   set state = 'sending', locked_by = $1, locked_until = now() + $2::interval,
       attempts = d.attempts + 1, updated_at = now()
 where d.id = any (array(
         select id from deliveries
          where state in ('pending', 'sending') and next_attempt_at <= now()
            and (locked_until is null or locked_until < now())
            and id <> all ($4::bigint[])${filter}
          order by next_attempt_at
          limit $3
          for update skip locked))
returning d.*`;
const CLAIM = {
  all: { name: 'parley_delivery_claim', text: claimSql('') },
  only: { name: 'parley_delivery_claim_only', text: claimSql('\n            and plugin = $5') },
  except: { name: 'parley_delivery_claim_except', text: claimSql('\n            and plugin <> all ($5::text[])') },
};

/** Claims up to `limit` due rows (of plugin `filter.only`, or of any plugin but `filter.except`), none of `held`. */
async function claimWith(
  exec: Exec,
  worker: string,
  limit: number,
  leaseMs: number,
  filter: { only?: string; except?: string[] } = {},
  held: Iterable<number> = [],
): Promise<Delivery[]> {
  const values: unknown[] = [worker, `${leaseMs} milliseconds`, limit, [...held]];
  let q = CLAIM.all;
  if (filter.only !== undefined) {
    q = CLAIM.only;
    values.push(filter.only);
  } else if (filter.except?.length) {
    q = CLAIM.except;
    values.push(filter.except);
  }
  const r = await exec({ ...q, values });
  return r.rows as Delivery[];
}

/** The columns an outcome writes (besides the lock, cleared, and `updated_at`). */
type OutcomeColumns = Pick<
  DeliveriesTable,
  | 'state'
  | 'attempts'
  | 'next_attempt_at'
  | 'last_error'
  | 'provider_ref'
  | 'sent_at'
  | 'delivered_at'
  | 'read_at'
  | 'fallback_at'
  | 'chain_index'
  | 'plugin'
  | 'destination'
  | 'idempotency_key'
  | 'step_started_at'
>;

/** One attempt's outcome, waiting to be recorded. */
interface Outcome {
  /** The row as claimed (its `locked_by` and `attempts` are the claim that must still hold). */
  d: Delivery;
  result: SendResult;
  durationMs: number;
  /** When the attempt ended. */
  at: Date;
  plugin?: DeliveryPlugin;
  policy: RetryPolicy;
}

/**
 * What an outcome does to its row (issue 4 §3; docs/delivery.md, "Servicechains"):
 * - accepted → `sent` (or `delivered`), `sent_at`, provider ref, the fallback window;
 * - retry → `pending` after the plugin's backoff, until its policy's attempts or age run out;
 * - failed, or retries run out → the next chain step (`pending`, attempts reset, that step's
 *   idempotency key), or `failed` after the last step;
 * - the row's `expires_at` passed → `failed`, no fallback.
 * @returns the columns to set, and the fallback event to record when the row moves on
 */
function outcomeChange(o: Outcome): { set: Updateable<DeliveriesTable>; moved: { reason: string; to: ChainStep | null } | null } {
  const { d, result, at: now, policy } = o;
  const expired = d.expires_at !== null && new Date(d.expires_at).getTime() <= now.getTime();
  if (result.outcome === 'accepted') {
    const delivered = result.delivered === true;
    return {
      set: {
        state: delivered ? 'delivered' : 'sent',
        provider_ref: result.providerRef ?? null,
        last_error: null,
        sent_at: now,
        delivered_at: delivered ? now : null,
        fallback_at: fallbackDeadline(d, o.plugin?.capabilities, now, delivered),
      },
      moved: null,
    };
  }
  if (expired) return { set: { state: 'failed', last_error: `expired before it could be sent (${d.plugin}: ${result.error})`.slice(0, 2000), fallback_at: null }, moved: null };
  const stepStart = new Date(d.step_started_at ?? d.created_at).getTime();
  const exhausted = d.attempts >= policy.maxAttempts ? `${d.attempts} attempts` : now.getTime() - stepStart >= policy.maxAgeS * 1000 ? `${policy.maxAgeS} s` : null;
  if (result.outcome === 'retry' && !exhausted) {
    return {
      set: { state: 'pending', last_error: result.error.slice(0, 2000), next_attempt_at: new Date(now.getTime() + (result.retryAfterMs ?? retryDelayMs(d.attempts, Math.random, policy))) },
      moved: null,
    };
  }
  const reason = result.outcome === 'retry' ? `${d.plugin}: gave up after ${exhausted}: ${result.error}` : `${d.plugin}: ${result.error}`;
  const change = moveOnChange(d, reason, now);
  return { set: change.set, moved: { reason, to: change.to } };
}

const ts = (v: Date | string | null | undefined): string | null => (v === null || v === undefined ? null : new Date(v).toISOString());

/**
 * Records a batch of outcomes in ONE statement (autocommit, so atomic): every attempt becomes
 * a `delivery_attempts` row; each row moves to its next state (see outcomeChange) only if its
 * claim still holds (`state = 'sending'`, `locked_by` and `attempts` as claimed); rows that
 * move on down their chain get their `fallback` event. Per row the answer says whether the
 * claim held and whether receipts are waiting for it (an event that named the row or its new
 * provider ref before the attempt was recorded: see applyEarlyReceipts).
 * The statement text never changes (arrays, `unnest`), so it stays one prepared statement.
 */
const RECORD_OUTCOMES = `
with t as (
  select * from unnest($1::bigint[], $2::text[], $3::int[],
                       $4::text[], $5::text[], $6::text[], $7::text[], $8::int[], $9::timestamptz[],
                       $10::text[], $11::int[], $12::timestamptz[], $13::text[], $14::text[],
                       $15::timestamptz[], $16::timestamptz[], $17::timestamptz[], $18::timestamptz[],
                       $19::int[], $20::text[], $21::text[], $22::text[], $23::timestamptz[],
                       $24::text[], $25::text[])
    as t(id, claimed_by, claimed_attempts,
         a_plugin, a_outcome, a_error, a_ref, a_ms, a_at,
         state, attempts, next_attempt_at, last_error, provider_ref,
         sent_at, delivered_at, read_at, fallback_at,
         chain_index, plugin, destination, idempotency_key, step_started_at,
         ev_ref, ev_detail)
), attempt as (
  insert into delivery_attempts (delivery_id, at, plugin, outcome, error, provider_ref, duration_ms, worker)
  select id, a_at, a_plugin, a_outcome, a_error, a_ref, a_ms, $26 from t
), upd as (
  update deliveries d
     set state = t.state, attempts = t.attempts, next_attempt_at = t.next_attempt_at, last_error = t.last_error,
         provider_ref = t.provider_ref, sent_at = t.sent_at, delivered_at = t.delivered_at, read_at = t.read_at,
         fallback_at = t.fallback_at, chain_index = t.chain_index, plugin = t.plugin, destination = t.destination,
         idempotency_key = t.idempotency_key, step_started_at = t.step_started_at,
         locked_by = null, locked_until = null, updated_at = t.a_at
    from t
   where d.id = t.id and d.state = 'sending' and d.locked_by = t.claimed_by and d.attempts = t.claimed_attempts
  returning d.id, d.org_id, d.plugin, d.provider_ref, coalesce(d.step_started_at, d.created_at) as step_start
), fallback as (
  insert into delivery_events (delivery_id, org_id, plugin, kind, provider_ref, detail)
  select t.id, u.org_id, t.a_plugin, 'fallback', t.ev_ref, t.ev_detail::jsonb
    from upd u join t on t.id = u.id
   where t.ev_detail is not null
)
select u.id,
       t.a_outcome = 'accepted' and (
         exists (select 1 from delivery_events e
                  where e.delivery_id = u.id and e.plugin = u.plugin and e.at >= u.step_start and e.kind in ('delivered', 'read', 'failed'))
         or (u.provider_ref is not null and exists (select 1 from delivery_events e
                  where e.delivery_id is null and e.plugin = u.plugin and e.provider_ref = u.provider_ref and e.org_id is not distinct from u.org_id))
       ) as early
  from upd u join t on t.id = u.id`;

/** Runs one named statement: on a pooled connection or the worker's own. */
type Exec = (q: { name: string; text: string; values: unknown[] }) => Promise<{ rows: any[] }>;

/**
 * A connection of the worker's own with session `options` (e.g. `-c synchronous_commit=off`),
 * opened at first use and replaced when it breaks.
 */
function ownConnection(deps: Deps, connectionString: string, purpose: string, options: string): { exec: Exec; open(): Promise<void>; end(): Promise<void> } {
  let client: Promise<pg.Client> | null = null;
  const drop = (c: Promise<pg.Client>) => {
    if (client !== c) return;
    client = null;
    void c.then((cl) => cl.end()).catch(() => {});
  };
  const connect = (): Promise<pg.Client> => {
    if (!client) {
      const c = new pg.Client({ connectionString, options });
      const p = c.connect().then(() => c);
      c.on('error', (err) => {
        // While the process stops (Db.stopping) the connection's end is expected.
        if (!deps.db.stopping) deps.log.warn({ err, purpose }, 'delivery worker connection lost; reconnecting');
        drop(p);
      });
      client = p;
      p.catch(() => drop(p));
    }
    return client;
  };
  return {
    open: async () => {
      await connect();
    },
    exec: async (q) => {
      const p = connect();
      try {
        return await (await p).query(q);
      } catch (e) {
        // A broken connection is replaced; an error of the statement (it has a SQLSTATE) leaves it usable.
        if ((e as { code?: string }).code === undefined) drop(p);
        throw e;
      }
    },
    end: async () => {
      const p = client;
      client = null;
      if (p) await p.then((c) => c.end()).catch(() => {});
    },
  };
}

/**
 * Records `outcomes` (at most a few hundred) for `worker` with RECORD_OUTCOMES, then applies
 * the receipts that raced their attempt (rare: only rows the statement flags), each in its own
 * transaction, and wakes the workers when a row moved on to a next step.
 * @returns the ids of the rows whose claim held (the others got their attempt recorded only)
 */
async function recordOutcomes(deps: Deps, exec: Exec, worker: string, outcomes: Outcome[]): Promise<Set<number>> {
  const cols = {
    id: [] as number[],
    claimedBy: [] as (string | null)[],
    claimedAttempts: [] as number[],
    aPlugin: [] as string[],
    aOutcome: [] as string[],
    aError: [] as (string | null)[],
    aRef: [] as (string | null)[],
    aMs: [] as number[],
    aAt: [] as string[],
    state: [] as string[],
    attempts: [] as number[],
    nextAttemptAt: [] as (string | null)[],
    lastError: [] as (string | null)[],
    providerRef: [] as (string | null)[],
    sentAt: [] as (string | null)[],
    deliveredAt: [] as (string | null)[],
    readAt: [] as (string | null)[],
    fallbackAt: [] as (string | null)[],
    chainIndex: [] as number[],
    plugin: [] as string[],
    destination: [] as string[],
    idempotencyKey: [] as string[],
    stepStartedAt: [] as (string | null)[],
    evRef: [] as (string | null)[],
    evDetail: [] as (string | null)[],
  };
  const movedOn = new Set<number>();
  for (const o of outcomes) {
    const { d, result } = o;
    const { set, moved } = outcomeChange(o);
    if (moved?.to) movedOn.add(d.id);
    const v = { ...d, ...set } as Delivery & OutcomeColumns;
    cols.id.push(d.id);
    cols.claimedBy.push(d.locked_by);
    cols.claimedAttempts.push(d.attempts);
    cols.aPlugin.push(d.plugin);
    cols.aOutcome.push(result.outcome);
    cols.aError.push(result.outcome === 'accepted' ? null : result.error.slice(0, 2000));
    cols.aRef.push(result.outcome === 'accepted' ? (result.providerRef ?? null) : null);
    cols.aMs.push(Math.round(o.durationMs));
    cols.aAt.push(o.at.toISOString());
    cols.state.push(v.state as string);
    cols.attempts.push(v.attempts as number);
    cols.nextAttemptAt.push(ts(v.next_attempt_at as Date));
    cols.lastError.push(v.last_error);
    cols.providerRef.push(v.provider_ref);
    cols.sentAt.push(ts(v.sent_at));
    cols.deliveredAt.push(ts(v.delivered_at));
    cols.readAt.push(ts(v.read_at));
    cols.fallbackAt.push(ts(v.fallback_at));
    cols.chainIndex.push(v.chain_index as number);
    cols.plugin.push(v.plugin);
    cols.destination.push(v.destination);
    cols.idempotencyKey.push(v.idempotency_key);
    cols.stepStartedAt.push(ts(v.step_started_at));
    cols.evRef.push(moved ? d.provider_ref : null);
    cols.evDetail.push(moved ? fallbackDetail(d, moved.to, moved.reason) : null);
  }
  const r = await exec({ name: 'parley_delivery_record_outcomes', text: RECORD_OUTCOMES, values: [...Object.values(cols), worker] });
  const held = new Set<number>();
  const early = new Set<number>();
  for (const row of r.rows) {
    held.add(Number(row.id));
    if (row.early) early.add(Number(row.id));
  }
  let wake = false;
  for (const o of outcomes) {
    if (!held.has(o.d.id)) {
      deps.log.warn({ delivery: o.d.id, worker, outcome: o.result.outcome }, 'delivery claim lost (lease expired and re-claimed, or cancelled): outcome recorded as an attempt only');
      continue;
    }
    if (movedOn.has(o.d.id)) wake = true;
    if (early.has(o.d.id) && (await applyEarlyFor(deps, o))) wake = true;
  }
  if (wake) await sql`select pg_notify(${DELIVERIES_CHANNEL}, '')`.execute(deps.db.kysely);
  return held;
}

/**
 * Applies the receipts that arrived before `o`'s accepted attempt was recorded, in a
 * transaction that locks the row, if the row is still on that step.
 * @returns true when a receipt moved the row on (workers should be woken)
 */
async function applyEarlyFor(deps: Deps, o: Outcome): Promise<boolean> {
  return deps.db.kysely.transaction().execute(async (tx) => {
    const row = await tx.selectFrom('deliveries').selectAll().where('id', '=', o.d.id).forUpdate().executeTakeFirst();
    if (!row || row.plugin !== o.d.plugin || row.chain_index !== o.d.chain_index || (row.state !== 'sent' && row.state !== 'delivered')) return false;
    return applyEarlyReceipts(tx, row, o.plugin, new Date(deps.clock.now()));
  });
}

/**
 * Records an attempt (issue 4 §3: time, plugin, outcome, error, provider ref, worker) and
 * moves the delivery to its next state — but only if this claim still holds the row
 * (`state = 'sending'`, `locked_by` and `attempts` as claimed): a lease that expired and was
 * claimed again, or a row cancelled meanwhile, is never overwritten (the attempt is still
 * recorded). The outcomes are those of outcomeChange. Workers record their outcomes in
 * batches through the same statement; this records one.
 * @returns false when the claim was lost and nothing but the attempt was written
 */
export async function recordOutcome(
  deps: Deps,
  d: Delivery,
  result: SendResult,
  worker: string,
  durationMs: number,
  opts: { plugin?: DeliveryPlugin; policy?: RetryPolicy } = {},
): Promise<boolean> {
  const o: Outcome = { d, result, durationMs, at: new Date(deps.clock.now()), plugin: opts.plugin, policy: opts.policy ?? retryPolicyFor(d.plugin) };
  const held = await recordOutcomes(deps, (q) => deps.db.pool.query(q), worker, [o]);
  return held.has(d.id);
}

/**
 * Moves on the accepted rows whose time window passed (docs/delivery.md, "Time-window
 * fallback"): a `sent` row not delivered by its `fallback_at`, a `delivered` row not read by
 * then, goes to the next step of its chain, with a `fallback` event saying why.
 * @returns how many rows moved on
 */
export async function sweepFallbacks(deps: Deps, limit = 100): Promise<number> {
  return deps.db.kysely.transaction().execute(async (tx) => {
    const rows = await tx
      .selectFrom('deliveries')
      .selectAll()
      .where('fallback_at', '<=', sql<Date>`now()`)
      .where('state', 'in', ['sent', 'delivered'])
      .orderBy('fallback_at')
      .limit(limit)
      .forUpdate()
      .skipLocked()
      .execute();
    const now = new Date(deps.clock.now());
    for (const d of rows) {
      const fp = (d.fallback_policy ?? {}) as FallbackPolicy;
      const reason =
        d.state === 'sent' && fp.not_delivered_s ? `${d.plugin}: not delivered within ${fp.not_delivered_s} s` : `${d.plugin}: not read within ${fp.not_read_s ?? 0} s`;
      const { set, to } = moveOnChange(d, reason, now);
      if (!to) {
        await tx.updateTable('deliveries').set({ fallback_at: null }).where('id', '=', d.id).execute();
        continue;
      }
      await tx.updateTable('deliveries').set(set).where('id', '=', d.id).execute();
      await recordFallback(tx, d, to, reason);
    }
    if (rows.length) await wakeWorkers(tx);
    return rows.length;
  });
}

/** One attempt through its plugin, bounded by `timeoutMs`: a throw or the deadline is a `retry` outcome. */
function attempt(deps: Deps, plugin: DeliveryPlugin, d: Delivery, config: Record<string, unknown>, timeoutMs: number): Promise<SendResult> {
  const ac = new AbortController();
  return new Promise<SendResult>((resolve) => {
    const timer = setTimeout(() => {
      ac.abort();
      resolve({ outcome: 'retry', error: `attempt timed out after ${timeoutMs} ms` });
    }, timeoutMs);
    let sending: Promise<SendResult>;
    try {
      sending = plugin.send(d, deps, { config, signal: ac.signal, timeoutMs, orgId: d.org_id });
    } catch (e) {
      sending = Promise.reject(e);
    }
    sending.then(
      (r) => {
        clearTimeout(timer);
        resolve(r);
      },
      (e) => {
        clearTimeout(timer);
        resolve({ outcome: 'retry', error: `${d.plugin} plugin threw: ${(e as Error)?.message ?? String(e)}` });
      },
    );
  });
}

/**
 * The worker role (issue 4 §4): validates the plugins, then waits for `parley_deliveries`
 * notifications (and polls every `pollMs` as a safety net, for scheduled retries and fallback
 * windows), and keeps up to `concurrency` attempts in flight: it claims due rows as lanes
 * free up (never more than the free lanes, so a claimed row's lease starts with its attempt),
 * and records the outcomes in batches — one statement per batch, on its own connection
 * committing without waiting for the WAL flush; outcomes that finish while a batch is being
 * written form the next one. Rows for an unknown or disabled plugin, or for an organisation
 * whose config of the plugin is invalid, move on down their chain with the reason.
 */
export async function startDeliveryWorker(deps: Deps, opts: WorkerOptions = {}): Promise<DeliveryWorker> {
  const plugins = opts.plugins ?? knownPlugins();
  const disabled = await validatePlugins(deps, plugins);
  const worker = opts.name ?? `w-${process.pid}-${randomBytes(3).toString('hex')}`;
  const batch = Math.max(1, opts.batch ?? deps.config.deliveryBatch ?? DEFAULT_BATCH);
  const concurrency = Math.max(1, opts.concurrency ?? deps.config.deliveryConcurrency ?? DEFAULT_CONCURRENCY);
  /** Free lanes worth a claim while others are busy (fewer rows per claim cost more statements per row). */
  const refillAt = Math.max(1, Math.ceil(concurrency / 4));
  const leaseMs = opts.leaseMs ?? deps.config.deliveryLeaseMs;
  const orgConfig = orgConfigCache(deps);
  const configChecked = new WeakMap<object, string | null>();
  const connectionString = (deps.db.pool as any).options.connectionString as string;
  let stopped = false;

  const configProblem = async (plugin: DeliveryPlugin, config: Record<string, unknown>): Promise<string | null> => {
    if (configChecked.has(config)) return configChecked.get(config)!;
    let problem: string | null = null;
    try {
      await plugin.validate(deps, config);
    } catch (e) {
      problem = (e as Error).message;
    }
    configChecked.set(config, problem);
    return problem;
  };

  // The worker's own connections, one statement at a time each: one claims, one records.
  // Their plans are pinned by session settings rather than left to the table's statistics,
  // which lag behind a blast: right after 20,000 rows were enqueued PostgreSQL still thought
  // the table nearly empty and claimed by sorting every due row (10–15 ms a claim) until
  // autoanalyze ran. Claims walk the `deliveries_due` index in order; outcomes join their
  // rows by primary key. Recording does not wait for the WAL flush: an outcome lost in a
  // database crash only means the row is attempted again, with the same idempotency key.
  const claimer = ownConnection(deps, connectionString, 'claims', '-c enable_seqscan=off -c enable_bitmapscan=off -c enable_sort=off');
  const recorder = ownConnection(deps, connectionString, 'outcomes', '-c synchronous_commit=off -c enable_seqscan=off -c enable_bitmapscan=off -c enable_hashjoin=off -c enable_mergejoin=off');
  // Outcomes wait for their recorder, which writes them a batch at a time. An outcome whose
  // claim is about to end (a short lease, an attempt that ran to its timeout) goes to a second
  // recorder on a third connection instead, so that no batch in progress delays it past its
  // lease (the row would be claimed again and its outcome recorded as an attempt only).
  const late = ownConnection(deps, connectionString, 'late outcomes', '-c synchronous_commit=off -c enable_seqscan=off -c enable_bitmapscan=off -c enable_hashjoin=off -c enable_mergejoin=off');
  let handled = 0;
  /**
   * Rows this worker holds: claimed, and their outcome not yet recorded. Its claims leave them
   * alone even when their lease ran out meanwhile (a late timer on a loaded machine): the
   * outcome still applies then, unless another worker claimed the row in between.
   */
  const held = new Set<number>();
  const recorderOf = (exec: Exec) => {
    const queue: Outcome[] = [];
    const r = {
      queue,
      busy: false,
      add(o: Outcome) {
        queue.push(o);
        void r.flush();
      },
      async flush() {
        if (r.busy) return;
        r.busy = true;
        try {
          while (queue.length > 0) {
            const outcomes = queue.splice(0, batch);
            try {
              await recordOutcomes(deps, exec, worker, outcomes);
            } catch (e) {
              // The claims stay until their leases end; the rows are attempted again then, same keys.
              deps.log.error({ err: e, deliveries: outcomes.map((o) => o.d.id) }, 'delivery attempts could not be recorded');
            }
            handled += outcomes.length;
            for (const o of outcomes) held.delete(o.d.id);
          }
        } finally {
          r.busy = false;
        }
        settled();
        pump();
      },
    };
    return r;
  };
  const recorders = { batch: recorderOf(recorder.exec), late: recorderOf(late.exec) };
  /** Time left on a claim below which its outcome skips the batch queue: a quarter of the lease, at most 1 s. */
  const lateMs = Math.min(1000, leaseMs / 4);
  const record = (o: Outcome) => {
    const leaseLeft = o.d.locked_until ? new Date(o.d.locked_until).getTime() - Date.now() : Infinity;
    (leaseLeft < lateMs ? recorders.late : recorders.batch).add(o);
  };

  // ---- Attempts. ----
  const handle = async (d: Delivery): Promise<Outcome> => {
    const plugin = plugins.get(d.plugin);
    const policy = retryPolicyFor(d.plugin, opts.policies);
    const t0 = performance.now();
    let result: SendResult;
    if (d.expires_at !== null && new Date(d.expires_at).getTime() <= deps.clock.now()) result = { outcome: 'failed', error: `expired at ${new Date(d.expires_at).toISOString()}` };
    else if (!plugin) result = { outcome: 'failed', error: `unknown plugin ${d.plugin}` };
    else if (disabled.has(d.plugin)) result = { outcome: 'failed', error: `plugin ${d.plugin} is disabled: ${disabled.get(d.plugin)}` };
    else {
      const config = await orgConfig(d.org_id, d.plugin);
      const problem = plugin.needsConfig && d.org_id !== null ? await configProblem(plugin, config) : null;
      if (problem) result = { outcome: 'failed', error: `${d.plugin} is not configured correctly for this organisation: ${problem}` };
      else {
        // The lease runs from the claim: the attempt ends a fifth of the lease before the claim
        // does, so that its outcome is recorded while the claim still holds.
        const leaseLeft = d.locked_until ? new Date(d.locked_until).getTime() - Date.now() : leaseMs;
        const timeoutMs = Math.max(100, Math.min(policy.attemptTimeoutMs, Math.floor(leaseMs * 0.8), leaseLeft - Math.floor(leaseMs * 0.2)));
        result = await attempt(deps, plugin, d, config, timeoutMs);
      }
    }
    if (result.outcome !== 'accepted') deps.log.warn({ delivery: d.id, plugin: d.plugin, to: d.destination, result }, 'delivery attempt not accepted');
    return { d, result, durationMs: performance.now() - t0, at: new Date(deps.clock.now()), plugin, policy };
  };
  let inflight = 0;
  /** Plugins whose attempts one worker keeps below the worker's concurrency (inFlightLimit), and how many are in flight. */
  const limits = new Map<string, { max: number; inflight: number }>();
  for (const p of plugins.values()) {
    const max = inFlightLimit(p);
    if (max !== null && max < concurrency) limits.set(p.name, { max, inflight: 0 });
  }
  const limitedNames = [...limits.keys()];
  const start = (d: Delivery) => {
    inflight++;
    held.add(d.id);
    const limit = limits.get(d.plugin);
    if (limit) limit.inflight++;
    handle(d)
      .then(
        (o) => record(o),
        // handle() does not throw (plugins' throws are outcomes); if it did, the claim stays until its lease ends.
        (e) => {
          held.delete(d.id);
          deps.log.error({ err: e, delivery: d.id }, 'delivery attempt failed unexpectedly');
        },
      )
      .finally(() => {
        inflight--;
        if (limit) {
          limit.inflight--;
          mayBeDue = true; // its rows were not claimed while it was full
        }
        settled();
        pump();
      });
  };

  // ---- Claims: as lanes free up, while rows may be due. ----
  /** Rows may be due: set by notifications, the poll, full claims and a limited plugin's free lane; cleared by a claim that found fewer rows than it asked for. */
  let mayBeDue = true;
  let claiming = false;
  /** One claim round: each limited plugin up to its free lanes, then the other plugins up to the worker's free lanes. */
  const claimRound = async (free: number): Promise<boolean> => {
    let full = false;
    for (const [name, l] of limits) {
      const want = Math.min(l.max - l.inflight, free);
      if (want <= 0) continue;
      const rows = await claimWith(claimer.exec, worker, want, leaseMs, { only: name }, held);
      if (rows.length === want) full = true;
      free -= rows.length;
      for (const d of rows) start(d);
    }
    const want = Math.min(free, batch);
    if (want > 0) {
      const rows = await claimWith(claimer.exec, worker, want, leaseMs, { except: limitedNames }, held);
      if (rows.length === want) full = true;
      for (const d of rows) start(d);
    }
    return full;
  };
  const pump = () => {
    if (claiming || stopped || !mayBeDue) return;
    const free = concurrency - inflight;
    // Lanes are busy, or outcomes are piling up faster than they are recorded: wait for them.
    if (free <= 0 || (inflight > 0 && free < refillAt) || recorders.batch.queue.length >= 2 * batch) return;
    claiming = true;
    mayBeDue = false; // a kick during the claim sets it again
    claimRound(free)
      .then(
        (full) => {
          if (full) mayBeDue = true;
        },
        (e) => deps.log.error({ err: e }, 'delivery claim failed; the poll tries again'),
      )
      .finally(() => {
        claiming = false;
        settled();
        pump();
      });
  };
  const kick = () => {
    mayBeDue = true;
    pump();
  };

  // ---- Idle waiters (runOnce, stop). ----
  let idleWaiters: (() => void)[] = [];
  const isIdle = () =>
    !claiming && inflight === 0 && recorders.batch.queue.length === 0 && !recorders.batch.busy && recorders.late.queue.length === 0 && !recorders.late.busy;
  function settled() {
    if (!isIdle() || idleWaiters.length === 0) return;
    const ws = idleWaiters;
    idleWaiters = [];
    for (const w of ws) w();
  }
  const idle = (): Promise<void> => (isIdle() ? Promise.resolve() : new Promise((resolve) => idleWaiters.push(resolve)));

  let sweeping = false;
  const sweep = async (): Promise<number> => {
    if (sweeping || stopped) return 0;
    sweeping = true;
    try {
      return await sweepFallbacks(deps);
    } catch (e) {
      deps.log.error({ err: e }, 'delivery fallback sweep failed');
      return 0;
    } finally {
      sweeping = false;
    }
  };

  const runOnce = async (): Promise<number> => {
    const before = handled;
    for (;;) {
      kick();
      await idle();
      if (stopped || !mayBeDue) break;
    }
    return handled - before + (await sweep());
  };

  const unlisten = await listen(deps, DELIVERIES_CHANNEL, kick, kick);
  // Open the worker's connections now, not on the first claim or late outcome.
  try {
    await Promise.all([claimer.open(), recorder.open(), late.open()]);
  } catch (e) {
    await Promise.all([unlisten(), claimer.end(), recorder.end(), late.end()]).catch(() => {});
    throw e;
  }
  const timer = setInterval(() => {
    kick();
    void sweep();
  }, opts.pollMs ?? 1000);
  kick();
  deps.log.info({ worker, plugins: [...plugins.keys()], disabled: Object.fromEntries(disabled), batch, concurrency }, 'delivery worker started');
  return {
    name: worker,
    disabled,
    runOnce,
    stop: async () => {
      stopped = true;
      clearInterval(timer);
      await unlisten();
      await idle();
      while (sweeping) await new Promise((r) => setTimeout(r, 10));
      await Promise.all([claimer.end(), recorder.end(), late.end()]);
    },
  };
}
