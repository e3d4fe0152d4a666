/**
 * signedRequest (src/federation/client.ts): the signed requests of pushes, proposals and
 * backfill pages over kept-alive node:http connections. Against a plain node:http server
 * standing in for a peer: what it sends, connection reuse, the single re-signed retry when a
 * kept-alive connection turns out closed, and failures (no retry on a fresh connection, a
 * timeout, an answer cut short).
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { tmpdir } from 'node:os';
import { createTestDatabase } from '../support/db.ts';
import { loadConfig } from '../../src/platform/config.ts';
import { createLogger } from '../../src/platform/logger.ts';
import { systemClock } from '../../src/platform/clock.ts';
import { BlobStore } from '../../src/platform/blobs.ts';
import { openDb, type Db } from '../../src/store/db.ts';
import { migrate } from '../../src/store/migrate.ts';
import type { Deps } from '../../src/context.ts';
import { signedRequest } from '../../src/federation/client.ts';

/** What the stand-in peer saw of one request. */
interface Seen {
  method: string;
  url: string;
  port: number;
  headers: IncomingMessage['headers'];
  body: string;
}

describe('signedRequest: signed requests over kept-alive connections', () => {
  let db: Db;
  let drop: () => Promise<void>;
  let deps: Deps;
  let server: Server;
  let base: string;
  const seen: Seen[] = [];
  /** How the peer answers the next requests (default: 200 with a small JSON body). */
  let behave: (req: IncomingMessage, res: ServerResponse, n: number) => void;

  before(async () => {
    const d = await createTestDatabase();
    drop = d.drop;
    db = openDb(d.url, 2);
    await migrate(db.pool);
    const dataDir = join(tmpdir(), 'parley-client-test');
    const config = loadConfig({}, undefined, { domains: ['alpha.test'], databaseUrl: d.url, dataDir, dnsOffline: true, logLevel: 'warn' });
    deps = { db, config, log: createLogger('test', 'warn'), clock: systemClock, blobs: new BlobStore(join(dataDir, 'blobs')) };
    server = createServer((req, res) => {
      const chunks: Buffer[] = [];
      req.on('data', (c: Buffer) => chunks.push(c));
      req.on('end', () => {
        seen.push({ method: req.method!, url: req.url!, port: req.socket.remotePort!, headers: req.headers, body: Buffer.concat(chunks).toString('utf8') });
        behave(req, res, seen.length);
      });
    });
    server.keepAliveTimeout = 60_000;
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  });

  after(async () => {
    server.closeAllConnections();
    await new Promise((r) => server.close(r));
    await db.close();
    await drop();
  });

  const answer = (status: number, text: string) => (_req: IncomingMessage, res: ServerResponse) => {
    res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
    res.end(text);
  };

  it('sends the body with Content-Digest and a signature, answers status and text, and reuses the connection', async () => {
    seen.length = 0;
    behave = answer(200, '{"results":[]}');
    const body = '{"conversations":[{"key":"k","actions":[]}]}';
    const first = await signedRequest(deps, `${base}/federation/v1/push`, { body, headers: { 'content-type': 'application/json' } });
    const second = await signedRequest(deps, `${base}/federation/v1/conversations/k/actions?since=3&limit=500`);
    assert.deepEqual(first, { status: 200, text: '{"results":[]}' });
    assert.deepEqual(second, { status: 200, text: '{"results":[]}' });
    assert.equal(seen.length, 2);
    assert.equal(seen[0].method, 'POST');
    assert.equal(seen[0].url, '/federation/v1/push');
    assert.equal(seen[0].body, body);
    assert.equal(seen[0].headers['content-type'], 'application/json');
    assert.equal(seen[0].headers['content-digest'], `sha-256=:${createHash('sha256').update(body).digest('base64')}:`);
    assert.match(String(seen[0].headers['signature-input']), /^parley=\("@method" "@target-uri" "content-digest"\);created=\d+;keyid="alpha\.test#[A-Za-z0-9_-]+";alg="ed25519";nonce="[^"]+"$/);
    assert.match(String(seen[0].headers.signature), /^parley=:[A-Za-z0-9+/]{86}==:$/);
    assert.equal(seen[1].method, 'GET');
    assert.equal(seen[1].url, '/federation/v1/conversations/k/actions?since=3&limit=500');
    assert.equal(seen[1].headers['content-digest'], `sha-256=:${createHash('sha256').update('').digest('base64')}:`);
    assert.equal(seen[1].port, seen[0].port, 'the second request went over the kept-alive connection of the first');
  });

  it('a request that meets a kept-alive connection the peer closed is signed again and sent once more on a new one', async () => {
    seen.length = 0;
    behave = answer(200, '{"last_id":1}');
    await signedRequest(deps, `${base}/federation/v1/ping`, { json: { n: 1 } });
    // The next request on that connection finds it cut without an answer, as when the peer
    // closes an idle connection just as a request goes out on it; the retry is answered.
    behave = (req, res, n) => (n === 2 ? req.socket.destroy() : answer(200, '{"last_id":2}')(req, res));
    const r = await signedRequest(deps, `${base}/federation/v1/ping`, { json: { n: 2 } });
    assert.deepEqual(r, { status: 200, text: '{"last_id":2}' });
    assert.equal(seen.length, 3);
    assert.equal(seen[1].port, seen[0].port, 'the first attempt went over the kept-alive connection');
    assert.notEqual(seen[2].port, seen[1].port, 'the retry went over a new connection');
    assert.equal(seen[2].body, seen[1].body);
    assert.notEqual(seen[2].headers['signature-input'], seen[1].headers['signature-input'], 're-signed: a new nonce');
  });

  it('a request cut on a new connection is not sent again: the caller gets the error', async () => {
    // A peer of its own (a new port): the request cannot go over a kept-alive connection.
    let attempts = 0;
    const cutter = createServer((req) => {
      attempts++;
      req.socket.destroy();
    });
    await new Promise<void>((r) => cutter.listen(0, '127.0.0.1', r));
    try {
      await assert.rejects(signedRequest(deps, `http://127.0.0.1:${(cutter.address() as AddressInfo).port}/federation/v1/ping`, { json: { n: 3 } }));
      assert.equal(attempts, 1);
    } finally {
      cutter.closeAllConnections();
      await new Promise((r) => cutter.close(r));
    }
  });

  it('fails with a TimeoutError when no complete answer comes within timeoutMs, and when the answer is cut short', async () => {
    seen.length = 0;
    behave = () => {}; // never answers
    await assert.rejects(signedRequest(deps, `${base}/federation/v1/ping`, { json: { n: 4 }, timeoutMs: 200 }), { name: 'TimeoutError' });
    behave = (req, res) => {
      res.writeHead(200, { 'content-type': 'application/json', 'content-length': 100 });
      res.write('{"last_id":');
      setImmediate(() => req.socket.destroy());
    };
    await assert.rejects(signedRequest(deps, `${base}/federation/v1/ping`, { json: { n: 5 } }));
  });
});
