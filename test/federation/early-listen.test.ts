import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { request } from 'node:http';
import { listenEarly } from '../../src/http/early.ts';
import { startTestPlatform, type TestPlatform } from '../support/platform.ts';

/** Polls `fn` until it is true (10 s at most). */
async function until(fn: () => boolean): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (!fn()) {
    if (Date.now() > deadline) throw new Error('condition not met within 10 s');
    await new Promise((r) => setImmediate(r));
  }
}

/** A GET on its own connection: status, headers and body text. */
function get(port: number, path: string): Promise<{ status: number; headers: Record<string, unknown>; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port, path, agent: false }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d) => (body += d));
      res.on('end', () => resolve({ status: res.statusCode!, headers: res.headers, body }));
    });
    req.on('error', reject);
    req.end();
  });
}

describe('the web port before the API is built (src/http/early.ts; issue 3, Done means 5)', () => {
  let tp: TestPlatform;
  before(async () => {
    tp = await startTestPlatform({}, ['web']);
  });
  after(async () => {
    await tp.stop();
  });

  it('serves the keys and discovery documents as the API does, holds every other request until the API takes over, in order', async () => {
    const early = await listenEarly(tp.platform.deps, '127.0.0.1', 0);
    try {
      let answered = false;
      const held = get(early.port, '/api/conversations').then((r) => ((answered = true), r));
      await until(() => early.held() === 1);
      const keys = await get(early.port, '/.well-known/parley/keys');
      const apiKeys = await get(tp.platform.httpPort!, '/.well-known/parley/keys');
      assert.equal(keys.status, 200);
      assert.deepEqual(JSON.parse(keys.body), JSON.parse(apiKeys.body));
      assert.equal(keys.headers['cache-control'], apiKeys.headers['cache-control']);
      assert.match(String(keys.headers['content-type']), /^application\/json/);
      const platform = await get(early.port, '/.well-known/parley/platform');
      assert.deepEqual(JSON.parse(platform.body), JSON.parse((await get(tp.platform.httpPort!, '/.well-known/parley/platform')).body));
      // Nothing else is answered before the hand-over: not even a refusal.
      assert.equal(answered, false);
      const seen: string[] = [];
      early.handOver((req, res) => {
        seen.push(req.url!);
        res.statusCode = 401;
        res.end('by the API');
      });
      const r = await held;
      assert.equal(r.status, 401);
      assert.equal(r.body, 'by the API');
      // After the hand-over the API answers everything, the keys document too.
      await get(early.port, '/.well-known/parley/keys');
      assert.deepEqual(seen, ['/api/conversations', '/.well-known/parley/keys']);
    } finally {
      await early.close();
    }
  });

  it('answers the held requests 503 when the API cannot be built', async () => {
    const early = await listenEarly(tp.platform.deps, '127.0.0.1', 0);
    const held = get(early.port, '/health');
    await until(() => early.held() === 1);
    await early.abort();
    const r = await held;
    assert.equal(r.status, 503);
    assert.equal(JSON.parse(r.body).error.code, 'unavailable');
  });
});
