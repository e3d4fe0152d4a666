import { randomBytes } from 'node:crypto';
import pg from 'pg';
import { sql } from 'kysely';
import type { Deps } from '../context.ts';
import { DELIVERIES_CHANNEL } from '../mail/outbound/enqueue.ts';
import { smtpPlugin } from '../mail/outbound/smtp-plugin.ts';
import { type Delivery, type DeliveryPlugin, type SendResult, retryDelayMs } from './plugin.ts';

/** How long a claimed delivery stays locked; a worker killed mid-attempt frees it after this. */
export const CLAIM_LEASE_MS = 120_000;
/** Longest a single plugin attempt may take before it counts as a retryable failure. */
export const ATTEMPT_TIMEOUT_MS = 60_000;

export interface DeliveryWorker {
  /** Runs one claim-and-send round now; resolves with the number of deliveries attempted. */
  runOnce(): Promise<number>;
  stop(): Promise<void>;
}

/** The built-in plugins by name. */
export function builtinPlugins(): Map<string, DeliveryPlugin> {
  return new Map([[smtpPlugin.name, smtpPlugin]]);
}

/**
 * Claims due deliveries with `FOR UPDATE SKIP LOCKED`, so many workers on one PostgreSQL
 * never attempt the same delivery at once; a claim is a lease (`locked_until`), so a
 * worker killed mid-attempt loses nothing: the row is claimed again when the lease ends.
 */
export async function claimDue(deps: Deps, worker: string, limit: number): Promise<Delivery[]> {
  const r = await sql<Delivery>`
    update deliveries d
       set state = 'sending', locked_by = ${worker},
           locked_until = now() + ${`${CLAIM_LEASE_MS} milliseconds`}::interval,
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

/** Records an attempt and moves the delivery to its next state. */
export async function recordOutcome(deps: Deps, d: Delivery, result: SendResult, worker: string, durationMs: number): Promise<void> {
  const now = deps.clock.now();
  await deps.db.kysely.transaction().execute(async (tx) => {
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
    if (result.outcome === 'accepted') {
      await tx
        .updateTable('deliveries')
        .set({ state: 'sent', provider_ref: result.providerRef ?? null, last_error: null, locked_by: null, locked_until: null, updated_at: new Date(now) })
        .where('id', '=', d.id)
        .execute();
      return;
    }
    const expired = d.expires_at !== null && new Date(d.expires_at).getTime() <= now;
    if (result.outcome === 'failed' || expired) {
      const error = result.outcome === 'retry' ? `gave up after ${d.attempts} attempts: ${result.error}` : result.error;
      await tx
        .updateTable('deliveries')
        .set({ state: 'failed', last_error: error.slice(0, 2000), locked_by: null, locked_until: null, updated_at: new Date(now) })
        .where('id', '=', d.id)
        .execute();
      return;
    }
    const delay = result.retryAfterMs ?? retryDelayMs(d.attempts);
    await tx
      .updateTable('deliveries')
      .set({
        state: 'pending',
        last_error: result.error.slice(0, 2000),
        next_attempt_at: new Date(now + delay),
        locked_by: null,
        locked_until: null,
        updated_at: new Date(now),
      })
      .where('id', '=', d.id)
      .execute();
  });
}

async function attempt(deps: Deps, plugin: DeliveryPlugin | undefined, d: Delivery): Promise<SendResult> {
  if (!plugin) return { outcome: 'failed', error: `unknown plugin ${d.plugin}` };
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      plugin.send(d, deps),
      new Promise<SendResult>((resolve) => {
        timer = setTimeout(() => resolve({ outcome: 'retry', error: `attempt timed out after ${ATTEMPT_TIMEOUT_MS} ms` }), ATTEMPT_TIMEOUT_MS);
      }),
    ]);
  } catch (e) {
    return { outcome: 'retry', error: (e as Error).message ?? String(e) };
  } finally {
    clearTimeout(timer);
  }
}

/**
 * The worker role: waits for `parley_deliveries` notifications (and polls every
 * `pollMs` as a safety net and for scheduled retries), claims due deliveries in batches
 * and attempts them through their plugin, `concurrency` at a time.
 */
export async function startDeliveryWorker(
  deps: Deps,
  opts: { plugins?: Map<string, DeliveryPlugin>; batch?: number; concurrency?: number; pollMs?: number } = {},
): Promise<DeliveryWorker> {
  const plugins = opts.plugins ?? builtinPlugins();
  for (const p of plugins.values()) {
    try {
      await p.validate?.(deps);
    } catch (e) {
      deps.log.error({ plugin: p.name, err: e }, 'delivery plugin disabled: validation failed');
      plugins.delete(p.name);
    }
  }
  const worker = `w-${process.pid}-${randomBytes(3).toString('hex')}`;
  const batch = opts.batch ?? 50;
  const concurrency = opts.concurrency ?? 8;
  let stopped = false;
  let running: Promise<void> | null = null;
  let again = false;

  const runOnce = async (): Promise<number> => {
    let total = 0;
    while (!stopped) {
      const due = await claimDue(deps, worker, batch);
      total += due.length;
      let i = 0;
      const lanes = Array.from({ length: Math.min(concurrency, due.length) }, async () => {
        while (i < due.length) {
          const d = due[i++];
          const t0 = performance.now();
          const result = await attempt(deps, plugins.get(d.plugin), d);
          await recordOutcome(deps, d, result, worker, performance.now() - t0);
          if (result.outcome !== 'accepted') deps.log.warn({ delivery: d.id, plugin: d.plugin, to: d.destination, result }, 'delivery attempt not accepted');
        }
      });
      await Promise.all(lanes);
      if (due.length < batch) break;
    }
    return total;
  };
  const kick = () => {
    if (stopped) return;
    if (running) {
      again = true;
      return;
    }
    running = (async () => {
      do {
        again = false;
        try {
          await runOnce();
        } catch (e) {
          deps.log.error({ err: e }, 'delivery round failed');
        }
      } while (again && !stopped);
    })().finally(() => {
      running = null;
    });
  };

  const listener = new pg.Client({ connectionString: (deps.db.pool as any).options.connectionString });
  listener.on('notification', kick);
  listener.on('error', (err) => deps.log.warn({ err }, 'delivery listener lost; polling continues'));
  await listener.connect();
  await listener.query(`LISTEN ${DELIVERIES_CHANNEL}`);
  const timer = setInterval(kick, opts.pollMs ?? 1000);
  kick();
  return {
    runOnce,
    stop: async () => {
      stopped = true;
      clearInterval(timer);
      await listener.end().catch(() => {});
      await running;
    },
  };
}
