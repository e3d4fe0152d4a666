import { randomBytes } from 'node:crypto';
import pg from 'pg';
import { sql, type Updateable } from 'kysely';
import type { Deps } from '../context.ts';
import { coalescingRunner } from '../platform/coalesce.ts';
import { DELIVERIES_CHANNEL } from '../mail/outbound/enqueue.ts';
import type { DeliveriesTable } from '../store/schema.ts';
import { applyEarlyReceipts } from './inbound.ts';
import { orgConfigCache } from './org-config.ts';
import { type Delivery, type DeliveryPlugin, type RetryPolicy, type SendResult, retryDelayMs, retryPolicyFor } from './plugin.ts';
import { knownPlugins } from './registry.ts';
import { type FallbackPolicy, fallbackDeadline, moveOnChange, recordFallback, wakeWorkers } from './state.ts';

export { builtinPlugins } from './registry.ts';

/** Options of a delivery worker. Defaults suit production; tests shorten the timings. */
export interface WorkerOptions {
  /** The plugins this worker may use (default: every plugin known to the process). */
  plugins?: Map<string, DeliveryPlugin>;
  /** Rows claimed per round (default 50). */
  batch?: number;
  /** Attempts in flight at once (default 8). */
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
  /** Runs one claim-and-send round (and the fallback sweep) now; resolves with the number of rows handled. */
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
  const r = await sql<Delivery>`
    update deliveries d
       set state = 'sending', locked_by = ${worker},
           locked_until = now() + ${`${leaseMs} milliseconds`}::interval,
           attempts = d.attempts + 1, updated_at = now()
     where d.id in (
       select id from deliveries
        where state in ('pending', 'sending') and next_attempt_at <= now()
          and (locked_until is null or locked_until < now())
        order by next_attempt_at
        limit ${limit}
        for update skip locked)
    returning d.*`.execute(deps.db.kysely);
  return r.rows;
}

/**
 * Records an attempt (issue 4 §3: time, plugin, outcome, error, provider ref, worker) and
 * moves the delivery to its next state — but only if this claim still holds the row
 * (`state = 'sending'`, `locked_by` and `attempts` as claimed): a lease that expired and was
 * claimed again, or a row cancelled meanwhile, is never overwritten (the attempt is still
 * recorded). Outcomes:
 * - accepted → `sent` (or `delivered`), `sent_at`, provider ref, the fallback window;
 * - retry → `pending` after the plugin's backoff, until its policy's attempts or age run out;
 * - failed, or retries run out → the next chain step (`pending`, attempts reset, that step's
 *   idempotency key), or `failed` after the last step;
 * - the row's `expires_at` passed → `failed`, no fallback.
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
  const now = new Date(deps.clock.now());
  const policy = opts.policy ?? retryPolicyFor(d.plugin);
  let applied = false;
  await deps.db.kysely.transaction().execute(async (tx) => {
    // An outcome lost in a database crash is harmless: the row is claimed again when its lease
    // ends and attempted with the same idempotency key. So don't wait for the WAL flush.
    await sql`set local synchronous_commit = off`.execute(tx);
    await tx
      .insertInto('delivery_attempts')
      .values({
        delivery_id: d.id,
        plugin: d.plugin,
        outcome: result.outcome,
        error: result.outcome === 'accepted' ? null : result.error.slice(0, 2000),
        provider_ref: result.outcome === 'accepted' ? (result.providerRef ?? null) : null,
        duration_ms: Math.round(durationMs),
        worker,
      })
      .execute();
    let set: Updateable<DeliveriesTable>;
    let moved: { reason: string; to: ReturnType<typeof moveOnChange>['to'] } | null = null;
    const expired = d.expires_at !== null && new Date(d.expires_at).getTime() <= now.getTime();
    if (result.outcome === 'accepted') {
      const delivered = result.delivered === true;
      set = {
        state: delivered ? 'delivered' : 'sent',
        provider_ref: result.providerRef ?? null,
        last_error: null,
        sent_at: now,
        delivered_at: delivered ? now : null,
        fallback_at: fallbackDeadline(d, opts.plugin?.capabilities, now, delivered),
      };
    } else if (expired) {
      set = { state: 'failed', last_error: `expired before it could be sent (${d.plugin}: ${result.error})`.slice(0, 2000), fallback_at: null };
    } else {
      const stepStart = new Date(d.step_started_at ?? d.created_at).getTime();
      const exhausted = d.attempts >= policy.maxAttempts ? `${d.attempts} attempts` : now.getTime() - stepStart >= policy.maxAgeS * 1000 ? `${policy.maxAgeS} s` : null;
      if (result.outcome === 'retry' && !exhausted) {
        set = { state: 'pending', last_error: result.error.slice(0, 2000), next_attempt_at: new Date(now.getTime() + (result.retryAfterMs ?? retryDelayMs(d.attempts, Math.random, policy))) };
      } else {
        const reason = result.outcome === 'retry' ? `${d.plugin}: gave up after ${exhausted}: ${result.error}` : `${d.plugin}: ${result.error}`;
        const change = moveOnChange(d, reason, now);
        set = change.set;
        moved = { reason, to: change.to };
      }
    }
    const r = await tx
      .updateTable('deliveries')
      .set({ ...set, locked_by: null, locked_until: null, updated_at: now })
      .where('id', '=', d.id)
      .where('state', '=', 'sending')
      .where('locked_by', '=', d.locked_by)
      .where('attempts', '=', d.attempts)
      .returningAll()
      .executeTakeFirst();
    if (!r) {
      deps.log.warn({ delivery: d.id, worker, outcome: result.outcome }, 'delivery claim lost (lease expired and re-claimed, or cancelled): outcome recorded as an attempt only');
      return;
    }
    applied = true;
    let wake = moved !== null && moved.to !== null;
    if (moved) await recordFallback(tx, d, moved.to, moved.reason);
    if (result.outcome === 'accepted' && (await applyEarlyReceipts(tx, r as Delivery, opts.plugin, now))) wake = true;
    if (wake) await wakeWorkers(tx);
  });
  return applied;
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

async function attempt(deps: Deps, plugin: DeliveryPlugin, d: Delivery, config: Record<string, unknown>, timeoutMs: number): Promise<SendResult> {
  const ac = new AbortController();
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      plugin.send(d, deps, { config, signal: ac.signal, timeoutMs, orgId: d.org_id }),
      new Promise<SendResult>((resolve) => {
        timer = setTimeout(() => {
          ac.abort();
          resolve({ outcome: 'retry', error: `attempt timed out after ${timeoutMs} ms` });
        }, timeoutMs);
      }),
    ]);
  } catch (e) {
    return { outcome: 'retry', error: `${d.plugin} plugin threw: ${(e as Error).message ?? String(e)}` };
  } finally {
    clearTimeout(timer);
  }
}

/**
 * The worker role (issue 4 §4): validates the plugins, then waits for `parley_deliveries`
 * notifications (and polls every `pollMs` as a safety net, for scheduled retries and fallback
 * windows), claims due deliveries in batches and attempts them through their plugin,
 * `concurrency` at a time. Rows for an unknown or disabled plugin, or for an organisation whose
 * config of the plugin is invalid, move on down their chain with the reason.
 */
export async function startDeliveryWorker(deps: Deps, opts: WorkerOptions = {}): Promise<DeliveryWorker> {
  const plugins = opts.plugins ?? knownPlugins();
  const disabled = await validatePlugins(deps, plugins);
  const worker = opts.name ?? `w-${process.pid}-${randomBytes(3).toString('hex')}`;
  const batch = opts.batch ?? 50;
  const concurrency = opts.concurrency ?? 8;
  const leaseMs = opts.leaseMs ?? deps.config.deliveryLeaseMs;
  const orgConfig = orgConfigCache(deps);
  const configChecked = new WeakMap<object, string | null>();
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

  const handle = async (d: Delivery) => {
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
      else result = await attempt(deps, plugin, d, config, Math.max(100, Math.min(policy.attemptTimeoutMs, Math.floor(leaseMs * 0.8))));
    }
    await recordOutcome(deps, d, result, worker, performance.now() - t0, { plugin, policy });
    if (result.outcome !== 'accepted') deps.log.warn({ delivery: d.id, plugin: d.plugin, to: d.destination, result }, 'delivery attempt not accepted');
  };

  const runOnce = async (): Promise<number> => {
    let total = 0;
    while (!stopped) {
      const due = await claimDue(deps, worker, batch, leaseMs);
      total += due.length;
      let i = 0;
      const lanes = Array.from({ length: Math.min(concurrency, due.length) }, async () => {
        while (i < due.length) {
          const d = due[i++];
          try {
            await handle(d);
          } catch (e) {
            // The claim stays until its lease ends; the row is attempted again then.
            deps.log.error({ err: e, delivery: d.id }, 'delivery attempt could not be recorded');
          }
        }
      });
      await Promise.all(lanes);
      if (due.length < batch) break;
    }
    if (!stopped) total += await sweepFallbacks(deps);
    return total;
  };
  const runner = coalescingRunner(runOnce, (e) => deps.log.error({ err: e }, 'delivery round failed'));
  const kick = runner.kick;

  const listener = new pg.Client({ connectionString: (deps.db.pool as any).options.connectionString });
  listener.on('notification', kick);
  listener.on('error', (err) => deps.log.warn({ err }, 'delivery listener lost; polling continues'));
  await listener.connect();
  await listener.query(`LISTEN ${DELIVERIES_CHANNEL}`);
  const timer = setInterval(kick, opts.pollMs ?? 1000);
  kick();
  deps.log.info({ worker, plugins: [...plugins.keys()], disabled: Object.fromEntries(disabled) }, 'delivery worker started');
  return {
    name: worker,
    disabled,
    runOnce,
    stop: async () => {
      stopped = true;
      clearInterval(timer);
      await listener.end().catch(() => {});
      await runner.stop();
    },
  };
}
