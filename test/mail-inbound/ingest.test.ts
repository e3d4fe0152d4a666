// ingestEmail called directly (the command behind the SMTP server and `parley import`):
// sender authentication results kept as warnings (with a resolver standing in for DNS), and
// a sender removed from a conversation cannot write into it by email.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { promises as dns } from 'node:dns';
import { ingestEmail } from '../../src/mail/inbound/ingest-email.ts';
import type { MailResolver } from '../../src/mail/dns.ts';
import { type ApiClient, type TestPlatform, startTestPlatform } from '../support/platform.ts';

/** A resolver that knows one SPF record and nothing else. */
const resolver: MailResolver = async (name, rrtype) => {
  if (rrtype === 'TXT' && name === 'example.net') return [['v=spf1 ip4:192.0.2.1 -all']];
  throw Object.assign(new Error(`query${rrtype} ENOTFOUND ${name}`), { code: dns.NOTFOUND });
};

describe('ingestEmail', () => {
  let tp: TestPlatform;
  let alice: ApiClient;
  before(async () => {
    tp = await startTestPlatform({}, ['web']);
    alice = await tp.user('alice@alpha.test');
  });
  after(async () => tp.stop());

  it('keeps SPF/DKIM/DMARC results as warnings on the message and on the inbound record', async () => {
    const raw = Buffer.from(
      'From: Zed <zed@example.net>\r\nTo: alice@alpha.test\r\nSubject: Forged?\r\nMessage-ID: <spf@example.net>\r\n' +
        'DKIM-Signature: v=1; a=rsa-sha256; d=example.net; s=sel; h=from:subject; bh=AAAA; b=AAAA\r\n\r\nHello.\r\n',
    );
    const r = await ingestEmail(tp.platform.deps, raw, { mailFrom: 'zed@example.net', rcptTo: ['alice@alpha.test'], remoteIp: '203.0.113.9', helo: 'mx.example.org' }, { resolver });
    assert.equal(r.status, 'ingested', r.reason);
    const conv = await alice.get(`/api/conversations/${r.created[0]}`);
    const warnings: string[] = conv.body.messages[0].source.warnings;
    assert.ok(warnings.some((w) => /^SPF fail for example\.net/.test(w)), JSON.stringify(warnings));
    assert.ok(warnings.some((w) => /^DKIM signature by example\.net/.test(w)), JSON.stringify(warnings));
    const row = await tp.platform.deps.db.kysely.selectFrom('inbound_emails').select(['status', 'auth']).where('id', '=', r.inboundId).executeTakeFirstOrThrow();
    assert.equal(row.status, 'ingested');
    assert.equal(row.auth.spf, 'fail');
  });

  it('refuses, keeping the raw message, a reply by a sender who was removed from the conversation', async () => {
    const created = await alice.post('/api/conversations', { subject: 'Members only', participants: ['yan@example.org'], messages: [{ body: 'Hi Yan' }] });
    const key = created.body.key;
    const yan = created.body.actions.find((a: any) => a.act === 'participant:add' && a.participant === 'yan@example.org');
    const removed = await alice.post(`/api/conversations/${key}/actions`, { actions: [{ act: 'participant:remove', participant: 'yan@example.org', follows: yan.id }] });
    assert.equal(removed.status, 200, JSON.stringify(removed.body));
    const raw = Buffer.from(`From: yan@example.org\r\nTo: reply+${key}@alpha.test\r\nSubject: Re: Members only\r\nMessage-ID: <yan-back@example.org>\r\n\r\nLet me back in.\r\n`);
    const r = await ingestEmail(tp.platform.deps, raw, { mailFrom: 'yan@example.org', rcptTo: [`reply+${key}@alpha.test`], remoteIp: '127.0.0.1', helo: 'x' });
    assert.equal(r.status, 'failed');
    assert.equal(r.permanent, true);
    assert.match(r.reason ?? '', /yan@example\.org was removed from conversation/);
    const conv = await alice.get(`/api/conversations/${key}`);
    assert.equal(conv.body.messages.length, 1);
    const row = await tp.platform.deps.db.kysely.selectFrom('inbound_emails').select(['status', 'raw_sha256', 'error']).where('id', '=', r.inboundId).executeTakeFirstOrThrow();
    assert.equal(row.status, 'failed');
    assert.ok(tp.platform.deps.blobs.has(row.raw_sha256));
  });
});
