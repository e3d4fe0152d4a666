import assert from 'node:assert/strict';
import { createSocket, type Socket } from 'node:dgram';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { createResolver, offlineResolver } from '../../src/mail/dns.ts';

/** How the test name server answers a query for a name (RFC 1035 §4.1). */
type Answer = { txt: string[][] } | 'nxdomain' | 'nodata' | 'silent';

/**
 * A minimal authoritative DNS server on loopback UDP: answers TXT queries from `zone`,
 * NXDOMAIN for unknown names, and counts the queries it receives per name.
 */
class TestNameServer {
  readonly queries = new Map<string, number>();
  private readonly socket: Socket = createSocket('udp4');

  constructor(private readonly zone: Record<string, Answer>) {
    this.socket.on('message', (query, peer) => {
      const { name, questionEnd } = readQuestion(query);
      this.queries.set(name, (this.queries.get(name) ?? 0) + 1);
      const answer = this.zone[name] ?? 'nxdomain';
      if (answer === 'silent') return;
      this.socket.send(buildResponse(query, questionEnd, answer), peer.port, peer.address);
    });
  }

  async start(): Promise<string> {
    await new Promise<void>((resolve) => this.socket.bind(0, '127.0.0.1', resolve));
    return `127.0.0.1:${this.socket.address().port}`;
  }

  close(): void {
    this.socket.close();
  }
}

function readQuestion(query: Buffer): { name: string; questionEnd: number } {
  const labels: string[] = [];
  let offset = 12;
  while (query[offset] !== 0) {
    labels.push(query.subarray(offset + 1, offset + 1 + query[offset]).toString('latin1'));
    offset += query[offset] + 1;
  }
  return { name: labels.join('.').toLowerCase(), questionEnd: offset + 1 + 4 };
}

function buildResponse(query: Buffer, questionEnd: number, answer: Exclude<Answer, 'silent'>): Buffer {
  const records = typeof answer === 'object' ? answer.txt : [];
  const header = Buffer.alloc(12);
  query.copy(header, 0, 0, 2); // id
  header.writeUInt16BE(0x8180 | (answer === 'nxdomain' ? 3 : 0), 2); // QR, RD, RA, RCODE
  header.writeUInt16BE(1, 4);
  header.writeUInt16BE(records.length, 6);
  const answers = records.map((strings) => {
    const rdata = Buffer.concat(strings.map((s) => Buffer.concat([Buffer.from([Buffer.byteLength(s)]), Buffer.from(s)])));
    const fixed = Buffer.alloc(12);
    fixed.writeUInt16BE(0xc00c, 0); // pointer to the question name
    fixed.writeUInt16BE(16, 2); // TXT
    fixed.writeUInt16BE(1, 4); // IN
    fixed.writeUInt32BE(300, 6);
    fixed.writeUInt16BE(rdata.length, 10);
    return Buffer.concat([fixed, rdata]);
  });
  return Buffer.concat([header, query.subarray(12, questionEnd), ...answers]);
}

describe('createResolver', () => {
  const server = new TestNameServer({
    'example.com': { txt: [['v=spf1 ', 'ip4:192.0.2.0/24 -all'], ['google-site-verification=x']] },
    'nodata.example.com': 'nodata',
    'slow.example.com': 'silent',
    'ttl.example.com': { txt: [['v=DMARC1; p=none']] },
    'nocache.example.com': { txt: [['x']] },
    'concurrent.example.com': { txt: [['y']] },
  });
  let address = '';
  before(async () => {
    address = await server.start();
  });
  after(() => server.close());

  test('resolves TXT records as string chunks, like dns.promises.resolve', async () => {
    const resolve = createResolver({ servers: [address] });
    assert.deepEqual(await resolve('example.com', 'TXT'), [['v=spf1 ', 'ip4:192.0.2.0/24 -all'], ['google-site-verification=x']]);
  });

  test('caches answers case-insensitively, including NXDOMAIN and NODATA', async () => {
    const resolve = createResolver({ servers: [address] });
    await resolve('Example.COM', 'TXT');
    await resolve('example.com', 'TXT');
    await assert.rejects(resolve('missing.example.com', 'TXT'), { code: 'ENOTFOUND' });
    await assert.rejects(resolve('missing.example.com', 'TXT'), { code: 'ENOTFOUND' });
    await assert.rejects(resolve('nodata.example.com', 'TXT'), { code: 'ENODATA' });
    await assert.rejects(resolve('nodata.example.com', 'TXT'), { code: 'ENODATA' });
    // the first test's resolver asked for example.com once too
    assert.equal(server.queries.get('example.com'), 2);
    assert.equal(server.queries.get('missing.example.com'), 1);
    assert.equal(server.queries.get('nodata.example.com'), 1);
  });

  test('cached answers expire after cacheTtlMs; 0 disables the cache', async () => {
    const resolve = createResolver({ servers: [address], cacheTtlMs: 50 });
    await resolve('ttl.example.com', 'TXT');
    await resolve('ttl.example.com', 'TXT');
    assert.equal(server.queries.get('ttl.example.com'), 1);
    await sleep(80);
    await resolve('ttl.example.com', 'TXT');
    assert.equal(server.queries.get('ttl.example.com'), 2);

    const uncached = createResolver({ servers: [address], cacheTtlMs: 0 });
    await uncached('nocache.example.com', 'TXT');
    await uncached('nocache.example.com', 'TXT');
    assert.equal(server.queries.get('nocache.example.com'), 2);
  });

  test('concurrent identical lookups share one query', async () => {
    const resolve = createResolver({ servers: [address] });
    const answers = await Promise.all([resolve('concurrent.example.com', 'TXT'), resolve('concurrent.example.com', 'TXT')]);
    assert.deepEqual(answers, [[['y']], [['y']]]);
    assert.equal(server.queries.get('concurrent.example.com'), 1);
  });

  test('a server that does not answer fails with ETIMEOUT after timeoutMs, and is asked again next time', async () => {
    const resolve = createResolver({ servers: [address], timeoutMs: 200 });
    const started = Date.now();
    await assert.rejects(resolve('slow.example.com', 'TXT'), { code: 'ETIMEOUT' });
    const elapsed = Date.now() - started;
    assert.ok(elapsed >= 150 && elapsed < 1500, `took ${elapsed} ms`);
    await assert.rejects(resolve('slow.example.com', 'TXT'), { code: 'ETIMEOUT' });
    assert.equal(server.queries.get('slow.example.com'), 2);
  });

  test('rejects an invalid server address', () => {
    assert.throws(() => createResolver({ servers: ['not an ip'] }));
  });
});

describe('offlineResolver', () => {
  test('fails every lookup at once with ENOTFOUND', async () => {
    for (const rrtype of ['TXT', 'A', 'AAAA', 'MX']) {
      await assert.rejects(offlineResolver('example.com', rrtype), (err: NodeJS.ErrnoException) => err.code === 'ENOTFOUND' && err.message.includes('example.com'));
    }
  });
});
