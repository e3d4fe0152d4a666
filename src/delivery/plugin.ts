import type { Selectable } from 'kysely';
import type { TSchema } from '@sinclair/typebox';
import { Value } from '@sinclair/typebox/value';
import type { Deps } from '../context.ts';
import type { DeliveriesTable } from '../store/schema.ts';

/** A delivery row as workers and plugins see it (the transactional outbox, ARCHITECTURE.md "Deliveries"). */
export type Delivery = Selectable<DeliveriesTable>;

/**
 * The outcome of one attempt (issue 4 §1):
 * - `accepted`: the counterpart took it (state → `sent`), with its reference if any
 *   (`providerRef`, matched later against delivery receipts). `delivered: true` when the
 *   counterpart confirmed delivery synchronously (state → `delivered` at once, e.g. `parley`).
 * - `retry`: a transient failure, try again later (after `retryAfterMs` if the counterpart
 *   said so, else the plugin's backoff — see RETRY_POLICIES); when the retries run out the
 *   row moves on down its servicechain.
 * - `failed`: a permanent failure: the row moves on to the next plugin of its servicechain,
 *   or ends `failed` (a dead letter) after the last one.
 */
export type SendResult =
  | { outcome: 'accepted'; providerRef?: string | null; delivered?: boolean }
  | { outcome: 'retry'; error: string; retryAfterMs?: number }
  | { outcome: 'failed'; error: string };

/**
 * What a plugin can report back (issue 4 §1 "declared capabilities"):
 * - `receipts`: it reports delivery receipts (so "not delivered within N s" fallback applies);
 * - `read`: it reports read receipts ("not read within N s" fallback applies);
 * - `replies`: contacts can reply through it (inbound route);
 * - `dedupe`: how a repeated attempt is made harmless — `key`: the counterpart honours the
 *   `Idempotency-Key` (a repeat is seen once); `message-id`: a repeat may arrive twice but
 *   carries the same identity (an email's Message-ID), so clients fold it; `local`: nothing
 *   leaves the platform.
 */
export interface PluginCapabilities {
  receipts: boolean;
  read: boolean;
  replies: boolean;
  dedupe: 'key' | 'message-id' | 'local';
}

/** What one attempt is given besides the row: the organisation's config and a deadline. */
export interface SendContext {
  /** The organisation's config of this plugin (`organisations.plugin_config[name]`), `{}` when none. */
  config: Record<string, unknown>;
  /** Aborted when the attempt's time is up; pass it to network calls. */
  signal: AbortSignal;
  /** The attempt's time limit in ms (the same deadline as `signal`). */
  timeoutMs: number;
  /** The organisation's id, null for platform mail. */
  orgId: number | null;
}

/** A request to `POST /api/delivery/hooks/{plugin}`, as a plugin's inbound handler sees it. */
export interface InboundRequest {
  /** Lower-cased header names. */
  headers: Record<string, string | string[] | undefined>;
  /** Query-string parameters (first value of each). */
  query: Record<string, string>;
  /** The body exactly as received (signatures are computed over it). */
  rawBody: Buffer;
  /** The URL the request was made to, as the platform's public base URL + path and query. */
  publicUrl: string;
  /** The URL the request was made to, from its Host header (a second candidate for signatures). */
  requestUrl: string;
}

/** A delivery receipt or a reply reported by a plugin's inbound handler. */
export interface InboundEvent {
  kind: 'delivered' | 'read' | 'replied' | 'failed';
  /** Our delivery id, when the counterpart names it (webhook). */
  deliveryId?: number;
  /** The provider's reference of the message the event is about (SMS sid). */
  providerRef?: string;
  /** For a reply without a reference: the sender's address on this channel (a phone number). */
  from?: string;
  /** Reply text (`replied`). */
  text?: string;
  /** Why it failed (`failed`). */
  error?: string;
  /** Anything else worth keeping with the event (provider status, error code). */
  detail?: Record<string, unknown>;
}

/**
 * A plugin's inbound handler: authenticates the request (signature with the organisation's
 * secret) and turns it into events. Throws AppError 401 when the request is not signed
 * correctly and 400 when it is malformed — before anything is stored.
 */
export interface PluginInbound {
  handle(req: InboundRequest, deps: Deps): Promise<{ orgId: number; events: InboundEvent[] }>;
}

/**
 * A delivery channel (issue 4 §1, PRODUCT.md §4; Voluble seed 002 "Plugins"). Workers call
 * `send` naively; the plugin must be idempotent per `delivery.idempotency_key`, since an
 * attempt whose outcome was lost (worker killed) is attempted again with the same key.
 * Plugins never throw from `send`: every failure is a `SendResult` (a throw counts as `retry`).
 */
export interface DeliveryPlugin {
  /** Lower-case name used in servicechains: `[a-z][a-z0-9_-]*`. */
  readonly name: string;
  /** JSON schema of the per-organisation config, `organisations.plugin_config[name]`. */
  readonly configSchema: TSchema;
  /** Whether an organisation must configure the plugin before it can be used. */
  readonly needsConfig: boolean;
  readonly capabilities: PluginCapabilities;
  /**
   * Most attempts one worker may have in flight through this plugin (its counterpart, or its
   * connection pool, takes no more at once); default: IN_FLIGHT_LIMITS, else the worker's
   * concurrency. Attempts beyond it would queue inside the plugin while their time runs out.
   */
  readonly maxInFlight?: number;
  /**
   * Without `config`: checks the plugin's own prerequisites at start-up (a broken plugin is
   * disabled and reported; rows for it fail over to the next chain step). With `config`:
   * checks one organisation's config (schema and semantics).
   * @throws Error with the reason when unusable
   */
  validate(deps: Deps, config?: Record<string, unknown>): Promise<void>;
  /** Why `destination` cannot be used with this plugin (e.g. a phone number not in E.164), or null. */
  checkDestination(destination: string): string | null;
  /** One attempt. Must honour `ctx.signal` / `ctx.timeoutMs`. */
  send(delivery: Delivery, deps: Deps, ctx: SendContext): Promise<SendResult>;
  /** Receipts and replies posted to `POST /api/delivery/hooks/{name}`. */
  readonly inbound?: PluginInbound;
}

/**
 * The retry policy of one plugin (issue 4 §3; the table in docs/delivery.md): an attempt
 * that returns `retry` is tried again after `min(baseMs · 2^(n-1), capMs)` ±20 % jitter,
 * until `maxAttempts` attempts were made or the step is older than `maxAgeS`; then the row
 * moves on down its servicechain. `attemptTimeoutMs` bounds one attempt.
 */
export interface RetryPolicy {
  maxAttempts: number;
  maxAgeS: number;
  baseMs: number;
  capMs: number;
  attemptTimeoutMs: number;
}

/**
 * Retry policy per plugin (documented in docs/delivery.md, "Retry policy"). `smtp` is bounded
 * by age (PARLEY_DELIVERY_MAX_AGE_HOURS through the row's `expires_at`, and `maxAgeS` here) in
 * the RFC 5321 §4.5.4.1 spirit of retrying for days; `sms` gives up within the hour, since a
 * late text is worse than an email now. `default` applies to plugins not listed.
 */
export const RETRY_POLICIES: Readonly<Record<string, RetryPolicy>> = {
  smtp: { maxAttempts: 200, maxAgeS: 5 * 86_400, baseMs: 1_000, capMs: 3_600_000, attemptTimeoutMs: 60_000 },
  webhook: { maxAttempts: 8, maxAgeS: 86_400, baseMs: 1_000, capMs: 600_000, attemptTimeoutMs: 10_000 },
  sms: { maxAttempts: 5, maxAgeS: 3_600, baseMs: 2_000, capMs: 300_000, attemptTimeoutMs: 10_000 },
  parley: { maxAttempts: 10, maxAgeS: 86_400, baseMs: 1_000, capMs: 60_000, attemptTimeoutMs: 10_000 },
  default: { maxAttempts: 5, maxAgeS: 3_600, baseMs: 1_000, capMs: 300_000, attemptTimeoutMs: 30_000 },
};

/**
 * Most attempts one worker has in flight per plugin, for plugins that do not declare
 * `maxInFlight` (docs/delivery.md, "Workers"). `smtp`: the relay connection pool of
 * src/mail/outbound/smtp-plugin.ts has 4 connections; more attempts at once would wait in its
 * queue, time out there, and be attempted again (an email that the relay did take, twice).
 */
export const IN_FLIGHT_LIMITS: Readonly<Record<string, number>> = { smtp: 4 };

/** The most attempts of `plugin` one worker keeps in flight, or null when only the worker's concurrency bounds it. */
export function inFlightLimit(plugin: Pick<DeliveryPlugin, 'name' | 'maxInFlight'>): number | null {
  const n = plugin.maxInFlight ?? IN_FLIGHT_LIMITS[plugin.name];
  return n !== undefined && n > 0 ? Math.floor(n) : null;
}

/** The retry policy of `plugin`, with `overrides` (worker options, tests) applied. */
export function retryPolicyFor(plugin: string, overrides?: Readonly<Record<string, Partial<RetryPolicy>>>): RetryPolicy {
  return { ...(RETRY_POLICIES[plugin] ?? RETRY_POLICIES.default), ...(overrides?.default ?? {}), ...(overrides?.[plugin] ?? {}) };
}

/**
 * Retry delay after the n-th failed attempt (n ≥ 1), in ms: `baseMs` doubling per attempt,
 * capped at `capMs`, with ±20 % jitter. Defaults: from 1 s to 1 hour (the smtp policy).
 */
export function retryDelayMs(attempts: number, random = Math.random, policy: Pick<RetryPolicy, 'baseMs' | 'capMs'> = RETRY_POLICIES.smtp): number {
  const base = Math.min(policy.baseMs * 2 ** Math.max(0, Math.min(attempts - 1, 40)), policy.capMs);
  return Math.round(base * (0.8 + 0.4 * random()));
}

/** Plugin names: lower-case letters, digits, `_` and `-`, starting with a letter (no `:` — it separates step keys). */
export const PLUGIN_NAME = /^[a-z][a-z0-9_-]{0,31}$/;

/**
 * The problems of `config` against `plugin.configSchema`, one line each (empty when valid).
 * Used by `validate(deps, config)` implementations and by the organisations API before it
 * stores `plugin_config`.
 */
export function configProblems(plugin: Pick<DeliveryPlugin, 'name' | 'configSchema'>, config: unknown): string[] {
  return [...Value.Errors(plugin.configSchema, config)].map((e) => `${plugin.name} config ${e.path || '/'}: ${e.message}`);
}

/** E.164 (ITU-T E.164): `+`, a non-zero digit, then up to 14 more digits. */
export const E164 = /^\+[1-9][0-9]{1,14}$/;

/**
 * The payload of an engine delivery (`deliveries.payload`, given to `enqueueDelivery`): what
 * the plugins render. Every field is optional; unknown fields are kept and ignored.
 * - `text`: the message as plain text (SMS body, webhook `text`, email body without a conversation);
 * - `subject`: email subject / webhook `subject`;
 * - `conversation_key`: set by the engine from `convId` when absent;
 * - `contact`: the contact as the organisation knows it (webhook `contact`);
 * - `message_id`, `full`: the email bridge's rendering (`smtp` renders the conversation's action
 *   `action_id` through src/mail/outbound/render.ts when the row has a conversation);
 * - `from`: sender address of an email without a conversation (default `parley@<primary domain>`).
 */
export interface MessagePayload {
  text?: string;
  subject?: string;
  conversation_key?: string;
  contact?: Record<string, unknown>;
  action_id?: number;
  message_id?: string;
  full?: boolean;
  from?: string;
  [k: string]: unknown;
}

/** Reads a string property of a config or payload object ('' when absent or not a string). */
export function str(o: Record<string, unknown> | null | undefined, k: string): string {
  const v = o?.[k];
  return typeof v === 'string' ? v : '';
}
