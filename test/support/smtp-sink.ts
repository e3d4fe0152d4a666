/**
 * A tiny in-process SMTP server (the `smtp-server` package) for tests: it records every
 * message it accepts (envelope + raw bytes) and can be switched, at runtime, to reject
 * transactions with a given reply code (e.g. 451 to make a relaying Postfix defer).
 * Listens on loopback only; no STARTTLS, no AUTH.
 */
import { EventEmitter, once } from 'node:events';
import { SMTPServer, type SMTPServerAddress, type SMTPServerSession } from 'smtp-server';

/** Which SMTP command a configured failure answers. */
export type SinkFailureStage = 'mail' | 'rcpt' | 'data';

/** A reply the sink gives instead of accepting mail. */
export interface SinkFailure {
  /** SMTP reply code, e.g. 451 (temporary) or 550 (permanent). */
  code: number;
  /** Reply text. */
  message: string;
  /** Command to reject: MAIL FROM, RCPT TO (default) or the end of DATA. */
  stage?: SinkFailureStage;
}

/** Options for {@link startSmtpSink}. */
export interface SmtpSinkOptions {
  /** Loopback address to listen on (default 127.0.0.1). */
  host?: string;
  /** Port; 0 or undefined picks a free one. */
  port?: number;
  /** Start out rejecting with this reply (default: accept everything). */
  failWith?: SinkFailure | null;
}

/** A message the sink accepted. */
export interface ReceivedMessage {
  /** MAIL FROM address ('' for the null sender <>). */
  mailFrom: string;
  /** RCPT TO addresses, in order. */
  rcptTo: string[];
  /** The message exactly as received after DATA (dot-unstuffed, CRLF line ends). */
  raw: Buffer;
  /** The Message-ID header value including angle brackets, if present. */
  messageId: string | undefined;
  /** Name the client gave in EHLO/HELO. */
  heloName: string;
  /** Client IP address. */
  remoteAddress: string;
  /** When the message was accepted. */
  receivedAt: Date;
}

/** A transaction the sink refused because a failure was configured. */
export interface RejectedAttempt {
  stage: SinkFailureStage;
  code: number;
  mailFrom: string;
  rcptTo: string[];
  at: Date;
}

/** A running sink. */
export interface SmtpSink {
  host: string;
  port: number;
  /** Accepted messages, oldest first (live array). */
  readonly messages: ReceivedMessage[];
  /** Refused attempts, oldest first (live array). */
  readonly rejections: RejectedAttempt[];
  /** Reject from now on with `failure`, or accept again with `null`. */
  setFailure(failure: SinkFailure | null): void;
  /** Resolves with all messages once at least `n` were accepted; rejects after `timeoutMs`. */
  waitForMessages(n: number, timeoutMs: number): Promise<ReceivedMessage[]>;
  /** Resolves with all rejections once at least `n` happened; rejects after `timeoutMs`. */
  waitForRejections(n: number, timeoutMs: number): Promise<RejectedAttempt[]>;
  /** Stops listening and closes open connections. Idempotent. */
  close(): Promise<void>;
}

function addressOf(a: SMTPServerAddress | false | undefined): string {
  return a ? a.address : '';
}

/** Extracts the Message-ID header (unfolded) from the raw message's header section. */
export function extractMessageId(raw: Buffer): string | undefined {
  const text = raw.toString('latin1');
  const end = text.search(/\r?\n\r?\n/);
  const head = (end >= 0 ? text.slice(0, end) : text).replace(/\r?\n[ \t]+/g, ' ');
  const m = /^message-id:[ \t]*(.*)$/im.exec(head);
  return m ? m[1].trim() : undefined;
}

function smtpError(failure: SinkFailure): Error & { responseCode: number } {
  return Object.assign(new Error(failure.message), { responseCode: failure.code });
}

/**
 * Starts the sink on loopback and resolves once it is listening. Always `close()` it.
 */
export async function startSmtpSink(opts: SmtpSinkOptions = {}): Promise<SmtpSink> {
  const host = opts.host ?? '127.0.0.1';
  if (!/^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(host)) {
    throw new Error(`smtp sink must listen on a loopback address (127.0.0.0/8), got ${host}`);
  }
  let failure: SinkFailure | null = opts.failWith ?? null;
  const messages: ReceivedMessage[] = [];
  const rejections: RejectedAttempt[] = [];
  const events = new EventEmitter();
  events.setMaxListeners(0);

  const reject = (stage: SinkFailureStage, session: SMTPServerSession, extraRcpt?: string): Error | null => {
    if (!failure || (failure.stage ?? 'rcpt') !== stage) return null;
    const rcptTo = session.envelope.rcptTo.map((r) => r.address);
    if (extraRcpt !== undefined) rcptTo.push(extraRcpt);
    rejections.push({ stage, code: failure.code, mailFrom: addressOf(session.envelope.mailFrom), rcptTo, at: new Date() });
    events.emit('change');
    return smtpError(failure);
  };

  const server = new SMTPServer({
    logger: false,
    banner: 'Parley test SMTP sink',
    disabledCommands: ['STARTTLS', 'AUTH'],
    authOptional: true,
    hideSTARTTLS: true,
    // No DNS here: don't try to reverse-resolve loopback clients.
    disableReverseLookup: true,
    // A relaying MTA may keep a connection open; don't let close() hang on it.
    closeTimeout: 1_000,
    socketTimeout: 30_000,
    onMailFrom(address, session, callback) {
      // session.envelope.mailFrom is not set yet: record the address being offered.
      const err = failure && (failure.stage ?? 'rcpt') === 'mail' ? failure : null;
      if (err) {
        rejections.push({ stage: 'mail', code: err.code, mailFrom: address.address, rcptTo: [], at: new Date() });
        events.emit('change');
        callback(smtpError(err));
        return;
      }
      callback();
    },
    onRcptTo(address, session, callback) {
      callback(reject('rcpt', session, address.address));
    },
    onData(stream, session, callback) {
      const chunks: Buffer[] = [];
      stream.on('data', (c: Buffer) => chunks.push(c));
      stream.on('error', (err) => callback(err));
      stream.on('end', () => {
        const err = reject('data', session);
        if (err) {
          callback(err);
          return;
        }
        const raw = Buffer.concat(chunks);
        messages.push({
          mailFrom: addressOf(session.envelope.mailFrom),
          rcptTo: session.envelope.rcptTo.map((r) => r.address),
          raw,
          messageId: extractMessageId(raw),
          heloName: session.hostNameAppearsAs ?? '',
          remoteAddress: session.remoteAddress ?? '',
          receivedAt: new Date(),
        });
        events.emit('change');
        callback(null, 'OK: queued by Parley test sink');
      });
    },
  });
  server.on('error', () => {
    // Per-connection errors (client resets etc.) are not test failures here.
  });

  await new Promise<void>((resolve, reject) => {
    const onError = (err: Error) => reject(err);
    server.server.once('error', onError);
    server.listen(opts.port ?? 0, host, () => {
      server.server.off('error', onError);
      resolve();
    });
  });
  const addr = server.server.address();
  if (addr === null || typeof addr === 'string') throw new Error('smtp sink: no address after listen');

  const waitFor = async <T>(list: T[], n: number, timeoutMs: number, what: string): Promise<T[]> => {
    if (list.length >= n) return list;
    const ac = new AbortController();
    const timer = setTimeout(() => ac.abort(), timeoutMs);
    try {
      while (list.length < n) await once(events, 'change', { signal: ac.signal });
      return list;
    } catch (err) {
      if (ac.signal.aborted) {
        throw new Error(`smtp sink: timed out after ${timeoutMs} ms waiting for ${n} ${what} (have ${list.length})`);
      }
      throw err;
    } finally {
      clearTimeout(timer);
    }
  };

  let closed: Promise<void> | undefined;
  return {
    host,
    port: addr.port,
    messages,
    rejections,
    setFailure(f) {
      failure = f;
    },
    waitForMessages: (n, timeoutMs) => waitFor(messages, n, timeoutMs, 'message(s)'),
    waitForRejections: (n, timeoutMs) => waitFor(rejections, n, timeoutMs, 'rejection(s)'),
    close() {
      closed ??= new Promise<void>((resolve) => server.close(() => resolve()));
      return closed;
    },
  };
}
