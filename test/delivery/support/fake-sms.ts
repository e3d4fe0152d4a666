/**
 * A fake Twilio-like SMS gateway for tests: a real HTTP server on loopback speaking the
 * shape the `sms` plugin uses — `POST /Accounts/{account}/Messages.json`, form-encoded
 * To/From/Body/StatusCallback, HTTP Basic auth, JSON `{sid, status}` answers, error JSON
 * `{code, message, status}` — and which, like a careful provider, honours `Idempotency-Key`
 * (a repeated key that was accepted answers the same sid and sends nothing new).
 *
 * What it does is chosen per request: `mode` for all, or `decide(to)` per recipient:
 * accept, transient (503), permanent (400, an invalid number), hang (never answers), or
 * take-and-hang (records the message as sent, then never answers: a reply lost in flight).
 * Later it posts delivery receipts and replies to the StatusCallback URL, signed like Twilio
 * (X-Twilio-Signature: base64 HMAC-SHA1 of URL + sorted params with the auth token) —
 * computed here independently of Parley's code.
 */
import { createHmac, randomBytes } from 'node:crypto';
import { EventEmitter, once } from 'node:events';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';

export type SmsMode = 'accept' | 'transient' | 'permanent' | 'hang' | 'take-and-hang';

/** A message the gateway took (one per idempotency key). */
export interface SmsMessage {
  sid: string;
  to: string;
  from: string;
  body: string;
  key: string | null;
  statusCallback: string | null;
}

export interface FakeSms {
  /** The `base_url` to configure. */
  baseUrl: string;
  account: string;
  token: string;
  /** Messages taken, oldest first (a repeated idempotency key adds nothing). */
  readonly messages: SmsMessage[];
  /** Every POST to Messages.json per Idempotency-Key (repeats included). */
  readonly requestsByKey: Map<string, number>;
  /** Every POST to Messages.json, in order. */
  readonly requests: { to: string; key: string | null; mode: SmsMode }[];
  mode: SmsMode;
  /** Per-recipient behaviour; null/undefined → `mode`. */
  decide: ((to: string) => SmsMode | null | undefined) | null;
  /** Resolves once `pred()` holds (checked after every request); rejects after `timeoutMs`. */
  waitFor(what: string, pred: () => boolean, timeoutMs?: number): Promise<void>;
  /** Posts a status callback (e.g. `delivered`, `undelivered`) for message `sid`; `sign: false` sends a bad signature. */
  postStatus(sid: string, status: string, opts?: { errorCode?: string; sign?: boolean }): Promise<{ status: number; body: string }>;
  /** Posts an incoming message (a reply) from `from` to the callback URL of message `sid`'s organisation. */
  postReply(sid: string, from: string, body: string): Promise<{ status: number; body: string }>;
  close(): Promise<void>;
}

/** Twilio's request signature: base64 HMAC-SHA1(token, url + concat(sorted name+value)). */
function sign(token: string, url: string, params: URLSearchParams): string {
  const names = [...new Set(params.keys())].sort();
  let data = url;
  for (const n of names) for (const v of params.getAll(n)) data += n + v;
  return createHmac('sha1', token).update(data, 'utf8').digest('base64');
}

async function readBody(req: IncomingMessage): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const c of req) chunks.push(c as Buffer);
  return Buffer.concat(chunks).toString('utf8');
}

export async function startFakeSms(opts: { account?: string; token?: string } = {}): Promise<FakeSms> {
  const account = opts.account ?? 'AC_test';
  const token = opts.token ?? 'test-token-0123456789';
  const events = new EventEmitter();
  events.setMaxListeners(0);
  const messages: SmsMessage[] = [];
  const byKey = new Map<string, { status: number; json: unknown }>();
  const requestsByKey = new Map<string, number>();
  const requests: FakeSms['requests'] = [];
  const state = { mode: 'accept' as SmsMode, decide: null as FakeSms['decide'] };
  let n = 0;

  const json = (res: ServerResponse, status: number, body: unknown) => {
    res.writeHead(status, { 'content-type': 'application/json' }).end(JSON.stringify(body));
  };

  const server = createServer(async (req, res) => {
    const path = (req.url ?? '').split('?')[0];
    const m = /^\/2010-04-01\/Accounts\/([^/]+)\/Messages\.json$/.exec(path);
    if (req.method !== 'POST' || !m) return json(res, 404, { code: 20404, message: 'not found', status: 404 });
    const body = await readBody(req);
    const auth = req.headers.authorization ?? '';
    const expected = `Basic ${Buffer.from(`${account}:${token}`).toString('base64')}`;
    if (decodeURIComponent(m[1]) !== account || auth !== expected) return json(res, 401, { code: 20003, message: 'Authenticate', status: 401 });
    const form = new URLSearchParams(body);
    const to = form.get('To') ?? '';
    const key = (req.headers['idempotency-key'] as string | undefined) ?? null;
    const mode = state.decide?.(to) ?? state.mode;
    requests.push({ to, key, mode });
    if (key) requestsByKey.set(key, (requestsByKey.get(key) ?? 0) + 1);
    const previous = key ? byKey.get(key) : undefined;
    try {
      if (previous) return json(res, previous.status, previous.json);
      if (mode === 'hang') return;
      if (mode === 'transient') return json(res, 503, { code: 20503, message: 'Service temporarily unavailable', status: 503 });
      if (mode === 'permanent') return json(res, 400, { code: 21211, message: `The 'To' number ${to} is not a valid phone number.`, status: 400 });
      const msg: SmsMessage = { sid: `SM${(++n).toString().padStart(6, '0')}${randomBytes(4).toString('hex')}`, to, from: form.get('From') ?? '', body: form.get('Body') ?? '', key, statusCallback: form.get('StatusCallback') };
      messages.push(msg);
      const answer = { status: 201, json: { sid: msg.sid, status: 'queued', to, from: msg.from, body: msg.body } };
      if (key) byKey.set(key, answer);
      if (mode === 'take-and-hang') return;
      return json(res, answer.status, answer.json);
    } finally {
      events.emit('change');
    }
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as AddressInfo).port;

  const post = async (url: string, params: URLSearchParams, good = true) => {
    const signature = good ? sign(token, url, params) : sign('wrong-token-000000', url, params);
    const r = await fetch(url, { method: 'POST', headers: { 'content-type': 'application/x-www-form-urlencoded', 'x-twilio-signature': signature }, body: params.toString() });
    return { status: r.status, body: await r.text() };
  };
  const find = (sid: string) => {
    const msg = messages.find((x) => x.sid === sid);
    if (!msg?.statusCallback) throw new Error(`fake sms: no message ${sid} with a StatusCallback`);
    return msg as SmsMessage & { statusCallback: string };
  };

  return {
    baseUrl: `http://127.0.0.1:${port}/2010-04-01`,
    account,
    token,
    messages,
    requestsByKey,
    requests,
    get mode() {
      return state.mode;
    },
    set mode(v: SmsMode) {
      state.mode = v;
    },
    get decide() {
      return state.decide;
    },
    set decide(f) {
      state.decide = f;
    },
    async waitFor(what, pred, timeoutMs = 15_000) {
      if (pred()) return;
      const ac = new AbortController();
      const timer = setTimeout(() => ac.abort(), timeoutMs);
      try {
        while (!pred()) await once(events, 'change', { signal: ac.signal });
      } catch (e) {
        if (ac.signal.aborted) throw new Error(`fake sms: timed out waiting for ${what}`);
        throw e;
      } finally {
        clearTimeout(timer);
      }
    },
    async postStatus(sid, status, o = {}) {
      const msg = find(sid);
      const p = new URLSearchParams({ MessageSid: sid, MessageStatus: status, AccountSid: account, To: msg.to, From: msg.from });
      if (o.errorCode) p.set('ErrorCode', o.errorCode);
      return post(msg.statusCallback, p, o.sign !== false);
    },
    async postReply(sid, from, body) {
      const msg = find(sid);
      const p = new URLSearchParams({ MessageSid: `SMin${randomBytes(6).toString('hex')}`, AccountSid: account, From: from, To: msg.from, Body: body, SmsStatus: 'received' });
      return post(msg.statusCallback, p);
    },
    async close() {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
