import { Agent as HttpAgent, request as httpRequest, type IncomingHttpHeaders } from 'node:http';
import { Agent as HttpsAgent, request as httpsRequest } from 'node:https';

/** The answer to {@link postOnce}: status, headers (lower-cased names) and at most `maxBytes` of the body as UTF-8. */
export interface HttpAnswer {
  status: number;
  headers: IncomingHttpHeaders;
  text: string;
  /** False when the body was cut short: too long, the connection dropped, or `signal` aborted while it was read. */
  complete: boolean;
}

/**
 * Keep-alive agents shared by the delivery plugins (one per scheme; node keeps a socket pool per
 * origin inside each). A worker posting to one provider reuses its connections instead of
 * opening one per attempt; `fetch` (undici) did the same but cost ~0.5 ms of CPU per request
 * (docs/benchmarks.md, "Delivery engine").
 */
const agents = {
  http: new HttpAgent({ keepAlive: true, keepAliveMsecs: 15_000, maxSockets: 256, maxFreeSockets: 64, scheduling: 'lifo' }),
  https: new HttpsAgent({ keepAlive: true, keepAliveMsecs: 15_000, maxSockets: 256, maxFreeSockets: 64, scheduling: 'lifo' }),
};

/** Largest response body read before the connection is dropped (the rest is of no interest), in bytes. */
const MAX_READ_BYTES = 1024 * 1024;

/** Parsed request targets by URL (a worker posts to few URLs, many times). */
const targets = new Map<string, { https: boolean; hostname: string; port: string; path: string } | string>();

function target(url: string): { https: boolean; hostname: string; port: string; path: string } | string {
  let t = targets.get(url);
  if (t !== undefined) return t;
  try {
    const u = new URL(url);
    if (u.protocol !== 'http:' && u.protocol !== 'https:') t = `not an http(s) URL: ${url.slice(0, 200)}`;
    else if (u.username || u.password) t = `credentials in the URL are not supported: ${u.origin}`;
    else t = { https: u.protocol === 'https:', hostname: u.hostname.replace(/^\[|\]$/g, ''), port: u.port, path: `${u.pathname}${u.search}` };
  } catch {
    t = `invalid URL ${url.slice(0, 200)}`;
  }
  if (targets.size >= 1000) targets.clear();
  targets.set(url, t);
  return t;
}

/** Network errors of a kept-alive connection the counterpart closed meanwhile (a request on it was not answered). */
const STALE_SOCKET = new Set(['ECONNRESET', 'EPIPE', 'ECONNABORTED']);

/**
 * One HTTP POST over the shared keep-alive agents: no redirects are followed (a 3xx is
 * returned as it is), the answer's body is read (up to MAX_READ_BYTES; `maxBytes` of it kept).
 * `signal` aborts the request (and destroys its connection). A request that fails on a reused
 * connection before any answer (the counterpart closed it while it was idle: ECONNRESET,
 * EPIPE) is sent again on another connection, twice at most — the usual keep-alive race, not
 * a failure of the counterpart; the requests carry idempotency keys.
 * @throws Error on a network error, an invalid URL, or when `signal` aborts (the caller checks `signal.aborted`)
 */
export async function postOnce(url: string, headers: Record<string, string>, body: string, signal: AbortSignal, maxBytes = 64 * 1024): Promise<HttpAnswer> {
  const t = target(url);
  if (typeof t === 'string') throw new Error(t);
  headers['content-length'] = String(Buffer.byteLength(body));
  for (let tries = 1; ; tries++) {
    try {
      return await postOn(t, headers, body, signal, maxBytes);
    } catch (e) {
      const err = e as NodeJS.ErrnoException & { reusedSocket?: boolean };
      if (!err.reusedSocket || !STALE_SOCKET.has(err.code ?? '') || signal.aborted || tries >= 3) throw e;
    }
  }
}

function postOn(t: { https: boolean; hostname: string; port: string; path: string }, headers: Record<string, string>, body: string, signal: AbortSignal, maxBytes: number): Promise<HttpAnswer> {
  return new Promise<HttpAnswer>((resolve, reject) => {
    if (signal.aborted) return reject(new Error('aborted'));
    const req = (t.https ? httpsRequest : httpRequest)({
      method: 'POST',
      hostname: t.hostname,
      port: t.port,
      path: t.path,
      agent: t.https ? agents.https : agents.http,
      headers,
    });
    const onAbort = () => req.destroy(new Error('aborted'));
    signal.addEventListener('abort', onAbort, { once: true });
    req.on('error', (e) => {
      signal.removeEventListener('abort', onAbort);
      reject(Object.assign(e, { reusedSocket: req.reusedSocket }));
    });
    req.on('response', (res) => {
      let text = '';
      let read = 0;
      let settled = false;
      res.setEncoding('utf8');
      res.on('data', (c: string) => {
        read += c.length;
        if (text.length < maxBytes) text += c;
        if (read > MAX_READ_BYTES) res.destroy();
      });
      // 'close' also follows a body cut short (too long, dropped, aborted): the caller decides what the status is worth.
      const finish = () => {
        if (settled) return;
        settled = true;
        signal.removeEventListener('abort', onAbort);
        resolve({ status: res.statusCode ?? 0, headers: res.headers, text: text.length > maxBytes ? text.slice(0, maxBytes) : text, complete: res.complete });
      };
      res.on('end', finish);
      res.on('close', finish);
      res.on('error', () => {});
    });
    // A string body goes out with the headers in one write.
    req.end(body, 'utf8');
  });
}

/** Why a request failed, for `last_error`: the system error code and message (ECONNREFUSED …). */
export function networkError(e: unknown): string {
  const err = e as NodeJS.ErrnoException;
  return err?.message ?? String(e);
}
