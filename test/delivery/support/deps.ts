import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createHash, randomBytes } from 'node:crypto';
import type { Deps } from '../../../src/context.ts';
import { loadConfig, type Config } from '../../../src/platform/config.ts';
import { createLogger } from '../../../src/platform/logger.ts';
import { systemClock } from '../../../src/platform/clock.ts';
import { BlobStore } from '../../../src/platform/blobs.ts';
import { openDb } from '../../../src/store/db.ts';
import { migrate } from '../../../src/store/migrate.ts';
import { createUser } from '../../../src/accounts/users.ts';
import { enqueueDelivery, type EnqueueDeliveryInput } from '../../../src/delivery/engine.ts';
import type { Delivery } from '../../../src/delivery/plugin.ts';
import { createTestDatabase } from '../../support/db.ts';

/** Real dependencies on a fresh, migrated test database (no HTTP), and how to drop them. */
export async function testDeps(overrides: Partial<Config> = {}): Promise<{ deps: Deps; url: string; stop(): Promise<void> }> {
  const db = await createTestDatabase();
  const dataDir = mkdtempSync(join(tmpdir(), 'parley-delivery-'));
  const config = loadConfig({}, undefined, {
    domains: ['alpha.test'],
    databaseUrl: db.url,
    dataDir,
    dnsOffline: true,
    logLevel: (process.env.PARLEY_LOG_LEVEL as any) ?? 'silent',
    ...overrides,
  });
  const handle = openDb(db.url, 10);
  await migrate(handle.pool);
  const deps: Deps = { db: handle, config, log: createLogger('test', config.logLevel), clock: systemClock, blobs: new BlobStore(join(dataDir, 'blobs')) };
  return {
    deps,
    url: db.url,
    async stop() {
      await handle.close();
      await db.drop();
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

/** A second set of dependencies (its own pool) on the same database: another worker process's view. */
export function moreDeps(deps: Deps): Deps {
  const handle = openDb(deps.config.databaseUrl, 5);
  return { ...deps, db: handle };
}

/** Creates an organisation (with its own local address) whose plugins are configured as given. */
export async function createOrg(deps: Deps, slug: string, pluginConfig: Record<string, Record<string, unknown>>): Promise<number> {
  const u = await createUser(deps, { address: `${slug}@alpha.test` });
  const row = await deps.db.kysely
    .insertInto('organisations')
    .values({ slug, name: slug, user_id: u.id, plugin_config: JSON.stringify(pluginConfig) })
    .returning('id')
    .executeTakeFirstOrThrow();
  return row.id;
}

/** Creates an API token of the organisation with these scopes; returns its secret. */
export async function createApiToken(deps: Deps, orgId: number, scopes: string[]): Promise<string> {
  const secret = `pat_${randomBytes(24).toString('base64url')}`;
  await deps.db.kysely
    .insertInto('api_tokens')
    .values({ id: `tok_${randomBytes(6).toString('hex')}`, org_id: orgId, token_hash: createHash('sha256').update(secret).digest('hex'), scopes, created_by: null, last_used_at: null, revoked_at: null })
    .execute();
  return secret;
}

/** Enqueues one delivery in its own transaction. */
export async function enqueue(deps: Deps, input: EnqueueDeliveryInput): Promise<number | null> {
  return deps.db.kysely.transaction().execute((tx) => enqueueDelivery(tx, deps, input));
}

/** The delivery row `id`. */
export async function row(deps: Deps, id: number): Promise<Delivery> {
  return deps.db.kysely.selectFrom('deliveries').selectAll().where('id', '=', id).executeTakeFirstOrThrow();
}

/** Polls `fn` until it returns a truthy value; rejects with `what` after `timeoutMs`. */
export async function until<T>(what: string, fn: () => Promise<T | null | undefined | false>, timeoutMs = 15_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** Polls until delivery `id` satisfies `pred`; returns the row. */
export async function untilRow(deps: Deps, id: number, what: string, pred: (d: Delivery) => boolean, timeoutMs = 15_000): Promise<Delivery> {
  let last: Delivery | undefined;
  try {
    return await until(what, async () => {
      last = await row(deps, id);
      return pred(last) ? last : null;
    }, timeoutMs);
  } catch (e) {
    throw new Error(`${(e as Error).message}; delivery ${id} is ${JSON.stringify({ state: last?.state, plugin: last?.plugin, attempts: last?.attempts, last_error: last?.last_error })}`);
  }
}

/** Attempts of delivery `id`, oldest first. */
export async function attemptsOf(deps: Deps, id: number) {
  return deps.db.kysely.selectFrom('delivery_attempts').selectAll().where('delivery_id', '=', id).orderBy('id').execute();
}

/** Events of delivery `id`, oldest first. */
export async function eventsOf(deps: Deps, id: number) {
  return deps.db.kysely.selectFrom('delivery_events').selectAll().where('delivery_id', '=', id).orderBy('id').execute();
}
