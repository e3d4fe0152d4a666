/**
 * Sender authentication of inbound mail: SPF (RFC 7208), DKIM (RFC 6376) and DMARC
 * (RFC 7489), evaluated by mailauth and summarised as Authentication-Results method
 * results (RFC 8601 §2.7).
 */
import { authenticate, type AuthStatus, type DKIMResult } from 'mailauth';
import type { MailResolver } from './dns.ts';

/** A method result as in Authentication-Results (RFC 8601 §2.7.1–2.7.3). */
export type AuthResult = 'pass' | 'fail' | 'softfail' | 'neutral' | 'none' | 'temperror' | 'permerror' | 'policy';

/** The SMTP session a message arrived in (RFC 5321). */
export interface SmtpSession {
  /** Client IP address (IPv4 or IPv6). */
  ip: string;
  /** Host name the client gave in EHLO/HELO. */
  helo: string;
  /** Reverse-path from MAIL FROM without angle brackets; '' for the null reverse-path of a bounce. */
  mailFrom: string;
  /** Host name of this MTA, written into the evaluation comments. */
  mta: string;
}

/** The outcome of {@link authenticateEmail}. */
export interface EmailAuthentication {
  /** SPF result for the MAIL FROM domain (or the HELO name for a null reverse-path). */
  spf: AuthResult;
  /** `pass` when any DKIM signature verifies, `none` when there is none, else the first signature's result. */
  dkim: AuthResult;
  /** DMARC result for the From domain. */
  dmarc: AuthResult;
  /** One sentence per result other than pass/none, saying what failed and why. */
  warnings: string[];
}

const KNOWN_RESULTS = new Set<string>(['pass', 'fail', 'softfail', 'neutral', 'none', 'temperror', 'permerror', 'policy']);

/** mailauth's status string as an RFC 8601 result (it also uses `temperr` and `skipped`). */
function toAuthResult(result: AuthStatus['result'] | undefined): AuthResult {
  if (result === 'temperr') return 'temperror';
  return result !== undefined && KNOWN_RESULTS.has(result) ? (result as AuthResult) : 'none';
}

const withReason = (sentence: string, reason: string | undefined): string => (reason ? `${sentence}: ${reason}` : sentence);

/**
 * Checks SPF, DKIM and DMARC for a received message. ARC and BIMI are not evaluated.
 *
 * Never throws: an internal error yields `temperror` for all three and a warning. How long
 * it takes is bounded by the resolver's timeouts (SPF may need up to 10 lookups).
 *
 * @param raw the message as received (header and body bytes unchanged)
 * @param session the SMTP session it arrived in
 * @param resolver DNS lookups, e.g. `createResolver()`, or `offlineResolver` without DNS
 */
export async function authenticateEmail(raw: Buffer, session: SmtpSession, resolver: MailResolver): Promise<EmailAuthentication> {
  try {
    const result = await authenticate(dkimInput(raw), {
      ip: session.ip,
      helo: session.helo,
      ...(session.mailFrom ? { sender: session.mailFrom } : {}),
      mta: session.mta,
      resolver,
      disableArc: true,
      disableBimi: true,
    });
    const warnings: string[] = [];

    const spf = result.spf ? toAuthResult(result.spf.status.result) : 'none';
    if (result.spf && spf !== 'pass' && spf !== 'none') warnings.push(withReason(`SPF ${spf} for ${result.spf.domain}`, result.spf.status.comment));

    const signatures = result.dkim.results.filter((r) => toAuthResult(r.status.result) !== 'none');
    const dkim = signatures.some((r) => r.status.result === 'pass') ? 'pass' : signatures.length > 0 ? toAuthResult(signatures[0].status.result) : 'none';
    if (dkim !== 'pass') warnings.push(...signatures.map(describeDkimFailure));

    let dmarc: AuthResult = 'none';
    if (result.dmarc) {
      dmarc = toAuthResult(result.dmarc.status.result);
      const domain = result.dmarc.domain;
      if (dmarc === 'fail') {
        warnings.push(`DMARC policy ${result.dmarc.policy ?? 'none'} failed for ${domain}: neither SPF nor DKIM passed for a domain aligned with From`);
      } else if (dmarc !== 'pass' && dmarc !== 'none') {
        warnings.push(withReason(`DMARC ${dmarc} for ${domain}`, result.dmarc.error));
      }
    } else if (result.dkim.headerFrom.length !== 1) {
      warnings.push(`DMARC was not evaluated: the message has ${result.dkim.headerFrom.length} From addresses instead of exactly one`);
    }
    return { spf, dkim, dmarc, warnings };
  } catch (err) {
    return {
      spf: 'temperror',
      dkim: 'temperror',
      dmarc: 'temperror',
      warnings: [`Sender authentication failed with an internal error: ${(err as Error).message}`],
    };
  }
}

/**
 * What mailauth needs to see of `raw`: all of it when its header section has a
 * DKIM-Signature field; else the header section alone (with its blank line). The body
 * matters only to the body hashes of DKIM signatures (RFC 6376 §3.7); SPF looks at the
 * session and DMARC at the From field, so for an unsigned message the results are the
 * same — and mailauth's pass over the body, a twentieth of the SMTP role's CPU per message
 * on the project machine's (unsigned) benchmark mail, is skipped.
 */
export function dkimInput(raw: Buffer): Buffer {
  let end = raw.indexOf('\r\n\r\n');
  let sep = 4;
  const lf = raw.indexOf('\n\n');
  if (lf >= 0 && (end < 0 || lf < end)) [end, sep] = [lf, 2];
  if (end < 0) return raw;
  const header = raw.subarray(0, end + sep);
  return /(^|\n)dkim-signature[ \t]*:/i.test(header.toString('latin1')) ? raw : header;
}

function describeDkimFailure(signature: DKIMResult): string {
  const by = `DKIM signature by ${signature.signingDomain} (selector ${signature.selector})`;
  const reason = signature.status.comment;
  switch (toAuthResult(signature.status.result)) {
    case 'fail':
      return withReason(`${by} did not verify`, reason);
    case 'neutral':
      return withReason(`${by} could not be verified`, reason);
    case 'temperror':
      return withReason(`${by} could not be checked for now`, reason);
    case 'policy':
      return withReason(`${by} was refused by local policy`, signature.status.policy?.['dkim-rules']);
    default:
      return withReason(`${by} is invalid`, reason);
  }
}
