/**
 * The DNS resolver used for SPF (RFC 7208), DKIM (RFC 6376) and DMARC (RFC 7489) checks:
 * short timeouts so a slow name server cannot stall inbound mail, and a small cache.
 */
import { promises as dns } from 'node:dns';

/**
 * A DNS lookup with the contract of `dns.promises.resolve(name, rrtype)`, which is what
 * mailauth's `resolver` option expects: TXT records resolve to `string[][]` (the chunks of
 * each record), A/AAAA/NS/CNAME/PTR to `string[]`, MX to `{ exchange, priority }[]`.
 * Failures reject with an Error whose `code` is a `node:dns` error code: `ENOTFOUND` (no
 * such domain) and `ENODATA` (no record of that type) are definitive answers; anything
 * else (`ETIMEOUT`, `ESERVFAIL`, `ECONNREFUSED`…) is a temporary error.
 */
export type MailResolver = (name: string, rrtype: string) => Promise<any>;

/** Options of {@link createResolver}. */
export interface ResolverOptions {
  /** Longest wait for one lookup, in milliseconds; it then fails with `ETIMEOUT`. Default 1500. */
  timeoutMs?: number;
  /** Name server addresses (`'192.0.2.53'`, `'[2001:db8::53]:5353'`); default: the system's. */
  servers?: string[];
  /** How long answers (including ENOTFOUND/ENODATA) are reused, in milliseconds; 0 disables the cache. Default 60000. */
  cacheTtlMs?: number;
}

const DEFAULT_TIMEOUT_MS = 1500;
const DEFAULT_CACHE_TTL_MS = 60_000;
/** Most cached answers kept; the oldest are evicted first. */
const MAX_CACHE_ENTRIES = 1000;
/** Answers that are facts about the domain, cached like records (RFC 2308 negative caching). */
const DEFINITIVE_ERRORS = new Set<string>([dns.NOTFOUND, dns.NODATA]);

/**
 * An Error shaped like the ones `node:dns` rejects with. It is an answer (no such record, no
 * answer in time), not a fault of this code, so it carries no stack trace: capturing one was
 * ≈ 90 µs per received message on the project machine with the offline resolver (several
 * lookups each; docs/benchmarks.md, session 10).
 */
function dnsError(code: string, syscall: string, name: string): NodeJS.ErrnoException {
  const limit = Error.stackTraceLimit;
  Error.stackTraceLimit = 0;
  try {
    return Object.assign(new Error(`${syscall} ${code} ${name}`), { code, syscall, hostname: name });
  } finally {
    Error.stackTraceLimit = limit;
  }
}

/**
 * Creates a {@link MailResolver} over `node:dns` with one try per lookup, a hard deadline
 * of `timeoutMs` per lookup, and a TTL cache shared by concurrent identical lookups.
 * Names are compared case-insensitively (RFC 4343).
 *
 * @throws Error when `servers` holds an invalid address (from `Resolver.setServers`)
 */
export function createResolver(opts: ResolverOptions = {}): MailResolver {
  const timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  const cacheTtlMs = opts.cacheTtlMs ?? DEFAULT_CACHE_TTL_MS;
  const resolver = new dns.Resolver({ timeout: timeoutMs, tries: 1 });
  if (opts.servers) resolver.setServers(opts.servers);
  const cache = new Map<string, { expires: number; answer: Promise<unknown> }>();

  const lookup = (name: string, rrtype: string): Promise<unknown> => {
    let timer: NodeJS.Timeout | undefined;
    const deadline = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(dnsError(dns.TIMEOUT, `query${rrtype}`, name)), timeoutMs);
    });
    return Promise.race([resolver.resolve(name, rrtype), deadline]).finally(() => clearTimeout(timer));
  };

  return (name: string, rrtype: string) => {
    const key = `${rrtype.toUpperCase()} ${name.toLowerCase()}`;
    const now = Date.now();
    const cached = cache.get(key);
    if (cached && cached.expires > now) return cached.answer;
    const answer = lookup(name, rrtype);
    if (cacheTtlMs > 0) {
      cache.delete(key);
      cache.set(key, { expires: now + cacheTtlMs, answer });
      if (cache.size > MAX_CACHE_ENTRIES) cache.delete(cache.keys().next().value!);
      answer.catch((err: NodeJS.ErrnoException) => {
        if (!DEFINITIVE_ERRORS.has(err.code ?? '') && cache.get(key)?.answer === answer) cache.delete(key);
      });
    }
    return answer;
  };
}

/**
 * A {@link MailResolver} for tests and machines without DNS: every lookup fails at once
 * with `ENOTFOUND`, so SPF, DKIM and DMARC evaluate to none/neutral without waiting.
 */
export const offlineResolver: MailResolver = (name: string, rrtype: string) => Promise.reject(dnsError(dns.NOTFOUND, `query${rrtype}`, name));
