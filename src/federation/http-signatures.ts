/**
 * Signed federation requests: the Parley profile of HTTP Message Signatures (RFC 9421)
 * with Content-Digest (RFC 9530). docs/federation.md, "Signed requests", is the spec.
 *
 * A request is signed over `@method`, `@target-uri` and `content-digest` with the
 * parameters `created` (Unix seconds), `keyid` (`<platform>#<key id>`), `alg="ed25519"`
 * and a random `nonce`, under the label `parley`:
 *
 *     Content-Digest: sha-256=:<base64 SHA-256 of the body bytes>:
 *     Signature-Input: parley=("@method" "@target-uri" "content-digest");created=…;keyid="…";alg="ed25519";nonce="…"
 *     Signature: parley=:<base64 Ed25519 signature over the signature base>:
 *
 * The verifier checks, in this order, and answers 401 with the code in brackets on the
 * first failure: the headers are present [missing_signature] and well-formed
 * [bad_signature_input]; `created` is within ±{@link CLOCK_SKEW_S} s of now [clock_skew];
 * Content-Digest matches the raw body bytes [digest_mismatch] — before the body is parsed;
 * the key is known and valid at `created` [unknown_key]; the signature verifies
 * [bad_signature]; the (keyid, signature) pair was not seen before [replayed].
 */
import { createHash, createPublicKey, randomBytes, type KeyObject } from 'node:crypto';
import { publicKeyBytes, signEd25519, verifyEd25519 } from './ed25519.ts';
import { AppError } from '../platform/errors.ts';
import {
  type Dictionary,
  type InnerList,
  type Item,
  type Params,
  StructuredFieldError,
  Token,
  isInnerList,
  parseDictionary,
  serializeBareItem,
  serializeInnerList,
} from './structured-fields.ts';

/** Largest accepted difference between a request's `created` and the verifier's clock, in seconds. */
export const CLOCK_SKEW_S = 300;
/** The signature label Parley uses in Signature-Input and Signature. */
export const SIGNATURE_LABEL = 'parley';
/** The components every Parley request signature covers, in this order. */
export const COVERED_COMPONENTS = ['@method', '@target-uri', 'content-digest'] as const;

/** A verification key of a platform, as the key resolver answers it. */
export interface ResolvedKey {
  /** `<platform>#<key id>`, as in `keyid`. */
  keyId: string;
  /** The platform's name: its primary domain. */
  platform: string;
  publicKey: KeyObject;
  /** When the key was created, ms since the epoch: it signs nothing dated earlier. */
  createdAt: number;
  /** End of validity, ms since the epoch: it verifies nothing dated later. */
  notAfter: number;
}

/**
 * Finds the public key named by a `keyid` (`<platform>#<key id>`), or null when that
 * platform does not publish it (or cannot be reached). Implementations cache.
 */
export type KeyResolver = (keyId: string) => Promise<ResolvedKey | null>;

/**
 * Remembers signatures for replay protection. `remember` returns true the first time an
 * id is seen, false if it was seen and has not expired. Must be shared by every process
 * of the platform (federation/replay.ts keeps it in PostgreSQL).
 */
export interface ReplayStore {
  remember(id: string, expiresAtMs: number): Promise<boolean>;
}

/** The parts of an incoming request the verifier reads. */
export interface SignedRequestLike {
  method: string;
  /** The full target URI as the receiver reconstructs it (scheme, authority, path, query). */
  url: string;
  /** Header fields, lowercase names; repeated fields joined with ", " (as Node does). */
  headers: Record<string, string | string[] | undefined>;
  /** The raw body bytes, exactly as received (empty for GET). */
  body: Uint8Array;
}

/** Who signed a verified request. */
export interface VerifiedPeer {
  /** The signing platform's name (primary domain), from keyid. */
  platform: string;
  /** The full keyid, `<platform>#<key id>`. */
  keyId: string;
}

/** The 401 reasons of request verification (docs/federation.md, "Status codes"). */
export type RequestRejection =
  | 'missing_signature'
  | 'bad_signature_input'
  | 'clock_skew'
  | 'digest_mismatch'
  | 'unknown_key'
  | 'bad_signature'
  | 'replayed';

/** A 401 naming why a federation request was refused. */
export function rejected(code: RequestRejection, message: string, details?: Record<string, unknown>): AppError {
  return new AppError(401, code, message, details);
}

/** `sha-256=:<base64>:` — the Content-Digest field value of a body (RFC 9530 §2). */
export function contentDigest(body: Uint8Array | string): string {
  return `sha-256=:${createHash('sha256').update(body).digest('base64')}:`;
}

/** A covered component: its identifier (name and parameters) as in Signature-Input. */
export interface Component {
  name: string;
  params?: Params;
}

/**
 * The value of a component for the signature base (RFC 9421 §2.1, §2.2). Supports the
 * derived components @method, @target-uri, @authority, @scheme, @path, @query and
 * @request-target, and HTTP fields without parameters.
 * @throws AppError 401 bad_signature_input for an unsupported component or a missing field
 */
export function componentValue(c: Component, req: Pick<SignedRequestLike, 'method' | 'url' | 'headers'>): string {
  if (c.params && c.params.size > 0) throw rejected('bad_signature_input', `component parameters are not supported (${c.name})`);
  const url = c.name.startsWith('@') && c.name !== '@method' ? new URL(req.url) : null;
  switch (c.name) {
    case '@method':
      return req.method;
    case '@target-uri':
      return req.url;
    case '@authority':
      return url!.host.toLowerCase();
    case '@scheme':
      return url!.protocol.slice(0, -1).toLowerCase();
    case '@path':
      return url!.pathname || '/';
    case '@query':
      return url!.search || '?';
    case '@request-target':
      return (url!.pathname || '/') + url!.search;
    default: {
      if (c.name.startsWith('@')) throw rejected('bad_signature_input', `derived component ${c.name} is not supported`);
      if (c.name !== c.name.toLowerCase()) throw rejected('bad_signature_input', `component names are lowercase (${c.name})`);
      const v = req.headers[c.name];
      if (v === undefined) throw rejected('bad_signature_input', `the signed field ${c.name} is missing from the request`);
      // RFC 9421 §2.1: trim each field line, join several lines with ", ".
      return (Array.isArray(v) ? v : [v]).map((x) => x.trim()).join(', ');
    }
  }
}

/**
 * The signature base (RFC 9421 §2.5): one line `"<component>": <value>` per covered
 * component, then `"@signature-params": <the serialised inner list with its parameters>`,
 * joined by LF with no trailing LF.
 * @throws AppError 401 bad_signature_input (unsupported component, missing field)
 */
export function signatureBase(signatureParams: InnerList, req: Pick<SignedRequestLike, 'method' | 'url' | 'headers'>): string {
  const lines: string[] = [];
  const seen = new Set<string>();
  for (const item of signatureParams.items) {
    if (typeof item.value !== 'string') throw rejected('bad_signature_input', 'component identifiers are strings');
    const id = serializeBareItem(item.value) + (item.params.size ? [...item.params].map(([k, v]) => `;${k}=${serializeBareItem(v)}`).join('') : '');
    if (seen.has(id)) throw rejected('bad_signature_input', `component ${id} is listed twice`);
    seen.add(id);
    const value = componentValue({ name: item.value, params: item.params }, req);
    if (/[\r\n]/.test(value)) throw rejected('bad_signature_input', `component ${id} has a line break`);
    lines.push(`${id}: ${value}`);
  }
  lines.push(`"@signature-params": ${serializeInnerList(signatureParams)}`);
  return lines.join('\n');
}

/** What {@link signRequest} needs. */
export interface SignRequestInput {
  method: string;
  /** The full URL the request is sent to; it is `@target-uri`. */
  url: string;
  /** The body bytes (a string is UTF-8); omit or '' for none. */
  body?: Uint8Array | string;
  /** `<platform>#<key id>`. */
  keyId: string;
  /** The platform's Ed25519 private key. */
  privateKey: KeyObject;
  /** Signing time, ms since the epoch (rounded down to seconds for `created`). */
  now: number;
  /** The `nonce` parameter; random 16 bytes base64url when omitted. */
  nonce?: string;
}

/** The headers a signed request carries. */
export type SignatureHeaders = {
  'content-digest': string;
  'signature-input': string;
  signature: string;
};

/**
 * Signs a federation request (the Parley profile of RFC 9421, see the module comment).
 * @returns the Content-Digest, Signature-Input and Signature header values
 */
export function signRequest(input: SignRequestInput): SignatureHeaders {
  const body = input.body ?? '';
  const digest = contentDigest(body);
  const params: Params = new Map();
  params.set('created', Math.floor(input.now / 1000));
  params.set('keyid', input.keyId);
  params.set('alg', 'ed25519');
  params.set('nonce', input.nonce ?? randomBytes(16).toString('base64url'));
  const inner: InnerList = { items: COVERED_COMPONENTS.map((c) => ({ value: c, params: new Map() })), params };
  const base = signatureBase(inner, { method: input.method.toUpperCase(), url: input.url, headers: { 'content-digest': digest } });
  const sig = signEd25519(input.privateKey, Buffer.from(base, 'utf8'));
  return {
    'content-digest': digest,
    'signature-input': `${SIGNATURE_LABEL}=${serializeInnerList(inner)}`,
    signature: `${SIGNATURE_LABEL}=:${sig.toString('base64')}:`,
  };
}

function header(req: SignedRequestLike, name: string): string | undefined {
  const v = req.headers[name];
  if (v === undefined) return undefined;
  return Array.isArray(v) ? v.join(', ') : v;
}

/** Parses `<platform>#<key id>`; null if malformed. */
export function parseKeyId(keyId: string): { platform: string; id: string } | null {
  const m = /^([a-z0-9.-]+)#([A-Za-z0-9_-]{1,64})$/.exec(keyId);
  return m ? { platform: m[1], id: m[2] } : null;
}

/**
 * Verifies a signed federation request (docs/federation.md, "Signed requests"), in the
 * order of the module comment, and records its signature against replays.
 * @param now the verifier's time, ms since the epoch
 * @returns the signing platform and keyid
 * @throws AppError 401 with code missing_signature | bad_signature_input | clock_skew |
 *   digest_mismatch | unknown_key | bad_signature | replayed
 */
export async function verifyRequest(
  req: SignedRequestLike,
  resolveKey: KeyResolver,
  now: number,
  replay: ReplayStore,
): Promise<VerifiedPeer> {
  // 1. Present and well-formed.
  const inputHeader = header(req, 'signature-input');
  const sigHeader = header(req, 'signature');
  const digestHeader = header(req, 'content-digest');
  if (!inputHeader || !sigHeader) throw rejected('missing_signature', 'a federation request needs Signature-Input and Signature (RFC 9421)');
  if (!digestHeader) throw rejected('missing_signature', 'a federation request needs Content-Digest (RFC 9530), even with an empty body');
  let inputs: Dictionary;
  let sigs: Dictionary;
  try {
    inputs = parseDictionary(inputHeader);
    sigs = parseDictionary(sigHeader);
  } catch (e) {
    if (e instanceof StructuredFieldError) throw rejected('bad_signature_input', `Signature-Input or Signature is not a structured dictionary: ${e.message}`);
    throw e;
  }
  const label = inputs.has(SIGNATURE_LABEL) ? SIGNATURE_LABEL : [...inputs.keys()][0];
  const params = label !== undefined ? inputs.get(label) : undefined;
  if (!params || !isInnerList(params)) throw rejected('bad_signature_input', `Signature-Input has no signature "${SIGNATURE_LABEL}"`);
  const sigItem = sigs.get(label!) as Item | InnerList | undefined;
  if (!sigItem || isInnerList(sigItem) || !Buffer.isBuffer(sigItem.value))
    throw rejected('bad_signature_input', `Signature has no byte sequence for label "${label}"`);
  const signature = sigItem.value;
  const covered = params.items.map((i) => i.value);
  for (const c of COVERED_COMPONENTS)
    if (!covered.includes(c)) throw rejected('bad_signature_input', `the signature must cover ${COVERED_COMPONENTS.join(', ')}`, { missing: c });
  const created = params.params.get('created');
  const keyId = params.params.get('keyid');
  const alg = params.params.get('alg');
  const expires = params.params.get('expires');
  if (typeof created !== 'number' || !Number.isInteger(created)) throw rejected('bad_signature_input', 'the created parameter (Unix seconds) is required');
  if (typeof keyId !== 'string') throw rejected('bad_signature_input', 'the keyid parameter is required');
  const kid = parseKeyId(keyId);
  if (!kid) throw rejected('bad_signature_input', 'keyid must be "<platform domain>#<key id>"', { keyid: keyId });
  if (alg !== undefined && !(typeof alg === 'string' && alg === 'ed25519'))
    throw rejected('bad_signature_input', 'alg must be "ed25519"', { alg: alg instanceof Token ? alg.value : String(alg) });
  if (signature.length !== 64) throw rejected('bad_signature_input', 'an Ed25519 signature is 64 bytes');

  // 2. Freshness.
  const nowS = Math.floor(now / 1000);
  if (Math.abs(nowS - created) > CLOCK_SKEW_S)
    throw rejected('clock_skew', `created ${created} is more than ${CLOCK_SKEW_S} s away from this platform's clock (${nowS})`, { created, now: nowS, max_skew_s: CLOCK_SKEW_S });
  if (typeof expires === 'number' && expires < nowS) throw rejected('clock_skew', `the signature expired at ${expires}`, { expires, now: nowS });

  // 3. The body matches its digest (before anyone parses it).
  let digests: Dictionary;
  try {
    digests = parseDictionary(digestHeader);
  } catch (e) {
    if (e instanceof StructuredFieldError) throw rejected('digest_mismatch', `Content-Digest is malformed: ${e.message}`);
    throw e;
  }
  const sha = digests.get('sha-256');
  if (!sha || isInnerList(sha) || !Buffer.isBuffer(sha.value)) throw rejected('digest_mismatch', 'Content-Digest must carry sha-256');
  if (!createHash('sha256').update(req.body).digest().equals(sha.value))
    throw rejected('digest_mismatch', 'the body does not match its Content-Digest');

  // 4. The key is known and valid at `created`.
  const key = await resolveKey(keyId);
  if (!key) throw rejected('unknown_key', `${kid.platform} does not publish the key ${keyId}`, { keyid: keyId });
  const createdMs = created * 1000;
  if (createdMs < key.createdAt - CLOCK_SKEW_S * 1000 || createdMs > key.notAfter)
    throw rejected('unknown_key', `the key ${keyId} is not valid at ${new Date(createdMs).toISOString()}`, {
      keyid: keyId,
      created_at: new Date(key.createdAt).toISOString(),
      not_after: new Date(key.notAfter).toISOString(),
    });

  // 5. The signature.
  let base: string;
  try {
    base = signatureBase(params, req);
  } catch (e) {
    if (e instanceof TypeError) throw rejected('bad_signature_input', `the request URL is not valid: ${e.message}`);
    throw e;
  }
  if (!verifyEd25519(key.publicKey, Buffer.from(base, 'utf8'), signature))
    throw rejected('bad_signature', `the signature does not verify with ${keyId}`, { keyid: keyId });

  // 6. Not seen before (kept until it would fail the freshness check anyway).
  const replayId = createHash('sha256').update(keyId).update('\n').update(signature).digest('hex');
  if (!(await replay.remember(replayId, (created + CLOCK_SKEW_S + 1) * 1000)))
    throw rejected('replayed', 'this signature was already used', { keyid: keyId });
  return { platform: kid.platform, keyId };
}

/** A public key from its raw 32 bytes, base64url (the form of the keys document). */
export function publicKeyFromRaw(b64url: string): KeyObject {
  const raw = Buffer.from(b64url, 'base64url');
  if (raw.length !== 32) throw new TypeError('an Ed25519 public key is 32 bytes');
  return createPublicKey({ key: { kty: 'OKP', crv: 'Ed25519', x: raw.toString('base64url') }, format: 'jwk' });
}

/** The raw 32 bytes of an Ed25519 public key, base64url without padding. */
export function rawPublicKey(key: KeyObject): string {
  return publicKeyBytes(key).toString('base64url');
}
