import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createPrivateKey, createPublicKey, sign, verify } from 'node:crypto';
import { contentDigest, signRequest, signatureBase } from '../../src/federation/http-signatures.ts';
import { isInnerList, parseDictionary, serializeDictionary } from '../../src/federation/structured-fields.ts';

// The Ed25519 test key of RFC 9421 Appendix B.1.4.
const RFC_PRIVATE = '-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIJ+DYvh6SEqVTm50DFtMDoQikTmiCqirVv9mWG9qfSnF\n-----END PRIVATE KEY-----\n';
const RFC_PUBLIC = '-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAJrQLj5P/89iXES9+vFgrIy29clF9CC/oPPsw3c5D0bs=\n-----END PUBLIC KEY-----\n';

describe('RFC 9421 signature base and RFC 9530 Content-Digest', () => {
  it('Content-Digest matches the examples of RFC 9530 (and the empty body)', () => {
    // RFC 9530 §2 example body {"hello": "world"}.
    assert.equal(contentDigest('{"hello": "world"}'), 'sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:');
    assert.equal(contentDigest(''), 'sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:');
  });

  it('reproduces the signature base and Ed25519 signature of RFC 9421 Appendix B.2.6', () => {
    const input = parseDictionary('sig-b26=("date" "@method" "@path" "@authority" "content-type" "content-length");created=1618884473;keyid="test-key-ed25519"');
    const params = input.get('sig-b26')!;
    assert.ok(isInnerList(params), 'an inner list');
    const base = signatureBase(params, {
      method: 'POST',
      url: 'http://example.com/foo?param=Value&Pet=dog',
      headers: { date: 'Tue, 20 Apr 2021 02:07:55 GMT', 'content-type': 'application/json', 'content-length': '18' },
    });
    // Written out from the RFC text, not computed.
    const expected = [
      '"date": Tue, 20 Apr 2021 02:07:55 GMT',
      '"@method": POST',
      '"@path": /foo',
      '"@authority": example.com',
      '"content-type": application/json',
      '"content-length": 18',
      '"@signature-params": ("date" "@method" "@path" "@authority" "content-type" "content-length");created=1618884473;keyid="test-key-ed25519"',
    ].join('\n');
    assert.equal(base, expected);
    const sig = sign(null, Buffer.from(base), createPrivateKey(RFC_PRIVATE)).toString('base64');
    assert.equal(sig, 'wqcAqbmYJ2ji2glfAMaRy4gruYYnx2nEFN2HN6jrnDnQCK1u02Gb04v9EDgwUPiu4A0w6vuQv5lIp5WPpBKRCw==');
  });

  it("builds Parley's profile: the headers and the signature base of docs/federation.md's worked example", () => {
    const h = signRequest({
      method: 'post',
      url: 'https://parley.beta.example/federation/v1/ping',
      body: '{"hello": "world"}',
      keyId: 'alpha.example#b16c2d1bead12626',
      privateKey: createPrivateKey(RFC_PRIVATE),
      now: 1618884473_999,
      nonce: 'rfc9421-example-nonce',
    });
    const params = '("@method" "@target-uri" "content-digest");created=1618884473;keyid="alpha.example#b16c2d1bead12626";alg="ed25519";nonce="rfc9421-example-nonce"';
    assert.equal(h['content-digest'], 'sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:');
    assert.equal(h['signature-input'], `parley=${params}`);
    const expectedBase = [
      '"@method": POST',
      '"@target-uri": https://parley.beta.example/federation/v1/ping',
      '"content-digest": sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:',
      `"@signature-params": ${params}`,
    ].join('\n');
    const m = /^parley=:([A-Za-z0-9+/=]+):$/.exec(h.signature);
    assert.ok(m, h.signature);
    // The signature verifies over the hand-written base with the RFC's public key.
    assert.ok(verify(null, Buffer.from(expectedBase), createPublicKey(RFC_PUBLIC), Buffer.from(m[1], 'base64')), 'verifies over the expected base');
    // Ed25519 is deterministic: the value printed in docs/federation.md.
    assert.equal(h.signature, 'parley=:fnsUbCpBYygVB6yhGe8BjmP1dlEd8DedJDwM9a8HXbgKrx+dKda2QBeDP8aAsURTooQeSGF9fod7K+d+tEvyDw==:');
  });

  it('parses and reserialises structured dictionaries, and refuses malformed ones', () => {
    const d = parseDictionary('a=("x" "y";p=1);created=5;keyid="k\\"q", b=:AQID:,  c, d=?0, e=tok/en;z');
    assert.equal(serializeDictionary(d), 'a=("x" "y";p=1);created=5;keyid="k\\"q", b=:AQID:, c, d=?0, e=tok/en;z');
    for (const bad of ['a=("x"', 'a="unterminated', 'A=1', 'a=1,', 'a=:not base64!:', 'a=("x")x'])
      assert.throws(() => parseDictionary(bad), /at character/, bad);
  });
});
