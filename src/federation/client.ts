/**
 * The sending side of signed federation requests: finds a domain's platform (discovery),
 * signs the request with this platform's active key (the Parley profile of RFC 9421) and
 * sends it. docs/federation.md says what a sender does with each answer.
 */
import type { Deps } from '../context.ts';
import { signRequest } from './http-signatures.ts';
import { requestSigningKey } from './keys.ts';
import { federationOf } from './runtime.ts';

/** Longest wait for a federation request, in ms, unless the caller says otherwise. */
export const REQUEST_TIMEOUT_MS = 10_000;

/** Options of {@link signedFetch}. */
export interface SignedFetchInit {
  method?: string;
  /** A JSON value (sent as application/json), raw bytes, or nothing. */
  json?: unknown;
  body?: Uint8Array | string;
  headers?: Record<string, string>;
  timeoutMs?: number;
}

/**
 * Sends a request signed by this platform to an absolute URL, with its active key (read at
 * most every few seconds: keys.ts requestSigningKey).
 * @returns the fetch Response (any status: the caller decides; see docs/federation.md)
 * @throws the fetch error on network failure or timeout
 */
export async function signedFetch(deps: Deps, url: string, init: SignedFetchInit = {}): Promise<Response> {
  const method = (init.method ?? (init.json !== undefined || init.body !== undefined ? 'POST' : 'GET')).toUpperCase();
  const body = init.json !== undefined ? Buffer.from(JSON.stringify(init.json), 'utf8') : init.body === undefined ? undefined : Buffer.from(init.body);
  const key = await requestSigningKey(deps);
  const sig = signRequest({ method, url, body: body ?? '', keyId: key.keyId, privateKey: key.privateKey, now: deps.clock.now() });
  const headers: Record<string, string> = { ...init.headers, ...sig };
  if (init.json !== undefined) headers['content-type'] = 'application/json';
  return fetch(url, { method, headers, body, signal: AbortSignal.timeout(init.timeoutMs ?? REQUEST_TIMEOUT_MS) });
}

/**
 * Sends a signed request to the platform of `domain` at `path` (e.g. `/federation/v1/ping`).
 * @returns the Response, or null when the domain has no Parley platform
 * @throws DiscoveryUnavailable when discovery fails temporarily; fetch errors on network failure
 */
export async function federationRequest(deps: Deps, domain: string, path: string, init: SignedFetchInit = {}): Promise<Response | null> {
  const ref = await federationOf(deps).discovery.discover(domain);
  if (!ref) return null;
  return signedFetch(deps, ref.url + path, init);
}
