/**
 * Other platforms' public keys (issue 3 §1): found through discovery, fetched from
 * `<platform url>/.well-known/parley/keys`, checked (the document must name the platform
 * the keyid names; every key well-formed) and cached in memory per process. When a refetch
 * fails temporarily (network, timeout, 5xx), the keys known before stay in use.
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
/** Most platforms whose keys are cached per process; the oldest are evicted first. */
const MAX_PLATFORMS = 10_000;

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

  /** The platform's keys; null when they could not be fetched now (the caller keeps what it had). */
  async function load(platform: string): Promise<Map<string, ResolvedKey> | null> {
    let ref;
    try {
      ref = await opts.discovery.discover(platform);
    } catch (e) {
      if (e instanceof DiscoveryUnavailable) return null;
      throw e;
    }
    if (!ref) return new Map();
    try {
      const res = await doFetch(`${ref.url}/.well-known/parley/keys`, { headers: { accept: 'application/json' }, signal: AbortSignal.timeout(timeoutMs) });
      if (res.status !== 200) {
        await res.body?.cancel();
        return res.status >= 500 || res.status === 429 ? null : new Map();
      }
      const text = await res.text();
      if (text.length > MAX_KEYS_BYTES) return new Map();
      return parseKeysDocument(platform, JSON.parse(text)) ?? new Map();
    } catch {
      return null; // network error, timeout, or not JSON
    }
  }

  return async (keyId) => {
    const k = parseKeyId(keyId);
    if (!k) return null;
    const t = now();
    const entry = cache.get(k.platform);
    let previous: Map<string, ResolvedKey> | undefined;
    if (entry) {
      previous = await entry.keys;
      const hit = previous.get(keyId);
      if (hit && t - entry.at < ttl) return hit;
      if (!hit && t - entry.at < refetch) return null;
      const newer = cache.get(k.platform);
      if (newer !== entry) return (await newer!.keys).get(keyId) ?? null;
    }
    // A failed fetch keeps the keys known before (stale beats refusing every peer during an outage).
    const fresh = { at: t, keys: load(k.platform).then((m) => m ?? previous ?? new Map<string, ResolvedKey>()) };
    cache.delete(k.platform);
    cache.set(k.platform, fresh);
    if (cache.size > MAX_PLATFORMS) cache.delete(cache.keys().next().value!);
    return (await fresh.keys).get(keyId) ?? null;
  };
}
