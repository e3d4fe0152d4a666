/**
 * A local HTTP receiver of Parley's `webhook` deliveries for tests — an organisation's
 * application. It checks `X-Parley-Signature` itself (HMAC-SHA256 of "t.body" with the shared
 * secret, computed here independently of Parley's code) and answers 401 to a bad one; it
 * honours `Idempotency-Key` (a repeat answers the same id and is not kept twice); its `mode`
 * makes it accept (200 {id}), fail transiently (503), refuse (422) or never answer. It can
 * also post signed events (receipts, replies) back to Parley's hook route.
 */
import { createHmac } from 'node:crypto';
import { EventEmitter, once } from 'node:events';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';

export type ReceiverMode = 'accept' | 'transient' | 'permanent' | 'hang';

/** A delivery the receiver kept (one per idempotency key). */
export interface Received {
  id: string;
  key: string;
  body: any;
}

export interface WebhookReceiver {
  url: string;
  secret: string;
  mode: ReceiverMode;
  readonly kept: Received[];
  /** Every request per Idempotency-Key (repeats included). */
  readonly requestsByKey: Map<string, number>;
  /** Requests refused for a bad or missing signature. */
  badSignatures: number;
  waitFor(what: string, pred: () => boolean, timeoutMs?: number): Promise<void>;
  /** POSTs `event` to `${base}/api/delivery/hooks/webhook?org=<org>`, signed (or not, or with timestamp `t`). */
  postEvent(base: string, org: string, event: unknown, opts?: { sign?: 'good' | 'bad' | 'none'; t?: number; raw?: string }): Promise<{ status: number; body: any }>;
  close(): Promise<void>;
}

function signature(secret: string, t: number, body: string): string {
  return `t=${t},v1=${createHmac('sha256', secret).update(`${t}.${body}`).digest('hex')}`;
}

export async function startWebhookReceiver(secret = 'webhook-secret-0123456789abcdef'): Promise<WebhookReceiver> {
  const events = new EventEmitter();
  events.setMaxListeners(0);
  const kept: Received[] = [];
  const byKey = new Map<string, string>();
  const requestsByKey = new Map<string, number>();
  const state = { mode: 'accept' as ReceiverMode, bad: 0 };
  let n = 0;
  const server = createServer(async (req, res) => {
    const chunks: Buffer[] = [];
    for await (const c of req) chunks.push(c as Buffer);
    const body = Buffer.concat(chunks).toString('utf8');
    try {
      const header = String(req.headers['x-parley-signature'] ?? '');
      const t = Number(/(?:^|,)t=(\d+)/.exec(header)?.[1]);
      const v1 = /(?:^|,)v1=([0-9a-f]{64})/.exec(header)?.[1];
      const want = createHmac('sha256', secret).update(`${t}.${body}`).digest('hex');
      if (!v1 || v1 !== want || Math.abs(Date.now() / 1000 - t) > 300) {
        state.bad++;
        res.writeHead(401).end('bad signature');
        return;
      }
      const key = String(req.headers['idempotency-key'] ?? '');
      requestsByKey.set(key, (requestsByKey.get(key) ?? 0) + 1);
      const seen = byKey.get(key);
      if (seen) {
        res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ id: seen }));
        return;
      }
      if (state.mode === 'hang') return;
      if (state.mode === 'transient') {
        res.writeHead(503).end('try later');
        return;
      }
      if (state.mode === 'permanent') {
        res.writeHead(422, { 'content-type': 'application/json' }).end(JSON.stringify({ error: 'unknown contact' }));
        return;
      }
      const id = `wh_${++n}`;
      byKey.set(key, id);
      kept.push({ id, key, body: JSON.parse(body) });
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ id }));
    } finally {
      events.emit('change');
    }
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as AddressInfo).port;
  return {
    url: `http://127.0.0.1:${port}/hooks/parley`,
    secret,
    get mode() {
      return state.mode;
    },
    set mode(m: ReceiverMode) {
      state.mode = m;
    },
    kept,
    requestsByKey,
    get badSignatures() {
      return state.bad;
    },
    async waitFor(what, pred, timeoutMs = 15_000) {
      if (pred()) return;
      const ac = new AbortController();
      const timer = setTimeout(() => ac.abort(), timeoutMs);
      try {
        while (!pred()) await once(events, 'change', { signal: ac.signal });
      } catch (e) {
        if (ac.signal.aborted) throw new Error(`webhook receiver: timed out waiting for ${what}`);
        throw e;
      } finally {
        clearTimeout(timer);
      }
    },
    async postEvent(base, org, event, opts = {}) {
      const body = opts.raw ?? JSON.stringify(event);
      const t = opts.t ?? Math.floor(Date.now() / 1000);
      const headers: Record<string, string> = { 'content-type': 'application/json' };
      if (opts.sign !== 'none') headers['x-parley-signature'] = signature(opts.sign === 'bad' ? 'not-the-secret-at-all' : secret, t, body);
      const r = await fetch(`${base}/api/delivery/hooks/webhook?org=${encodeURIComponent(org)}`, { method: 'POST', headers, body });
      const text = await r.text();
      let parsed: any = text;
      try {
        parsed = JSON.parse(text);
      } catch {
        /* not JSON */
      }
      return { status: r.status, body: parsed };
    },
    async close() {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
