/**
 * Other platforms' public keys (issue 3 §1): found through discovery, fetched from
 * `<platform url>/.well-known/parley/keys`, checked (the document must name the platform
 * the keyid names; every key well-formed) and cached in memory per process.
 * docs/federation.md, "Key publication and rotation".
 */
import { type Discovery, DiscoveryUnavailable } from './discovery.ts';
import { type KeyResolver, type ResolvedKey, parseKeyId } from './http-signatures.ts';
import { resolvedKey } from './keys.ts';

/** How long a fetched keys document is reused, in ms. */
export const KEYS_TTL_MS = 10 * 60 * 1000;
/** A keyid missing from a cached document triggers a new fetch at most this often per platform, in ms. */
export const KEYS_REFETCH_MS = 30 * 1000;
/** Longest wait for a keys document, in ms. */
export const KEYS_TIMEOUT_MS = 3000;
/** Largest keys document read, in bytes. */
const MAX_KEYS_BYTES = 256 * 1024;

/** Options of {@link createRemoteKeyResolver}. */
export interface RemoteKeyOptions {
  discovery: Discovery;
  fetch?: typeof fetch;
  /** Clock, ms since the epoch. Default Date.now. */
  now?: () => number;
  ttlMs?: number;
  refetchMs?: number;
  timeoutMs?: number;
}

/**
 * Parses and checks a keys document for `platform`.
 * @returns the keys by keyid, or null when the document is not a valid one for that platform
 */
export function parseKeysDocument(platform: string, doc: unknown): Map<string, ResolvedKey> | null {
  const d = doc as { platform?: unknown; keys?: unknown };
  if (!d || typeof d !== 'object' || d.platform !== platform || !Array.isArray(d.keys)) return null;
  const out = new Map<string, ResolvedKey>();
  for (const k of d.keys as Record<string, unknown>[]) {
    if (!k || typeof k !== 'object' || k.alg !== 'ed25519' || typeof k.key_id !== 'string' || typeof k.public_key !== 'string') continue;
    const id = parseKeyId(k.key_id);
    const createdAt = Date.parse(String(k.created_at));
    const notAfter = Date.parse(String(k.not_after));
    if (!id || id.platform !== platform || Number.isNaN(createdAt) || Number.isNaN(notAfter)) continue;
    try {
      out.set(k.key_id, resolvedKey(k.key_id, platform, k.public_key, createdAt, notAfter));
    } catch {
      /* not a 32-byte Ed25519 key: ignored */
    }
  }
  return out;
}

/** A {@link KeyResolver} for other platforms' keys, with a per-process cache. */
export function createRemoteKeyResolver(opts: RemoteKeyOptions): KeyResolver {
  const now = opts.now ?? Date.now;
  const doFetch = opts.fetch ?? fetch;
  const ttl = opts.ttlMs ?? KEYS_TTL_MS;
  const refetch = opts.refetchMs ?? KEYS_REFETCH_MS;
  const timeoutMs = opts.timeoutMs ?? KEYS_TIMEOUT_MS;
  const cache = new Map<string, { at: number; keys: Promise<Map<string, ResolvedKey>> }>();

  async function load(platform: string): Promise<Map<string, ResolvedKey>> {
    let ref;
    try {
      ref = await opts.discovery.discover(platform);
    } catch (e) {
      if (e instanceof DiscoveryUnavailable) return new Map();
      throw e;
    }
    if (!ref) return new Map();
    try {
      const res = await doFetch(`${ref.url}/.well-known/parley/keys`, { headers: { accept: 'application/json' }, signal: AbortSignal.timeout(timeoutMs) });
      if (res.status !== 200) {
        await res.body?.cancel();
        return new Map();
      }
      const text = await res.text();
      if (text.length > MAX_KEYS_BYTES) return new Map();
      return parseKeysDocument(platform, JSON.parse(text)) ?? new Map();
    } catch {
      return new Map();
    }
  }

  return async (keyId) => {
    const k = parseKeyId(keyId);
    if (!k) return null;
    const t = now();
    let entry = cache.get(k.platform);
    if (entry) {
      const keys = await entry.keys;
      const hit = keys.get(keyId);
      if (hit && t - entry.at < ttl) return hit;
      if (!hit && t - entry.at < refetch) return null;
      if (cache.get(k.platform) !== entry) return (await cache.get(k.platform)!.keys).get(keyId) ?? null;
    }
    entry = { at: t, keys: load(k.platform) };
    cache.set(k.platform, entry);
    return (await entry.keys).get(keyId) ?? null;
  };
}
