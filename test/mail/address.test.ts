import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { domainOf, formatAddress, isValidAddress, normalizeAddress } from '../../src/mail/address.ts';

describe('normalizeAddress', () => {
  test('trims, strips angle brackets and lower-cases the whole address', () => {
    assert.equal(normalizeAddress('  <Ann.Example@Mail.Example.COM>  '), 'ann.example@mail.example.com');
    assert.equal(normalizeAddress('Bob+Tag@EXAMPLE.org'), 'bob+tag@example.org');
  });

  test('keeps internationalised addresses (RFC 6532), in NFC', () => {
    assert.equal(normalizeAddress('JÜRGEN@Bücher.example'), 'jürgen@bücher.example');
    // "e" + combining acute accent becomes the precomposed "é"
    assert.equal(normalizeAddress('Rene\u0301@example.fr'), 'ren\u00e9@example.fr');
  });

  test('accepts quoted local parts and address literals', () => {
    assert.equal(normalizeAddress('"john doe"@example.com'), '"john doe"@example.com');
    assert.equal(normalizeAddress('postmaster@[192.0.2.1]'), 'postmaster@[192.0.2.1]');
    assert.equal(normalizeAddress('postmaster@[IPv6:2001:db8::1]'), 'postmaster@[ipv6:2001:db8::1]');
  });

  test('throws a message that quotes the input and says what is wrong', () => {
    assert.throws(() => normalizeAddress('ydefmail.com'), /Invalid email address "ydefmail\.com": it has no "@"/);
    assert.throws(() => normalizeAddress('@example.com'), /local part before "@" is empty/);
    assert.throws(() => normalizeAddress('ann@'), /domain is empty/);
    assert.throws(() => normalizeAddress('ann..b@example.com'), /neither a dot-atom nor a quoted string/);
    assert.throws(() => normalizeAddress('ann@exa mple.com'), /not allowed in a host name/);
    assert.throws(() => normalizeAddress('ann@-example.com'), /not allowed in a host name/);
    assert.throws(() => normalizeAddress('ann@example..com'), /empty label/);
    assert.throws(() => normalizeAddress('Ann <ann@example.com>'), /Invalid email address/);
    assert.throws(() => normalizeAddress(`${'a'.repeat(65)}@example.com`), /longer than 64 octets/);
    assert.throws(() => normalizeAddress(`ann@${'a'.repeat(64)}.com`), /longer than 63 octets/);
    assert.throws(() => normalizeAddress('ann@[300.1.1.1]'), /not a valid address literal/);
  });
});

describe('isValidAddress', () => {
  test('agrees with normalizeAddress without throwing', () => {
    for (const valid of ['a@b', 'a.b-c_d+e@sub.example.co.uk', "o'brien@example.ie", '<x@y.z>', 'zzzz@localhost']) {
      assert.equal(isValidAddress(valid), true, valid);
    }
    for (const invalid of ['', 'plain', 'a@b@c', 'a@b..c', '.a@b.c', 'a.@b.c', 'a b@c.d', 'a@b_c.d']) {
      assert.equal(isValidAddress(invalid), false, invalid);
    }
  });
});

describe('domainOf', () => {
  test('returns the lower-cased domain', () => {
    assert.equal(domainOf('Ann@Example.COM'), 'example.com');
    assert.equal(domainOf('"a@b"@example.net'), 'example.net');
  });

  test('throws for an invalid address', () => {
    assert.throws(() => domainOf('no-at-sign'), /Invalid email address/);
  });
});

describe('formatAddress', () => {
  test('bare address when there is no name', () => {
    assert.equal(formatAddress({ address: 'ann@example.com', name: '' }), 'ann@example.com');
    assert.equal(formatAddress({ address: '<ann@example.com>' }), 'ann@example.com');
  });

  test('atoms as they are, specials in a quoted string with escapes', () => {
    assert.equal(formatAddress({ address: 'ann@example.com', name: 'Ann  Example' }), 'Ann Example <ann@example.com>');
    assert.equal(formatAddress({ address: 'ann@example.com', name: 'Example, Ann' }), '"Example, Ann" <ann@example.com>');
    assert.equal(formatAddress({ address: 'ann@example.com', name: 'Ann "the" \\Boss' }), '"Ann \\"the\\" \\\\Boss" <ann@example.com>');
  });

  test('non-ASCII names as RFC 2047 encoded-words', () => {
    assert.equal(formatAddress({ address: 'j@example.de', name: 'Jürgen' }), '=?UTF-8?Q?J=C3=BCrgen?= <j@example.de>');
  });

  test('throws for an invalid address', () => {
    assert.throws(() => formatAddress({ address: 'nope', name: 'X' }), /Invalid email address "nope"/);
  });
});
