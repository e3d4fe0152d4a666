import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, createPrivateKey, createPublicKey, verify } from 'node:crypto';
import { type Action, hashAction } from '../../src/core/actions.ts';
import { parseActionSig, signActionHash } from '../../src/federation/action-signatures.ts';
import { rawPublicKey } from '../../src/federation/http-signatures.ts';
import { keyIdOf } from '../../src/federation/keys.ts';

// The Ed25519 test key of RFC 9421 Appendix B.1.4 (its JWK "x" is the raw public key).
const RFC_PRIVATE = '-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIJ+DYvh6SEqVTm50DFtMDoQikTmiCqirVv9mWG9qfSnF\n-----END PRIVATE KEY-----\n';
const RFC_JWK_X = 'JrQLj5P_89iXES9-vFgrIy29clF9CC_oPPsw3c5D0bs';

describe('action hashes and signatures: the worked example of docs/federation.md', () => {
  const a1 = {
    conv: '83cb27b16e2b068ca8ba8505e3a34d9a',
    id: 1,
    act: 'conv:create',
    actor: 'alice@alpha.example',
    body: 'Lunch?',
    ts: '2026-01-15T09:30:00.000Z',
    prev: null,
  } as Omit<Action, 'hash'>;

  it('hashes the canonical JSON written out in the docs (keys sorted, no spaces, no hash or sig)', () => {
    const canonical = '{"act":"conv:create","actor":"alice@alpha.example","body":"Lunch?","conv":"83cb27b16e2b068ca8ba8505e3a34d9a","id":1,"prev":null,"ts":"2026-01-15T09:30:00.000Z"}';
    const expected = createHash('sha256').update(canonical, 'utf8').digest('hex');
    assert.equal(hashAction(a1 as Action), expected);
    // sig never takes part in the hash.
    assert.equal(hashAction({ ...a1, hash: 'x', sig: 'y' } as Action), expected);
  });

  it('signs UTF-8 "parley-action-v1:<hash>" and carries "<keyid>:<base64url>"', () => {
    const priv = createPrivateKey(RFC_PRIVATE);
    const pub = createPublicKey(priv);
    assert.equal(rawPublicKey(pub), RFC_JWK_X);
    const kid = keyIdOf(RFC_JWK_X);
    assert.equal(kid, createHash('sha256').update(Buffer.from(RFC_JWK_X, 'base64url')).digest('hex').slice(0, 16));
    const hash = hashAction(a1 as Action);
    const sig = signActionHash(hash, { keyId: `alpha.example#${kid}`, privateKey: priv });
    const m = /^alpha\.example#([0-9a-f]{16}):([A-Za-z0-9_-]{86})$/.exec(sig);
    assert.ok(m, sig);
    assert.ok(verify(null, Buffer.from(`parley-action-v1:${hash}`, 'utf8'), pub, Buffer.from(m[2], 'base64url')), 'verifies over the documented bytes');
    assert.deepEqual(parseActionSig(sig)?.platform, 'alpha.example');
    // Deterministic (Ed25519): the value printed in docs/federation.md.
    assert.equal(sig, 'alpha.example#b16c2d1bead12626:OAdSUjcfKBEDHkW9uGW_cCect72e2LKhaLwruSjQPvCHV6LTt_gTTOvKRupKcp-u3W32j71JPfmn0esw8lQRAQ');
    for (const bad of ['', 'alpha.example:abc', `nohash:${m[2]}`, `alpha.example#${kid}:${m[2]}=`, `alpha.example#${kid}:${m[2].slice(1)}`]) assert.equal(parseActionSig(bad), null, bad);
  });
});
