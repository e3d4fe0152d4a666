/**
 * The sending side of signed federation requests: finds a domain's platform (discovery),
 * signs the request with this platform's active key (the Parley profile of RFC 9421) and
 * sends it. docs/federation.md says what a sender does with each answer.
 */
import http from 'node:http';
import https from 'node:https';
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

/** The answer of {@link signedRequest}: its status and its whole body as text (UTF-8). */
export interface SignedAnswer {
  status: number;
  text: string;
}

/**
 * How long an idle kept-alive connection to a peer stays open, ms: below the 72 s Parley's
 * server keeps one (src/http/early.ts), so the client lets go first; a server that announces
 * a shorter `Keep-Alive: timeout=` is honoured by node's agent.
 */
const IDLE_SOCKET_MS = 30_000;
/** Connections to one peer at most (pushes, proposals, backfill pages, each one request at a time). */
const MAX_SOCKETS_PER_PEER = 16;
// noDelay: a request goes out at once, not held back by Nagle's algorithm behind an unacknowledged segment (as undici's fetch does).
const agentOptions = { keepAlive: true, timeout: IDLE_SOCKET_MS, maxSockets: MAX_SOCKETS_PER_PEER, scheduling: 'lifo' as const, noDelay: true };
const agents = { http: new http.Agent(agentOptions), https: new https.Agent(agentOptions) };

/** Error codes of a request sent on a kept-alive connection the peer had meanwhile closed. */
const STALE_SOCKET_ERRORS = new Set(['ECONNRESET', 'EPIPE', 'ECONNABORTED']);

/** One attempt of {@link signedRequest}; a connection error carries `reusedSocket` (sent on a kept-alive connection). */
function requestOnce(url: URL, method: string, headers: Record<string, string>, body: Buffer | undefined, timeoutMs: number): Promise<SignedAnswer> {
  return new Promise((resolve, reject) => {
    const mod = url.protocol === 'https:' ? https : http;
    const req = mod.request(url, { method, headers, agent: url.protocol === 'https:' ? agents.https : agents.http });
    let timedOut: Error | null = null;
    const timer = setTimeout(() => {
      timedOut = Object.assign(new Error(`no complete answer within ${timeoutMs} ms`), { name: 'TimeoutError' });
      req.destroy(timedOut);
    }, timeoutMs);
    req.once('error', (e) => {
      clearTimeout(timer);
      reject(Object.assign(e, { reusedSocket: req.reusedSocket }));
    });
    req.once('response', (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.once('error', (e) => {
        clearTimeout(timer);
        reject(e);
      });
      res.once('end', () => {
        clearTimeout(timer);
        resolve({ status: res.statusCode ?? 0, text: (chunks.length === 1 ? chunks[0] : Buffer.concat(chunks)).toString('utf8') });
      });
      // Closed before the end of the body (the peer went away, or the timeout destroyed the
      // request): a failure, whether or not an 'error' came with it (a settled promise ignores the rest).
      res.once('close', () => {
        clearTimeout(timer);
        if (!res.complete) reject(timedOut ?? new Error('the connection closed before the whole answer arrived'));
      });
    });
    req.end(body);
  });
}

/**
 * {@link signedFetch} for callers that read only the status and the body as text (pushes,
 * proposals, backfill and log pages): the same signed request over node:http with kept-alive
 * connections per peer, at about a third of fetch's CPU per request (≈ 0.5 M instructions
 * against ≈ 1.8 M for a 10 kB push here) and without its per-request Request/Response and
 * stream objects. `timeoutMs` bounds the whole exchange, body included. A request that fails
 * because the peer had closed the idle connection it was sent on is signed again (new
 * `created` and `nonce`) and sent once more on a new connection — only for requests a peer
 * may receive twice (pushes, proposals and reads are idempotent: docs/federation.md).
 * @returns the status and the body (any status: the caller decides; see docs/federation.md)
 * @throws an Error on network failure or timeout (name `TimeoutError`)
 */
export async function signedRequest(deps: Deps, url: string, init: SignedFetchInit = {}): Promise<SignedAnswer> {
  const method = (init.method ?? (init.json !== undefined || init.body !== undefined ? 'POST' : 'GET')).toUpperCase();
  const body = init.json !== undefined ? Buffer.from(JSON.stringify(init.json), 'utf8') : init.body === undefined ? undefined : Buffer.from(init.body);
  const target = new URL(url);
  for (let attempt = 0; ; attempt++) {
    const key = await requestSigningKey(deps);
    const sig = signRequest({ method, url, body: body ?? '', keyId: key.keyId, privateKey: key.privateKey, now: deps.clock.now() });
    const headers: Record<string, string> = { ...init.headers, ...sig, 'content-length': String(body?.length ?? 0) };
    if (init.json !== undefined) headers['content-type'] = 'application/json';
    try {
      return await requestOnce(target, method, headers, body, init.timeoutMs ?? REQUEST_TIMEOUT_MS);
    } catch (e) {
      const err = e as NodeJS.ErrnoException & { reusedSocket?: boolean };
      if (attempt === 0 && err.reusedSocket && STALE_SOCKET_ERRORS.has(err.code ?? '')) continue;
      throw e;
    }
  }
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
