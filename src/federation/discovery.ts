/**
 * Discovery (issue 3 §1): which Parley platform, if any, serves a mail domain.
 * docs/federation.md, "Discovery", is the spec. In order:
 *
 * 1. the static route table of the configuration (`federationRoutes`,
 *    PARLEY_FEDERATION_ROUTES) — private deployments and tests; never cached, never expires;
 * 2. a DNS TXT record at `_parley.<domain>`: `v=parley1; url=https://parley.example.com`;
 * 3. `GET https://<domain>/.well-known/parley/platform` → `{"platform", "url", "keys_url"}`.
 *
 * Answers from 2 and 3 are cached in memory, per process: a platform for
 * {@link POSITIVE_TTL_MS}, "no platform" for {@link NEGATIVE_TTL_MS}. When no step finds a
 * platform and some step failed only temporarily (DNS timeout, 5xx, network error), the
 * answer is not "no platform" but a {@link DiscoveryUnavailable} error, remembered for
 * {@link TEMPORARY_TTL_MS}: the caller retries later rather than falling back to email.
 */
import { promises as dns } from 'node:dns';
import type { MailResolver } from '../mail/dns.ts';

/** How long a found platform is reused, in ms. */
export const POSITIVE_TTL_MS = 15 * 60 * 1000;
/** How long "this domain has no platform" is reused, in ms. */
export const NEGATIVE_TTL_MS = 5 * 60 * 1000;
/** How long a temporary failure is reused before trying again, in ms. */
export const TEMPORARY_TTL_MS = 30 * 1000;
/** Longest wait for the well-known document, in ms. */
export const WELL_KNOWN_TIMEOUT_MS = 3000;
/** Largest well-known document read, in bytes. */
const MAX_DOCUMENT_BYTES = 16 * 1024;
/** Most cached domains per process; the oldest are evicted first. */
const MAX_CACHE_ENTRIES = 10_000;

/** Where a domain's platform is. */
export interface PlatformRef {
  /** The mail domain asked about (lowercase). */
  domain: string;
  /** The platform's base URL, no trailing slash: federation paths are appended to it. */
  url: string;
  /** How it was found. */
  via: 'static' | 'dns' | 'well-known';
  /** The platform's name (primary domain), when the well-known document said it. */
  platform?: string;
}

/** Discovery failed only temporarily; the domain may well have a platform. */
export class DiscoveryUnavailable extends Error {
  constructor(
    readonly domain: string,
    readonly reasons: string[],
  ) {
    super(`cannot tell whether ${domain} has a Parley platform now: ${reasons.join('; ')}`);
    this.name = 'DiscoveryUnavailable';
  }
}

/** Options of {@link createDiscovery}. */
export interface DiscoveryOptions {
  /** The static route table, read at each lookup (domain → base URL). */
  routes: () => Record<string, string>;
  /** DNS TXT lookups, `dns.promises.resolve` contract (src/mail/dns.ts); null skips DNS. */
  resolver: MailResolver | null;
  /** Whether step 3 runs (false when the platform works offline). Default true. */
  wellKnown?: boolean;
  /** URL of the well-known document of a domain; default `https://<domain>/.well-known/parley/platform`. */
  wellKnownUrl?: (domain: string) => string;
  /** The fetch to use; default the global one. */
  fetch?: typeof fetch;
  /** Clock for the cache, ms since the epoch. Default Date.now. */
  now?: () => number;
  positiveTtlMs?: number;
  negativeTtlMs?: number;
  temporaryTtlMs?: number;
  timeoutMs?: number;
}

/** A domain → platform lookup with its cache. */
export interface Discovery {
  /**
   * The platform serving `domain`, or null when it has none (its users are plain email
   * participants). @throws DiscoveryUnavailable when that cannot be told now
   */
  discover(domain: string): Promise<PlatformRef | null>;
  /** Forgets cached answers (all, or one domain's). */
  forget(domain?: string): void;
}

type Outcome = { ref: PlatformRef | null } | { temporary: string[] };

const trimUrl = (u: string) => u.replace(/\/+$/, '');

/** Is `u` an absolute http(s) URL without credentials, query or fragment? */
export function isPlatformUrl(u: unknown): u is string {
  if (typeof u !== 'string') return false;
  try {
    const p = new URL(u);
    return (p.protocol === 'https:' || p.protocol === 'http:') && !p.username && !p.password && !p.search && !p.hash;
  } catch {
    return false;
  }
}

/**
 * Parses a `_parley` TXT record: `v=parley1; url=<base URL>` (fields separated by `;`,
 * optional spaces, `v=parley1` first). @returns the URL, or null if the record is not one of ours
 */
export function parseTxtRecord(txt: string): string | null {
  const fields = txt.split(';').map((f) => f.trim()).filter(Boolean);
  if (fields[0]?.toLowerCase() !== 'v=parley1') return null;
  for (const f of fields.slice(1)) {
    const eq = f.indexOf('=');
    if (eq > 0 && f.slice(0, eq).trim().toLowerCase() === 'url') {
      const url = f.slice(eq + 1).trim();
      return isPlatformUrl(url) ? trimUrl(url) : null;
    }
  }
  return null;
}

/** Creates a discovery with its own cache (one per platform process: federation/runtime.ts). */
export function createDiscovery(opts: DiscoveryOptions): Discovery {
  const now = opts.now ?? Date.now;
  const doFetch = opts.fetch ?? fetch;
  const timeoutMs = opts.timeoutMs ?? WELL_KNOWN_TIMEOUT_MS;
  const wellKnownUrl = opts.wellKnownUrl ?? ((d: string) => `https://${d}/.well-known/parley/platform`);
  const ttl = {
    positive: opts.positiveTtlMs ?? POSITIVE_TTL_MS,
    negative: opts.negativeTtlMs ?? NEGATIVE_TTL_MS,
    temporary: opts.temporaryTtlMs ?? TEMPORARY_TTL_MS,
  };
  const cache = new Map<string, { expires: number; outcome: Promise<Outcome> }>();

  async function viaDns(domain: string): Promise<Outcome> {
    if (!opts.resolver) return { ref: null };
    try {
      const records = (await opts.resolver(`_parley.${domain}`, 'TXT')) as string[][];
      for (const chunks of records) {
        const url = parseTxtRecord(chunks.join(''));
        if (url) return { ref: { domain, url, via: 'dns' } };
      }
      return { ref: null };
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code ?? '';
      if (code === dns.NOTFOUND || code === dns.NODATA) return { ref: null };
      return { temporary: [`DNS TXT _parley.${domain}: ${code || (e as Error).message}`] };
    }
  }

  async function viaWellKnown(domain: string): Promise<Outcome> {
    if (opts.wellKnown === false) return { ref: null };
    const url = wellKnownUrl(domain);
    let res: Response;
    try {
      res = await doFetch(url, { headers: { accept: 'application/json' }, redirect: 'follow', signal: AbortSignal.timeout(timeoutMs) });
    } catch (e) {
      const cause = (e as { cause?: { code?: string } }).cause?.code ?? (e as Error).name;
      // A domain that does not resolve or refuses connections has no platform; anything else may pass.
      if (cause === 'ENOTFOUND' || cause === 'ECONNREFUSED') return { ref: null };
      return { temporary: [`GET ${url}: ${cause}`] };
    }
    if (res.status >= 500 || res.status === 429) {
      await res.body?.cancel();
      return { temporary: [`GET ${url}: HTTP ${res.status}`] };
    }
    if (res.status !== 200) {
      await res.body?.cancel();
      return { ref: null };
    }
    let doc: any;
    try {
      const text = await res.text();
      if (text.length > MAX_DOCUMENT_BYTES) return { ref: null };
      doc = JSON.parse(text);
    } catch {
      return { ref: null };
    }
    if (!doc || typeof doc !== 'object' || !isPlatformUrl(doc.url)) return { ref: null };
    return {
      ref: { domain, url: trimUrl(doc.url), via: 'well-known', ...(typeof doc.platform === 'string' ? { platform: doc.platform.toLowerCase() } : {}) },
    };
  }

  async function lookup(domain: string): Promise<Outcome> {
    const d = await viaDns(domain);
    if ('ref' in d && d.ref) return d;
    const w = await viaWellKnown(domain);
    if ('ref' in w && w.ref) return w;
    const temporary = [...('temporary' in d ? d.temporary : []), ...('temporary' in w ? w.temporary : [])];
    return temporary.length > 0 ? { temporary } : { ref: null };
  }

  return {
    async discover(raw: string): Promise<PlatformRef | null> {
      const domain = raw.trim().toLowerCase().replace(/\.$/, '');
      const routes = opts.routes();
      const route = routes[domain];
      if (route) return { domain, url: trimUrl(route), via: 'static' };
      const t = now();
      let entry = cache.get(domain);
      if (!entry || entry.expires <= t) {
        const outcome = lookup(domain);
        entry = { expires: t + ttl.temporary, outcome };
        cache.delete(domain);
        cache.set(domain, entry);
        if (cache.size > MAX_CACHE_ENTRIES) cache.delete(cache.keys().next().value!);
        const e = entry;
        void outcome.then((o) => {
          e.expires = now() + ('temporary' in o ? ttl.temporary : o.ref ? ttl.positive : ttl.negative);
        });
      }
      const o = await entry.outcome;
      if ('temporary' in o) throw new DiscoveryUnavailable(domain, o.temporary);
      return o.ref;
    },
    forget(domain?: string) {
      if (domain === undefined) cache.clear();
      else cache.delete(domain.toLowerCase());
    },
  };
}
