import { createHmac, timingSafeEqual } from 'node:crypto';

/** How far a signed request's timestamp may be from our clock, in seconds (either way). */
export const SIGNATURE_TOLERANCE_S = 300;

/**
 * The `X-Parley-Signature` header for `body` sent at `unixSeconds` (docs/delivery.md,
 * "Webhook signatures"): `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>` —
 * the scheme Stripe made common: the timestamp is signed too, so a captured request cannot
 * be replayed after the tolerance window.
 */
export function parleySignature(secret: string, body: string | Buffer, unixSeconds: number): string {
  const mac = createHmac('sha256', secret).update(`${unixSeconds}.`).update(body).digest('hex');
  return `t=${unixSeconds},v1=${mac}`;
}

/**
 * Checks an `X-Parley-Signature` header against the raw body: well-formed, a `v1` HMAC that
 * matches (constant-time), and a timestamp within `toleranceS` of `nowMs`.
 * @returns null when valid, else the reason (for logs; clients get a plain 401)
 */
export function parleySignatureProblem(secret: string, header: string | undefined, rawBody: Buffer, nowMs: number, toleranceS = SIGNATURE_TOLERANCE_S): string | null {
  if (!header) return 'no X-Parley-Signature header';
  let t: number | null = null;
  const macs: string[] = [];
  for (const part of header.split(',')) {
    const eq = part.indexOf('=');
    if (eq < 0) continue;
    const k = part.slice(0, eq).trim();
    const v = part.slice(eq + 1).trim();
    if (k === 't' && /^\d{1,12}$/.test(v)) t = Number(v);
    else if (k === 'v1' && /^[0-9a-f]{64}$/i.test(v)) macs.push(v.toLowerCase());
  }
  if (t === null || macs.length === 0) return 'malformed X-Parley-Signature header';
  if (Math.abs(nowMs / 1000 - t) > toleranceS) return `signature timestamp ${t} is outside the ${toleranceS} s tolerance`;
  const want = Buffer.from(createHmac('sha256', secret).update(`${t}.`).update(rawBody).digest('hex'));
  return macs.some((m) => timingSafeEqual(Buffer.from(m), want)) ? null : 'signature does not match';
}

/**
 * The `X-Twilio-Signature` of a form POST to `url` (Twilio's documented scheme, which
 * Twilio-like SMS gateways copy): base64 of HMAC-SHA1(auth token, url + every form parameter
 * as name + value, sorted by name).
 */
export function twilioSignature(token: string, url: string, params: URLSearchParams): string {
  const names = [...new Set([...params.keys()])].sort();
  let data = url;
  for (const n of names) for (const v of params.getAll(n)) data += n + v;
  return createHmac('sha1', token).update(data, 'utf8').digest('base64');
}

/** Constant-time check of an `X-Twilio-Signature` against each candidate URL. */
export function twilioSignatureValid(token: string, header: string | undefined, urls: string[], params: URLSearchParams): boolean {
  if (!header) return false;
  const got = Buffer.from(header);
  return urls.some((u) => {
    const want = Buffer.from(twilioSignature(token, u, params));
    return want.length === got.length && timingSafeEqual(want, got);
  });
}
