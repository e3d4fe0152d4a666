/**
 * Email addresses: validation, normalisation and header formatting.
 *
 * Terms follow RFC 5322 §3.4: a *mailbox* is an optional display name plus an
 * *addr-spec* (`local-part@domain`). Internationalised addresses (UTF-8 in the
 * local part and domain, RFC 6532 §3.2) are accepted.
 */
import { isIP } from 'node:net';
import { encodeWord } from 'nodemailer/lib/mime-funcs';

/**
 * A mailbox (RFC 5322 §3.4): an addr-spec and its display name.
 *
 * `address` is an addr-spec without angle brackets (after `parseEmail`, normalised by
 * {@link normalizeAddress}); `name` is the decoded display name, `''` when absent.
 */
export interface Mailbox {
  address: string;
  name: string;
}

/** RFC 5321 §4.5.3.1: limits in octets of the UTF-8 encoding. */
const MAX_LOCAL_PART_OCTETS = 64;
const MAX_DOMAIN_OCTETS = 255;
const MAX_LABEL_OCTETS = 63;
const MAX_ADDRESS_OCTETS = 254;

/** atext (RFC 5322 §3.2.3) extended with any non-ASCII character (RFC 6532 §3.2). */
const ATEXT = "[A-Za-z0-9!#$%&'*+\\-/=?^_`{|}~\\u{80}-\\u{10FFFF}]";
const DOT_ATOM_LOCAL_PART = new RegExp(`^${ATEXT}+(?:\\.${ATEXT}+)*$`, 'u');
/** quoted-string (RFC 5322 §3.2.4): qtext or quoted-pair between double quotes. */
const QUOTED_LOCAL_PART = /^"(?:[\x20\x21\x23-\x5B\x5D-\x7E\u{80}-\u{10FFFF}]|\\[\x20-\x7E])*"$/u;
/** A host name label (RFC 1035 §2.3.1 letter-digit-hyphen, or a Unicode U-label). */
const DOMAIN_LABEL = /^[A-Za-z0-9\u{80}-\u{10FFFF}](?:[A-Za-z0-9\u{80}-\u{10FFFF}-]*[A-Za-z0-9\u{80}-\u{10FFFF}])?$/u;
/** A display name that can be written as a phrase of atoms without quoting. */
const PLAIN_PHRASE = /^[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~ ]+$/;

const octets = (s: string): number => Buffer.byteLength(s, 'utf8');

/** Why `domain` is not a valid RFC 5322 domain (dot-atom or domain-literal), or null. */
function domainProblem(domain: string): string | null {
  if (domain === '') return 'the domain is empty';
  if (octets(domain) > MAX_DOMAIN_OCTETS) return `the domain is longer than ${MAX_DOMAIN_OCTETS} octets`;
  if (domain.startsWith('[')) {
    const literal = /^\[(?:IPv6:)?([^\]]+)\]$/i.exec(domain);
    const isIPv6Literal = /^\[IPv6:/i.test(domain);
    if (!literal || isIP(literal[1]) !== (isIPv6Literal ? 6 : 4)) return `"${domain}" is not a valid address literal`;
    return null;
  }
  for (const label of domain.split('.')) {
    if (label === '') return 'the domain has an empty label';
    if (octets(label) > MAX_LABEL_OCTETS) return `the domain label "${label}" is longer than ${MAX_LABEL_OCTETS} octets`;
    if (!DOMAIN_LABEL.test(label)) return `the domain label "${label}" contains characters not allowed in a host name`;
  }
  return null;
}

/** Why `addrSpec` (no angle brackets, already trimmed) is not a valid addr-spec, or null. */
function addrSpecProblem(addrSpec: string): string | null {
  const at = addrSpec.lastIndexOf('@');
  if (at < 0) return 'it has no "@"';
  const localPart = addrSpec.slice(0, at);
  const domain = addrSpec.slice(at + 1);
  if (localPart === '') return 'the local part before "@" is empty';
  if (octets(localPart) > MAX_LOCAL_PART_OCTETS) return `the local part is longer than ${MAX_LOCAL_PART_OCTETS} octets`;
  if (!DOT_ATOM_LOCAL_PART.test(localPart) && !QUOTED_LOCAL_PART.test(localPart)) {
    return `the local part "${localPart}" is neither a dot-atom nor a quoted string`;
  }
  if (octets(addrSpec) > MAX_ADDRESS_OCTETS) return `it is longer than ${MAX_ADDRESS_OCTETS} octets`;
  return domainProblem(domain);
}

/** Trims `s` and removes one pair of enclosing angle brackets (`<a@b>` → `a@b`). */
function unbracket(s: string): string {
  const trimmed = s.trim();
  return trimmed.startsWith('<') && trimmed.endsWith('>') ? trimmed.slice(1, -1).trim() : trimmed;
}

/**
 * Whether `s` is a valid addr-spec (RFC 5322 §3.4.1, with RFC 6532 UTF-8), optionally
 * surrounded by whitespace and one pair of angle brackets. Display names (`Ann <a@b>`)
 * are not accepted here. Lengths are checked against RFC 5321 §4.5.3.1 (local part
 * ≤ 64 octets, whole address ≤ 254 octets). Never throws.
 */
export function isValidAddress(s: string): boolean {
  return addrSpecProblem(unbracket(s)) === null;
}

/**
 * Normalises an addr-spec for storage and comparison: trims, strips one pair of angle
 * brackets, applies Unicode NFC and lower-cases the whole address.
 *
 * Lower-casing the local part is a deliberate policy: RFC 5321 §2.4 lets the receiving
 * host treat it case-sensitively, but in practice no mail system does, and one canonical
 * form per person matters more to Parley.
 *
 * @throws Error when `s` is not a valid addr-spec; the message quotes the input and says why.
 */
export function normalizeAddress(s: string): string {
  const addrSpec = unbracket(s).normalize('NFC');
  const problem = addrSpecProblem(addrSpec);
  if (problem !== null) throw new Error(`Invalid email address "${s}": ${problem}`);
  return addrSpec.toLowerCase();
}

/**
 * The domain part of an address (RFC 5322 §3.4.1), normalised like
 * {@link normalizeAddress}: `domainOf('Ann@Example.COM')` is `'example.com'`.
 *
 * @throws Error when `addr` is not a valid addr-spec.
 */
export function domainOf(addr: string): string {
  const normalized = normalizeAddress(addr);
  return normalized.slice(normalized.lastIndexOf('@') + 1);
}

/**
 * Formats a mailbox as an RFC 5322 §3.4 `name-addr` for a header field:
 * `Ann Example <ann@example.com>`, `"Example, Ann" <ann@example.com>` when the name needs
 * quoting, an RFC 2047 encoded-word for non-ASCII names, and the bare address when the
 * name is empty. Whitespace runs in the name collapse to one space. The address is
 * written as given (not lower-cased).
 *
 * @throws Error when `mailbox.address` is not a valid addr-spec.
 */
export function formatAddress(mailbox: { address: string; name?: string }): string {
  const address = unbracket(mailbox.address);
  const problem = addrSpecProblem(address);
  if (problem !== null) throw new Error(`Invalid email address "${mailbox.address}": ${problem}`);
  const name = (mailbox.name ?? '').replace(/\s+/g, ' ').trim();
  if (name === '') return address;
  return `${formatDisplayName(name)} <${address}>`;
}

/** A display name as an RFC 5322 phrase: atoms, a quoted-string or RFC 2047 encoded-words. */
function formatDisplayName(name: string): string {
  if (PLAIN_PHRASE.test(name)) return name;
  if (/^[\x20-\x7E]*$/.test(name)) return `"${name.replace(/["\\]/g, '\\$&')}"`;
  return encodeWord(name, 'Q', 52);
}
