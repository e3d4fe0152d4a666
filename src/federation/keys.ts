/**
 * Platform identity (issue 3 §1): the platform's Ed25519 signing keys, stored in
 * PostgreSQL (`platform_keys`, migration 020), generated at first start, rotated on demand
 * (`parley federation rotate-key`) or when the active key nears its expiry, and published
 * at `GET /.well-known/parley/keys`. docs/federation.md, "Platform identity", is the spec.
 *
 * A key's id is the first 16 hex digits of SHA-256 of its raw 32-byte public key; on the
 * wire it is qualified by the platform's name (its primary domain): `alpha.example#3f9a…`.
 */
import { createHash, createPrivateKey, generateKeyPairSync, type KeyObject } from 'node:crypto';
import { sql } from 'kysely';
import { type Deps, primaryDomain } from '../context.ts';
import { isoTime } from '../platform/clock.ts';
import type { Queryable } from '../store/db.ts';
import { isUniqueViolation } from '../store/db.ts';
import { type KeyResolver, type ResolvedKey, parseKeyId, publicKeyFromRaw, rawPublicKey } from './http-signatures.ts';

/** How long a new key stays valid for verification, in ms (one year). */
export const KEY_LIFETIME_MS = 365 * 24 * 3600 * 1000;
/** An active key closer than this to its not_after is replaced at the next signature, in ms (30 days). */
export const KEY_RENEW_BEFORE_MS = 30 * 24 * 3600 * 1000;
/** Advisory lock serialising key creation and rotation across processes. */
const KEY_LOCK = 7_072_616;

/** A key of this platform as stored and published (without the private key). */
export interface PlatformKey {
  /** The short id (16 hex digits). */
  id: string;
  /** `<platform>#<id>`. */
  keyId: string;
  /** Raw 32-byte public key, base64url without padding. */
  publicKey: string;
  createdAt: Date;
  notAfter: Date;
  retiredAt: Date | null;
}

/** The key this platform signs with now. */
export interface SigningKey {
  id: string;
  /** `<platform>#<id>`: the `keyid` of request signatures and the prefix of action `sig`s. */
  keyId: string;
  privateKey: KeyObject;
  createdAt: Date;
  notAfter: Date;
}

/** Parsed private keys by key id (ids derive from the key, so one cache serves every platform in the process). */
const privateKeys = new Map<string, KeyObject>();
const publicKeys = new Map<string, KeyObject>();

/** The short id of a public key: the first 16 hex digits of SHA-256 of its raw 32 bytes. */
export function keyIdOf(publicKeyB64url: string): string {
  return createHash('sha256').update(Buffer.from(publicKeyB64url, 'base64url')).digest('hex').slice(0, 16);
}

type KeyRow = {
  key_id: string;
  public_key: string;
  private_key: string;
  created_at: Date;
  not_after: Date;
  retired_at: Date | null;
};

function toPublic(deps: Pick<Deps, 'config'>, r: Omit<KeyRow, 'private_key'>): PlatformKey {
  return {
    id: r.key_id,
    keyId: `${primaryDomain(deps)}#${r.key_id}`,
    publicKey: r.public_key,
    createdAt: new Date(r.created_at),
    notAfter: new Date(r.not_after),
    retiredAt: r.retired_at ? new Date(r.retired_at) : null,
  };
}

function toSigning(deps: Pick<Deps, 'config'>, r: KeyRow): SigningKey {
  let pk = privateKeys.get(r.key_id);
  if (!pk) {
    pk = createPrivateKey(r.private_key);
    privateKeys.set(r.key_id, pk);
  }
  return { id: r.key_id, keyId: `${primaryDomain(deps)}#${r.key_id}`, privateKey: pk, createdAt: new Date(r.created_at), notAfter: new Date(r.not_after) };
}

/** A fresh Ed25519 key pair as a `platform_keys` row, created at `nowMs`. */
function newKeyRow(nowMs: number): KeyRow {
  const { publicKey, privateKey } = generateKeyPairSync('ed25519');
  const pub = rawPublicKey(publicKey);
  return {
    key_id: keyIdOf(pub),
    public_key: pub,
    private_key: privateKey.export({ format: 'pem', type: 'pkcs8' }).toString(),
    created_at: new Date(nowMs),
    not_after: new Date(nowMs + KEY_LIFETIME_MS),
    retired_at: null,
  };
}

const activeRow = (q: Queryable) =>
  q.selectFrom('platform_keys').selectAll().where('retired_at', 'is', null).executeTakeFirst() as Promise<KeyRow | undefined>;

/**
 * Makes sure the platform has an active key that is not about to expire: creates the first
 * key at first start, or rotates one within {@link KEY_RENEW_BEFORE_MS} of its not_after.
 * Safe from several processes at once (advisory lock).
 * @returns the active signing key
 */
export async function ensureSigningKey(deps: Deps): Promise<SigningKey> {
  const now = deps.clock.now();
  const existing = await activeRow(deps.db.kysely);
  if (existing && new Date(existing.not_after).getTime() - now > KEY_RENEW_BEFORE_MS) return toSigning(deps, existing);
  return deps.db.kysely.transaction().execute(async (tx) => {
    await sql`select pg_advisory_xact_lock(${KEY_LOCK})`.execute(tx);
    const cur = await activeRow(tx);
    if (cur && new Date(cur.not_after).getTime() - now > KEY_RENEW_BEFORE_MS) return toSigning(deps, cur);
    if (cur) await tx.updateTable('platform_keys').set({ retired_at: new Date(now) }).where('key_id', '=', cur.key_id).execute();
    const row = newKeyRow(now);
    await tx.insertInto('platform_keys').values(row).execute();
    deps.log.info({ key_id: row.key_id, replaces: cur?.key_id ?? null }, 'federation signing key created');
    return toSigning(deps, row);
  });
}

/** The last active key this process read, by the database handle it came from. */
const cachedKeys = new WeakMap<object, { row: KeyRow; key: SigningKey }>();
/** Active key ids read earlier in a transaction (noteActiveKeyId), by transaction. */
const activeKeyHints = new WeakMap<object, string>();

/**
 * Records that `q` (a transaction) read `keyId` as the active key id: a later
 * {@link activeSigningKey} in it then signs with the cached key of that id, if any,
 * without reading `platform_keys` again. Read in the statement that locks the conversation
 * (apply-actions.ts lockConversationsForActors), it is as current as a read of its own.
 */
export function noteActiveKeyId(q: Queryable, keyId: string): void {
  activeKeyHints.set(q, keyId);
}

/**
 * The active signing key, read inside `q` (the caller's transaction, so a rotation that
 * committed is seen at once) — or taken from this process's cache when `q` already read the
 * active key id ({@link noteActiveKeyId}) and it is the cached one — created or renewed
 * first if needed.
 */
export async function activeSigningKey(deps: Deps, q: Queryable = deps.db.kysely): Promise<SigningKey> {
  const now = deps.clock.now();
  const cached = cachedKeys.get(deps.db);
  const hint = activeKeyHints.get(q);
  if (cached && hint === cached.row.key_id && new Date(cached.row.not_after).getTime() - now > KEY_RENEW_BEFORE_MS) return cached.key;
  const row = await activeRow(q);
  if (row && new Date(row.not_after).getTime() - now > KEY_RENEW_BEFORE_MS) {
    const key = cached?.row.key_id === row.key_id ? cached.key : toSigning(deps, row);
    cachedKeys.set(deps.db, { row, key });
    return key;
  }
  return ensureSigningKey(deps);
}

/** How long a process signs requests with the active key it read last before reading it again, ms. */
export const REQUEST_KEY_TTL_MS = 5000;
/** The key requests were last signed with, by database handle, and when it was read. */
const requestKeys = new WeakMap<object, { key: SigningKey; at: number }>();

/**
 * The key to sign a federation request with (federation/client.ts signedFetch): the active
 * key ({@link activeSigningKey}), read at most every {@link REQUEST_KEY_TTL_MS} — not once per
 * request, a round trip on the path of every push and backfill page. After a rotation a
 * running process may sign requests with the retired key for that long; it stays valid for
 * verification (docs/federation.md, "Key publication and rotation"). Actions are signed with
 * the key read in their own transaction, as before.
 */
export async function requestSigningKey(deps: Deps): Promise<SigningKey> {
  const now = deps.clock.now();
  const cached = requestKeys.get(deps.db);
  if (cached && now - cached.at >= 0 && now - cached.at < REQUEST_KEY_TTL_MS && cached.key.notAfter.getTime() - now > KEY_RENEW_BEFORE_MS) return cached.key;
  const key = await activeSigningKey(deps);
  requestKeys.set(deps.db, { key, at: now });
  return key;
}

/** Options of {@link rotateKey}. */
export interface RotateOptions {
  /**
   * Shorten the old key's validity to now + this many ms (0 for a compromised key); by
   * default it stays valid for verification until its stated not_after.
   */
  oldValidForMs?: number;
}

/**
 * Replaces the active key by a new one (`parley federation rotate-key`). The old key is
 * retired (signs nothing more) and stays valid for verification until its not_after,
 * unless `oldValidForMs` shortens that. Atomic and serialised across processes.
 * @returns the new active key and the retired one (null at first use)
 */
export async function rotateKey(deps: Deps, opts: RotateOptions = {}): Promise<{ active: PlatformKey; retired: PlatformKey | null }> {
  const now = deps.clock.now();
  if (opts.oldValidForMs !== undefined && !(opts.oldValidForMs >= 0)) throw new RangeError('oldValidForMs must be ≥ 0');
  for (;;) {
    try {
      return await deps.db.kysely.transaction().execute(async (tx) => {
        await sql`select pg_advisory_xact_lock(${KEY_LOCK})`.execute(tx);
        const cur = await activeRow(tx);
        let retired: PlatformKey | null = null;
        if (cur) {
          const notAfter =
            opts.oldValidForMs === undefined
              ? new Date(cur.not_after)
              : new Date(Math.min(new Date(cur.not_after).getTime(), now + opts.oldValidForMs));
          const r = await tx
            .updateTable('platform_keys')
            .set({ retired_at: new Date(now), not_after: notAfter })
            .where('key_id', '=', cur.key_id)
            .returningAll()
            .executeTakeFirstOrThrow();
          retired = toPublic(deps, r);
        }
        const row = newKeyRow(now);
        await tx.insertInto('platform_keys').values(row).execute();
        deps.log.info({ key_id: row.key_id, retired: cur?.key_id ?? null }, 'federation signing key rotated');
        return { active: toPublic(deps, row), retired };
      });
    } catch (e) {
      // Two generated keys with the same 64-bit id are astronomically unlikely; retry anyway.
      if (isUniqueViolation(e, 'platform_keys_pkey')) continue;
      throw e;
    }
  }
}

/** Every key of the platform, newest first (retired and expired ones included). */
export async function listKeys(deps: Deps): Promise<PlatformKey[]> {
  const rows = await deps.db.kysely
    .selectFrom('platform_keys')
    .select(['key_id', 'public_key', 'created_at', 'not_after', 'retired_at'])
    .orderBy('created_at', 'desc')
    .orderBy('key_id')
    .execute();
  return rows.map((r) => toPublic(deps, r));
}

/** One entry of the keys document. */
export interface PublishedKey {
  key_id: string;
  alg: 'ed25519';
  /** Raw 32-byte public key, base64url without padding. */
  public_key: string;
  created_at: string;
  not_after: string;
  /** True for the one key that signs now. */
  active: boolean;
}

/**
 * The discovery document served at `GET /.well-known/parley/platform` (docs/federation.md,
 * "Discovery"): `{platform, url, keys_url}` — the platform's name (its primary domain), its
 * base URL without a trailing slash, and the URL of its keys document.
 */
export function platformDocument(deps: Deps): { platform: string; url: string; keys_url: string } {
  const url = deps.config.baseUrl.replace(/\/+$/, '');
  return { platform: primaryDomain(deps), url, keys_url: `${url}/.well-known/parley/keys` };
}

/**
 * The document served at `GET /.well-known/parley/keys`: the platform's name and every key
 * it ever had, so that old action signatures stay verifiable (docs/federation.md).
 */
export async function keysDocument(deps: Deps): Promise<{ platform: string; keys: PublishedKey[] }> {
  await ensureSigningKey(deps);
  const keys = await listKeys(deps);
  return {
    platform: primaryDomain(deps),
    keys: keys.map((k) => ({
      key_id: k.keyId,
      alg: 'ed25519',
      public_key: k.publicKey,
      created_at: isoTime(k.createdAt.getTime()),
      not_after: isoTime(k.notAfter.getTime()),
      active: k.retiredAt === null,
    })),
  };
}

/** A verification key from its published parts (caches the parsed public key). */
export function resolvedKey(keyId: string, platform: string, publicKey: string, createdAt: number, notAfter: number): ResolvedKey {
  let pk = publicKeys.get(publicKey);
  if (!pk) {
    pk = publicKeyFromRaw(publicKey);
    publicKeys.set(publicKey, pk);
  }
  return { keyId, platform, publicKey: pk, createdAt, notAfter };
}

/** Resolves this platform's own keys from the database (no HTTP); null for other platforms' keyids. */
export function localKeyResolver(deps: Deps): KeyResolver {
  return async (keyId) => {
    const k = parseKeyId(keyId);
    if (!k || k.platform !== primaryDomain(deps)) return null;
    const r = await deps.db.kysely
      .selectFrom('platform_keys')
      .select(['key_id', 'public_key', 'created_at', 'not_after'])
      .where('key_id', '=', k.id)
      .executeTakeFirst();
    if (!r) return null;
    return resolvedKey(keyId, k.platform, r.public_key, new Date(r.created_at).getTime(), new Date(r.not_after).getTime());
  };
}
