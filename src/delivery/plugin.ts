import type { Selectable } from 'kysely';
import type { Deps } from '../context.ts';
import type { DeliveriesTable } from '../store/schema.ts';

/** A delivery row as workers and plugins see it (the transactional outbox, ARCHITECTURE.md "Deliveries"). */
export type Delivery = Selectable<DeliveriesTable>;

/**
 * The outcome of one attempt:
 * - `accepted`: the counterpart took it (state → sent), with its reference if any;
 * - `retry`: a transient failure, try again later (after `retryAfterMs` if given);
 * - `failed`: a permanent failure (state → failed, or the next plugin of a servicechain).
 */
export type SendResult =
  | { outcome: 'accepted'; providerRef?: string | null }
  | { outcome: 'retry'; error: string; retryAfterMs?: number }
  | { outcome: 'failed'; error: string };

/**
 * A delivery channel (PRODUCT.md §4; Voluble seed 002 "Plugins"). Workers call `send`
 * naively; the plugin must be idempotent per `delivery.idempotency_key`, since an attempt
 * whose outcome was lost (worker killed) is attempted again.
 */
export interface DeliveryPlugin {
  name: string;
  /** Checks the plugin's configuration at start-up; throws with a reason when unusable. */
  validate?(deps: Deps): Promise<void>;
  send(delivery: Delivery, deps: Deps): Promise<SendResult>;
}

/**
 * Retry delay after the n-th failed attempt (n ≥ 1), in ms: exponential from 1 s, doubling,
 * capped at 1 hour, with ±20 % jitter — the RFC 5321 §4.5.4.1 spirit of retrying for days
 * (the give-up time is the row's `expires_at`, PARLEY_DELIVERY_MAX_AGE_HOURS).
 */
export function retryDelayMs(attempts: number, random = Math.random): number {
  const base = Math.min(1000 * 2 ** Math.max(0, attempts - 1), 3_600_000);
  return Math.round(base * (0.8 + 0.4 * random()));
}
