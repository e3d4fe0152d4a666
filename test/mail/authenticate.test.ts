import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { describe, test } from 'node:test';
import { authenticateEmail, dkimInput, type SmtpSession } from '../../src/mail/authenticate.ts';
import { offlineResolver, type MailResolver } from '../../src/mail/dns.ts';

const fixture = (name: string): Buffer => readFileSync(new URL(`../fixtures/mail/${name}`, import.meta.url));

/**
 * DNS for football.example.com, the domain of the RFC 6376 example message: the DKIM keys
 * the python-dkim test vectors were signed with (selector `test`: RSA, selector `brisbane`:
 * the ed25519 key of RFC 8463 Appendix A), an SPF record for 192.0.2.0/24 and a DMARC
 * reject policy. Unknown names do not exist.
 */
function footballZone(): { resolver: MailResolver; lookups: string[] } {
  const zone: Record<string, string> = {
    'TXT test._domainkey.football.example.com': fixture('python-dkim-test.txt').toString().trim(),
    'TXT brisbane._domainkey.football.example.com': fixture('python-dkim-ed25519test.dns').toString().trim(),
    'TXT football.example.com': 'v=spf1 ip4:192.0.2.0/24 -all',
    'TXT _dmarc.football.example.com': 'v=DMARC1; p=reject',
  };
  const lookups: string[] = [];
  const resolver: MailResolver = async (name, rrtype) => {
    lookups.push(`${rrtype} ${name}`);
    const record = zone[`${rrtype} ${name}`];
    if (record === undefined) throw Object.assign(new Error(`query${rrtype} ENOTFOUND ${name}`), { code: 'ENOTFOUND' });
    return [[record]];
  };
  return { resolver, lookups };
}

const session = (ip: string): SmtpSession => ({ ip, helo: 'mail.football.example.com', mailFrom: 'joe@football.example.com', mta: 'mx.parley.test' });
const signed = fixture('python-dkim-rfc6376.signed.msg');

describe('authenticateEmail', () => {
  test('SPF, DKIM (RSA and ed25519) and DMARC pass for the RFC 6376 example from an authorised host', async () => {
    const { resolver, lookups } = footballZone();
    assert.deepEqual(await authenticateEmail(signed, session('192.0.2.1'), resolver), { spf: 'pass', dkim: 'pass', dmarc: 'pass', warnings: [] });
    assert.ok(lookups.includes('TXT brisbane._domainkey.football.example.com'));
    assert.ok(lookups.includes('TXT test._domainkey.football.example.com'));
  });

  test('from an unauthorised host SPF fails, but the aligned DKIM signature still passes DMARC', async () => {
    const result = await authenticateEmail(signed, session('198.51.100.7'), footballZone().resolver);
    assert.equal(result.spf, 'fail');
    assert.equal(result.dkim, 'pass');
    assert.equal(result.dmarc, 'pass');
    assert.equal(result.warnings.length, 1);
    assert.match(result.warnings[0], /^SPF fail for football\.example\.com: .*does not designate 198\.51\.100\.7 as permitted sender/);
  });

  test('a modified body breaks both signatures and, with SPF failing too, DMARC', async () => {
    const tampered = Buffer.from(signed.toString('latin1').replace('Are you hungry yet?', 'Are you angry yet?'), 'latin1');
    const result = await authenticateEmail(tampered, session('198.51.100.7'), footballZone().resolver);
    assert.equal(result.spf, 'fail');
    assert.notEqual(result.dkim, 'pass');
    assert.notEqual(result.dkim, 'none');
    assert.equal(result.dmarc, 'fail');
    const dkimWarnings = result.warnings.filter((w) => w.startsWith('DKIM signature by football.example.com'));
    assert.equal(dkimWarnings.length, 2, result.warnings.join('\n'));
    assert.ok(dkimWarnings.every((w) => /body hash did not verify/.test(w)), dkimWarnings.join('\n'));
    assert.ok(result.warnings.some((w) => /^DMARC policy reject failed for /.test(w)), result.warnings.join('\n'));
  });

  test('without DNS everything is none or neutral, quickly', async () => {
    const started = Date.now();
    const result = await authenticateEmail(signed, session('192.0.2.1'), offlineResolver);
    assert.ok(Date.now() - started < 2000);
    assert.equal(result.spf, 'none');
    assert.equal(result.dkim, 'neutral');
    assert.equal(result.dmarc, 'none');
    assert.ok(result.warnings.every((w) => /^DKIM signature by football\.example\.com \(selector (test|brisbane)\) could not be verified: no key$/.test(w)), result.warnings.join('\n'));
  });

  test('an unsigned message from a domain without records is none throughout, without warnings', async () => {
    const unsigned = fixture('easy_ham-1509-thread-parent.eml');
    assert.deepEqual(await authenticateEmail(unsigned, { ...session('192.0.2.1'), mailFrom: 'whisper@oz.net' }, offlineResolver), {
      spf: 'none',
      dkim: 'none',
      dmarc: 'none',
      warnings: [],
    });
  });

  test('a bounce (null reverse-path) is checked against the HELO name', async () => {
    const { resolver, lookups } = footballZone();
    const result = await authenticateEmail(signed, { ...session('192.0.2.1'), mailFrom: '' }, resolver);
    assert.equal(result.spf, 'none'); // mail.football.example.com publishes no SPF record
    assert.ok(lookups.includes('TXT mail.football.example.com'), lookups.join(', '));
  });

  test('DMARC is not evaluated for a message with two From addresses', async () => {
    const raw = Buffer.from('From: a@example.org, b@example.net\r\nSubject: x\r\n\r\nx\r\n');
    const result = await authenticateEmail(raw, session('192.0.2.1'), offlineResolver);
    assert.equal(result.dmarc, 'none');
    assert.deepEqual(result.warnings, ['DMARC was not evaluated: the message has 2 From addresses instead of exactly one']);
  });

  test('DNS failures are temperror with a reason', async () => {
    const failing: MailResolver = async () => {
      throw Object.assign(new Error('queryTxt ETIMEOUT'), { code: 'ETIMEOUT' });
    };
    const result = await authenticateEmail(signed, session('192.0.2.1'), failing);
    assert.equal(result.spf, 'temperror');
    assert.equal(result.dkim, 'temperror');
    assert.equal(result.dmarc, 'temperror');
    assert.ok(result.warnings.some((w) => /^SPF temperror for football\.example\.com: .*DNS timeout/.test(w)), result.warnings.join('\n'));
  });

  test('never throws: an internal error becomes temperror with a warning', async () => {
    const result = await authenticateEmail(null as unknown as Buffer, session('192.0.2.1'), offlineResolver);
    assert.equal(result.spf, 'temperror');
    assert.equal(result.dkim, 'temperror');
    assert.equal(result.dmarc, 'temperror');
    assert.match(result.warnings[0], /^Sender authentication failed with an internal error: /);
  });

  test('an unsigned message is judged on its header section: the same results whatever its body', async () => {
    const { resolver } = footballZone();
    const head = 'From: Joe <joe@football.example.com>\r\nTo: suzie@shopping.example.net\r\nSubject: Is dinner ready?\r\n\r\n';
    const a = Buffer.from(head + 'Hi.\r\n\r\nWe lost the game.\r\n');
    const b = Buffer.from(head + 'x'.repeat(200_000) + '\r\n');
    for (const ip of ['192.0.2.1', '198.51.100.7']) {
      const [ra, rb] = [await authenticateEmail(a, session(ip), resolver), await authenticateEmail(b, session(ip), resolver)];
      assert.deepEqual(ra, rb);
      assert.equal(ra.dkim, 'none');
    }
    // From an unauthorised host: SPF fails and, unsigned, so does DMARC (p=reject).
    assert.equal((await authenticateEmail(a, session('198.51.100.7'), resolver)).dmarc, 'fail');
  });
});

describe('dkimInput', () => {
  test('a signed message goes whole; an unsigned one as its header section with the blank line', () => {
    assert.equal(dkimInput(signed), signed);
    const unsigned = Buffer.from('From: a@example.org\r\nX-DKIM-Signature: not one\r\nSubject: s\r\n\r\nbody\r\n\r\nmore\r\n');
    assert.equal(dkimInput(unsigned).toString(), 'From: a@example.org\r\nX-DKIM-Signature: not one\r\nSubject: s\r\n\r\n');
    const bare = Buffer.from('From: a@example.org\nDKIM-Signature: v=1; a=rsa-sha256; d=example.org\n\nbody\n');
    assert.equal(dkimInput(bare), bare, 'any case, LF line ends');
    const headOnly = Buffer.from('From: a@example.org\r\nSubject: s\r\n');
    assert.equal(dkimInput(headOnly), headOnly, 'no body at all');
  });
});
