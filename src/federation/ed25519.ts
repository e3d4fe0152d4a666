/**
 * Ed25519 signature verification (RFC 8032) for action and request signatures, through
 * libsodium (the `sodium-native` package) when it loads, else node:crypto (OpenSSL).
 *
 * Why (issue 3, Done means 5: `catchup_10k_s`, `federation_p99_ms`): checking signatures is
 * the largest CPU cost of a replica receiving actions — one per action, one per request — and
 * libsodium's check takes about half of OpenSSL's on the project machine (≈ 57 µs against
 * ≈ 120 µs per signature).
 *
 * Same verdicts: both evaluate the same cofactorless equation (`[S]B = R + [k]A`, R compared as
 * encoded bytes) and refuse a non-canonical S; libsodium also refuses small-order and
 * non-canonical points. So what libsodium accepts OpenSSL accepts too, and its `true` is
 * final; anything it refuses is decided by OpenSSL, exactly as before it was used. Ed25519
 * signatures are deterministic: libsodium signs the same bytes OpenSSL would (≈ 40 µs
 * against ≈ 55 µs).
 */
import { createRequire } from 'node:module';
import { type KeyObject, sign, verify } from 'node:crypto';

/** The part of sodium-native used here. */
interface Sodium {
  crypto_sign_verify_detached(signature: Buffer, message: Buffer, publicKey: Buffer): boolean;
  crypto_sign_detached(signature: Buffer, message: Buffer, secretKey: Buffer): void;
  crypto_sign_seed_keypair(publicKey: Buffer, secretKey: Buffer, seed: Buffer): void;
}

let sodium: Sodium | null | undefined;

/**
 * The file `require('sodium-native')` loads (for a worker thread, which loads it itself), or
 * null when it is not installed.
 */
export function sodiumModulePath(): string | null {
  try {
    return createRequire(import.meta.url).resolve('sodium-native');
  } catch {
    return null;
  }
}

function loadSodium(): Sodium | null {
  if (sodium === undefined) {
    try {
      sodium = createRequire(import.meta.url)('sodium-native') as Sodium;
    } catch {
      sodium = null; // not installed, or no prebuilt binary for this platform: OpenSSL only
    }
  }
  return sodium;
}

/** Raw 32-byte public keys of key objects. */
const rawKeys = new WeakMap<KeyObject, Buffer>();

/**
 * The raw 32 bytes of an Ed25519 public key (RFC 8032 §5.1.5), remembered per key object.
 * @throws TypeError when `publicKey` is not an Ed25519 public key
 */
export function publicKeyBytes(publicKey: KeyObject): Buffer {
  let raw = rawKeys.get(publicKey);
  if (!raw) {
    const x = (publicKey.export({ format: 'jwk' }) as { x?: string }).x;
    if (!x) throw new TypeError('not an Ed25519 key');
    rawKeys.set(publicKey, (raw = Buffer.from(x, 'base64url')));
  }
  return raw;
}

/**
 * Does `signature` (64 bytes) verify over `message` with the Ed25519 public key `publicKey`?
 * libsodium first when available (a `true` is final), else — and for anything it refuses —
 * node:crypto's verdict. Never throws for a wrong-sized signature (false).
 */
export function verifyEd25519(publicKey: KeyObject, message: Buffer, signature: Buffer): boolean {
  const s = loadSodium();
  if (s && signature.length === 64) {
    try {
      const raw = publicKeyBytes(publicKey);
      if (raw.length === 32 && s.crypto_sign_verify_detached(signature, message, raw)) return true;
    } catch {
      /* decided below */
    }
  }
  try {
    return verify(null, message, publicKey, signature);
  } catch {
    return false;
  }
}

/** Is libsodium in use (verification about twice as fast as node:crypto's)? */
export function fastEd25519(): boolean {
  return loadSodium() !== null;
}

/** libsodium secret keys (seed ‖ public key, 64 bytes) of private key objects. */
const secretKeys = new WeakMap<KeyObject, Buffer>();

/**
 * The Ed25519 signature (64 bytes) of `message` with `privateKey` — libsodium when available,
 * else node:crypto; the same bytes either way (RFC 8032 signatures are deterministic).
 */
export function signEd25519(privateKey: KeyObject, message: Buffer): Buffer {
  const s = loadSodium();
  if (s) {
    let sk = secretKeys.get(privateKey);
    if (!sk) {
      const seed = Buffer.from((privateKey.export({ format: 'jwk' }) as { d: string }).d, 'base64url');
      sk = Buffer.alloc(64);
      s.crypto_sign_seed_keypair(Buffer.alloc(32), sk, seed);
      secretKeys.set(privateKey, sk);
    }
    const signature = Buffer.alloc(64);
    s.crypto_sign_detached(signature, message, sk);
    return signature;
  }
  return sign(null, message, privateKey);
}
