import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { DiscoveryUnavailable, NEGATIVE_TTL_MS, POSITIVE_TTL_MS, TEMPORARY_TTL_MS, createDiscovery, parseTxtRecord } from '../../src/federation/discovery.ts';
import { ConfigError, loadConfig } from '../../src/platform/config.ts';

/** A DNS error as node:dns rejects with. */
const dnsError = (code: string) => Object.assign(new Error(code), { code });

describe('discovery: static route, then DNS TXT _parley, then the well-known document; cached', () => {
  let server: Server;
  let port = 0;
  /** Well-known answers by domain: [status, body]. */
  const documents = new Map<string, [number, unknown]>();
  const wellKnownHits: string[] = [];
  /** TXT records by name, or an error code. */
  const txt = new Map<string, string[][] | string>();
  const dnsQueries: string[] = [];
  let clock = 1_700_000_000_000;

  const discovery = () =>
    createDiscovery({
      routes: () => ({ 'gamma.test': 'http://127.0.0.1:1/' }),
      resolver: async (name: string, rrtype: string) => {
        assert.equal(rrtype, 'TXT');
        dnsQueries.push(name);
        const r = txt.get(name);
        if (r === undefined) throw dnsError('ENOTFOUND');
        if (typeof r === 'string') throw dnsError(r);
        return r;
      },
      wellKnownUrl: (d) => `http://127.0.0.1:${port}/${d}/.well-known/parley/platform`,
      now: () => clock,
    });

  before(async () => {
    server = createServer((req, res) => {
      const domain = req.url!.split('/')[1];
      wellKnownHits.push(domain);
      const [status, body] = documents.get(domain) ?? [404, { error: 'none' }];
      res.writeHead(status, { 'content-type': 'application/json' }).end(JSON.stringify(body));
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    port = (server.address() as AddressInfo).port;
  });
  after(() => new Promise<void>((r) => server.close(() => r())));

  it('a static route wins without asking DNS or the web', async () => {
    txt.set('_parley.gamma.test', [['v=parley1; url=https://dns.gamma.example']]);
    documents.set('gamma.test', [200, { platform: 'gamma.test', url: 'https://web.gamma.example' }]);
    const d = discovery();
    assert.deepEqual(await d.discover('Gamma.Test'), { domain: 'gamma.test', url: 'http://127.0.0.1:1', via: 'static' });
    assert.deepEqual(dnsQueries.filter((q) => q.includes('gamma')), []);
    assert.deepEqual(wellKnownHits.filter((h) => h === 'gamma.test'), []);
  });

  it('finds a platform by its TXT record (chunks joined, other TXT records ignored) and caches it', async () => {
    txt.set('_parley.delta.test', [['v=spf1 -all'], ['v=parley1; ', 'url=https://parley.delta.example:8443/']]);
    documents.set('delta.test', [200, { platform: 'delta.test', url: 'https://web.delta.example' }]);
    const d = discovery();
    assert.deepEqual(await d.discover('delta.test'), { domain: 'delta.test', url: 'https://parley.delta.example:8443', via: 'dns' });
    assert.deepEqual(await d.discover('delta.test'), { domain: 'delta.test', url: 'https://parley.delta.example:8443', via: 'dns' });
    assert.equal(dnsQueries.filter((q) => q === '_parley.delta.test').length, 1);
    assert.deepEqual(wellKnownHits.filter((h) => h === 'delta.test'), [], 'DNS answered: no well-known fetch');
    clock += POSITIVE_TTL_MS + 1;
    await d.discover('delta.test');
    assert.equal(dnsQueries.filter((q) => q === '_parley.delta.test').length, 2, 'looked up again after the TTL');
  });

  it('falls back to https://<domain>/.well-known/parley/platform', async () => {
    documents.set('epsilon.test', [200, { platform: 'Epsilon.test', url: 'https://parley.epsilon.example/', keys_url: 'https://parley.epsilon.example/.well-known/parley/keys' }]);
    const d = discovery();
    assert.deepEqual(await d.discover('epsilon.test'), { domain: 'epsilon.test', url: 'https://parley.epsilon.example', via: 'well-known', platform: 'epsilon.test' });
    assert.deepEqual(dnsQueries.filter((q) => q === '_parley.epsilon.test'), ['_parley.epsilon.test'], 'DNS was asked first');
    documents.set('theta.test', [200, { platform: 'theta.test', url: 'ftp://nope.example' }]);
    assert.equal(await d.discover('theta.test'), null, 'a document without an http(s) url is no platform');
  });

  it('remembers "no platform" for the negative TTL, then asks again', async () => {
    txt.set('_parley.zeta.test', 'ENODATA');
    const d = discovery();
    assert.equal(await d.discover('zeta.test'), null);
    assert.equal(await d.discover('zeta.test'), null);
    assert.equal(dnsQueries.filter((q) => q === '_parley.zeta.test').length, 1);
    assert.equal(wellKnownHits.filter((h) => h === 'zeta.test').length, 1);
    documents.set('zeta.test', [200, { platform: 'zeta.test', url: 'https://parley.zeta.example' }]);
    clock += NEGATIVE_TTL_MS - 1000;
    assert.equal(await d.discover('zeta.test'), null, 'still cached');
    clock += 2000;
    assert.equal((await d.discover('zeta.test'))?.url, 'https://parley.zeta.example');
    assert.equal(wellKnownHits.filter((h) => h === 'zeta.test').length, 2);
  });

  it('a temporary failure is an error (not "no platform"), retried after a short while', async () => {
    txt.set('_parley.eta.test', 'ETIMEOUT');
    documents.set('eta.test', [503, { error: 'busy' }]);
    const d = discovery();
    await assert.rejects(d.discover('eta.test'), (e: unknown) => e instanceof DiscoveryUnavailable && /ETIMEOUT/.test(e.message) && /HTTP 503/.test(e.message));
    await assert.rejects(d.discover('eta.test'), DiscoveryUnavailable);
    assert.equal(wellKnownHits.filter((h) => h === 'eta.test').length, 1, 'the failure is remembered briefly');
    documents.set('eta.test', [200, { platform: 'eta.test', url: 'https://parley.eta.example' }]);
    clock += TEMPORARY_TTL_MS + 1;
    assert.equal((await d.discover('eta.test'))?.via, 'well-known');
  });

  it('parses TXT records strictly', () => {
    assert.equal(parseTxtRecord('v=parley1; url=https://p.example/'), 'https://p.example');
    assert.equal(parseTxtRecord('v=parley1;url=http://127.0.0.1:8080'), 'http://127.0.0.1:8080');
    assert.equal(parseTxtRecord('url=https://p.example; v=parley1'), null, 'the version comes first');
    assert.equal(parseTxtRecord('v=parley1; url=javascript:alert(1)'), null);
    assert.equal(parseTxtRecord('v=parley1'), null);
  });

  it('reads the static routes from PARLEY_FEDERATION_ROUTES (pairs or JSON) and validates them', () => {
    const pairs = loadConfig({ PARLEY_FEDERATION_ROUTES: 'Beta.test=http://127.0.0.1:8081, gamma.test=https://parley.gamma.example' }, undefined);
    assert.deepEqual(pairs.federationRoutes, { 'beta.test': 'http://127.0.0.1:8081', 'gamma.test': 'https://parley.gamma.example' });
    const json = loadConfig({ PARLEY_FEDERATION_ROUTES: '{"beta.test":"http://127.0.0.1:8081"}' }, undefined);
    assert.deepEqual(json.federationRoutes, { 'beta.test': 'http://127.0.0.1:8081' });
    assert.deepEqual(loadConfig({}, undefined).federationRoutes, {});
    assert.throws(() => loadConfig({ PARLEY_FEDERATION_ROUTES: 'beta.test=ftp://x' }, undefined), (e: unknown) => e instanceof ConfigError && /PARLEY_FEDERATION_ROUTES/.test(e.message));
    assert.throws(() => loadConfig({ PARLEY_FEDERATION_ROUTES: 'just-a-word' }, undefined), ConfigError);
  });
});
