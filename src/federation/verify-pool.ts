/**
 * Ed25519 verification of action signatures on a worker thread (issue 3, Done means 5:
 * catch-up of 10,000 actions). Verifying one signature costs ≈ 0.06 ms of CPU on the project
 * machine with libsodium (≈ 0.12–0.25 ms with OpenSSL; ed25519.ts) — more than anything else
 * a replica does with an action in Node — so a large
 * received batch (a catch-up page) has its signatures checked here, on the other core, while
 * the main thread stores the previous batch. Used by action-signatures.ts
 * preverifySignatures; verifyLog remains the judge (this only tells it which signatures it
 * need not check again).
 */
import { Worker } from 'node:worker_threads';
import { sodiumModulePath } from './ed25519.ts';

/** One signature to check: the raw Ed25519 public key (base64url), the signed bytes, the signature (base64url). */
export interface SignatureJob {
  publicKey: string;
  message: string;
  signature: string;
}

// The worker: plain JavaScript (eval), so it runs the same from the sources and from the
// bundle. Like ed25519.ts verifyEd25519: libsodium when it loads (workerData: its path), its
// \`true\` final; OpenSSL (node:crypto) decides everything else.
const WORKER_SOURCE = `
const { parentPort, workerData } = require('node:worker_threads');
const { createPublicKey, verify } = require('node:crypto');
let sodium = null;
try {
  if (workerData.sodium) sodium = require(workerData.sodium);
} catch {}
const keys = new Map();
parentPort.on('message', ({ id, jobs }) => {
  const ok = jobs.map((j) => {
    try {
      let k = keys.get(j.publicKey);
      if (!k) {
        k = { object: createPublicKey({ key: { kty: 'OKP', crv: 'Ed25519', x: j.publicKey }, format: 'jwk' }), raw: Buffer.from(j.publicKey, 'base64url') };
        if (keys.size > 1000) keys.clear();
        keys.set(j.publicKey, k);
      }
      const message = Buffer.from(j.message, 'utf8');
      const signature = Buffer.from(j.signature, 'base64url');
      if (sodium && k.raw.length === 32 && signature.length === 64) {
        try {
          if (sodium.crypto_sign_verify_detached(signature, message, k.raw)) return true;
        } catch {}
      }
      return verify(null, message, k.object, signature);
    } catch {
      return false;
    }
  });
  parentPort.postMessage({ id, ok });
});
`;

let worker: Worker | null = null;
let broken = false;
let nextId = 0;
const waiting = new Map<number, { resolve: (ok: boolean[]) => void; reject: (e: Error) => void }>();

function start(): Worker | null {
  if (worker || broken) return worker;
  try {
    const w = new Worker(WORKER_SOURCE, { eval: true, workerData: { sodium: sodiumModulePath() } });
    w.on('message', ({ id, ok }: { id: number; ok: boolean[] }) => {
      const p = waiting.get(id);
      waiting.delete(id);
      if (waiting.size === 0) w.unref();
      p?.resolve(ok);
    });
    const fail = (e: Error) => {
      worker = null;
      for (const p of waiting.values()) p.reject(e);
      waiting.clear();
    };
    w.on('error', fail);
    w.on('exit', () => fail(new Error('signature worker exited')));
    // Keeps the process alive only while it has work (verifyOnWorker refs it). After the
    // listeners: attaching a 'message' listener refs the worker again.
    w.unref();
    worker = w;
  } catch {
    broken = true;
  }
  return worker;
}

/**
 * Checks Ed25519 signatures on the worker thread.
 * @returns one boolean per job (true: the signature verifies), in order
 * @throws Error when the worker cannot run (the caller verifies on the main thread instead)
 */
export function verifyOnWorker(jobs: SignatureJob[]): Promise<boolean[]> {
  const w = start();
  if (!w) return Promise.reject(new Error('no signature worker'));
  const id = nextId++;
  return new Promise((resolve, reject) => {
    waiting.set(id, { resolve, reject });
    w.ref();
    w.postMessage({ id, jobs });
  });
}

/**
 * Starts the worker thread now (≈ 50–100 ms) rather than with the first large batch: the
 * federation worker calls it at start, before it catches up on its conversations.
 */
export function warmVerifyWorker(): void {
  start();
}
