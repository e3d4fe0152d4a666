/**
 * The inbound SMTP server of the `smtp` role (issue 2 §6 "Inbound"; RFC 5321), built on
 * the smtp-server package.
 *
 * - Listens on `config.smtpHost:config.smtpPort` (port 0 picks a free port; the bound one
 *   is returned).
 * - RCPT TO: accepted only for existing local users and `reply+<key>@` addresses of
 *   existing conversations (src/mail/inbound/recipients.ts); refused with 550 5.1.1
 *   (unknown user or conversation), 550 5.7.1 (another domain: no open relay) or
 *   553 5.1.3 (invalid address). At most {@link MAX_RECIPIENTS} recipients per message.
 * - Size: the SIZE extension (RFC 1870) advertises `config.maxMessageBytes`; a larger
 *   declared SIZE is refused at MAIL FROM, a larger message after DATA, both with 552.
 * - DATA: answered 250 only after the message was committed (ingest-email.ts; raw bytes first);
 *   a message that cannot be used (e.g. no sender at all) is kept raw and refused with
 *   554 5.6.0 and the reason; an internal error (database down…) answers 451 4.3.0 so the
 *   sending MTA retries; nothing ever throws out of a handler.
 * - AUTH and STARTTLS are disabled for now: this server only receives mail for its own
 *   domains (MX role) and never relays, so it needs no authentication; TLS needs a
 *   certificate setting that does not exist yet (a later issue adds both). Reverse DNS of
 *   clients is not looked up (a machine without DNS must not make mail slow).
 * - At most {@link MAX_CLIENTS} connections at once (more get 421); idle connections time
 *   out after {@link SOCKET_TIMEOUT_MS}.
 * - Every refusal is logged (warn) with the client, the command and the reason.
 * - **Write combining**: messages are parsed and authenticated as they arrive, then
 *   committed by {@link writeCombiner}: while the transactions for the same recipients are
 *   in flight (two at most), the messages that arrive queue, and the next transaction takes all of them
 *   (ingest-email.ts `commitEmails`: one COMMIT, each recipient's stream counter locked
 *   once per batch instead of once per message); a message ready while others of the same
 *   recipients are still being parsed waits for them up to {@link HOLD_MS}. Each message
 *   is still answered only once its transaction has committed; a batch that fails is redone
 *   one message at a time, so one bad message never fails the others.
 */
import type { AddressInfo } from 'node:net';
import { SMTPServer, type SMTPServerDataStream, type SMTPServerSession } from 'smtp-server';
import type { Deps } from '../../context.ts';
import { listenError } from '../../platform/config.ts';
import { commitEmails, type IngestResult, type PreparedEmail, prepareEmail } from './ingest-email.ts';
import { checkRecipient, type Recipient } from './recipients.ts';

/** Most simultaneous SMTP connections. */
export const MAX_CLIENTS = 100;
/** Most recipients of one message (RFC 5321 §4.5.3.1.8 asks for at least 100). */
export const MAX_RECIPIENTS = 100;
/** An idle connection is closed after this long, in ms. */
export const SOCKET_TIMEOUT_MS = 60_000;
/** How long `stop()` lets open connections finish before closing them, in ms. */
const CLOSE_TIMEOUT_MS = 5_000;
/** Longest reason put in an SMTP reply line (RFC 5321 §4.5.3.1.5 allows 512 octets per line). */
const MAX_REASON = 400;

/** An error smtp-server turns into a reply: `<responseCode> <message>`. */
function smtpError(responseCode: number, message: string): Error & { responseCode: number } {
  return Object.assign(new Error(message.replace(/[\r\n]+/g, ' ').slice(0, MAX_REASON)), { responseCode });
}

/** An enhanced status code (RFC 3463) opens every reply this module writes itself. */
const OWN_REPLY = /^[45]\d\d [45]\.\d{1,3}\.\d{1,3} /;

/**
 * The smtp-server logger: silent, except that it logs (warn) the 4xx/5xx replies the
 * package gives on its own — bad command sequence or syntax, a SIZE over the limit at
 * MAIL FROM, too many recipients, too many connections (421) — so every refusal is in
 * the log; the refusals of this module's handlers are logged where they are decided.
 */
function protocolRefusalLogger(log: Deps['log']) {
  const quiet = () => {};
  return {
    trace: quiet,
    info: quiet,
    warn: quiet,
    error: quiet,
    fatal: quiet,
    debug(entry: { tnx?: string; cid?: string }, message: string, ...args: unknown[]) {
      const reply = typeof args[0] === 'string' ? args[0] : '';
      if (entry?.tnx !== 'send' || message !== 'S:' || !/^[45]\d\d/.test(reply) || OWN_REPLY.test(reply)) return;
      log.warn({ smtp: { session: entry.cid }, reply }, 'smtp: command refused');
    },
  };
}

/** Most messages one combined transaction takes. */
const MAX_BATCH = 32;

/** How long an accepted recipient (a user or a reply address) is accepted again without a lookup, ms. */
const RECIPIENT_CACHE_MS = 10_000;
/** Most recipients remembered (the map is cleared beyond it). */
const RECIPIENT_CACHE_MAX = 10_000;

/**
 * {@link checkRecipient} that remembers accepted recipients for {@link RECIPIENT_CACHE_MS}:
 * every message to a mailbox would otherwise cost a query at RCPT TO. Refusals are never
 * remembered (a user created a moment ago is accepted at once). A user deleted within the
 * window is still accepted at RCPT TO; the message is then refused at DATA (no recipient
 * of this platform), with that reason.
 */
function cachedRecipientCheck(deps: Deps): (address: string) => ReturnType<typeof checkRecipient> {
  const accepted = new Map<string, { r: Recipient; until: number }>();
  return async (address) => {
    const hit = accepted.get(address);
    if (hit !== undefined && hit.until > Date.now()) return hit.r;
    const r = await checkRecipient(deps, deps.db.kysely, address);
    if (r.kind !== 'refused') {
      if (accepted.size >= RECIPIENT_CACHE_MAX) accepted.clear();
      accepted.set(address, { r, until: Date.now() + RECIPIENT_CACHE_MS });
    }
    return r;
  };
}

/**
 * Transactions in flight at once for one set of recipients. Two transactions of one
 * mailbox serialise only at their end (the recipient's stream counter is locked by the
 * stream-event statement just before COMMIT); the rest of the second — raw rows, reads,
 * parsing rules, signing, the rows' write — runs while the first finishes. With one, a
 * mailbox received at most one batch per transaction time.
 */
const LANES_PER_KEY = 2;

/**
 * Longest a prepared message waits for messages of the same recipients that are still being
 * parsed and authenticated, so that they share its transaction, in ms. Without it a free
 * lane took each message alone (1.1 messages per transaction with 4 connections), and
 * PostgreSQL spent 16 M instructions per message; with it ≈ 3 per transaction and 11 M
 * (bench/smtp-receive.ts, 2026-11-22). A lone message waits only while others are being
 * prepared, never for mail that has not arrived.
 */
const HOLD_MS = 10;

/** A message announced to a {@link writeCombiner} while it is prepared. */
export interface CombinedWrite {
  /** Commits the prepared message with others of its recipients; settles once its transaction committed. */
  commit(p: PreparedEmail): Promise<IngestResult>;
  /** Withdraws the announcement (its preparation failed); no-op after `commit`. */
  cancel(): void;
}

/**
 * A write combiner for prepared messages: for each set of envelope recipients, up to
 * {@link LANES_PER_KEY} transactions in flight; a message that arrives while they all are
 * busy queues, and the first to finish takes every queued message (up to
 * {@link MAX_BATCH}) into its next transaction. A message that finds a lane free is
 * committed at once, unless messages for the same recipients are still being prepared:
 * then the batch waits for them, at most {@link HOLD_MS}. Transactions of one key can only
 * wait for each other's locks (PostgreSQL resolves a deadlock by failing one, which
 * commitEmails then redoes message by message), never change each other's outcome:
 * duplicates are decided under the Message-ID's lock, as between recipient sets.
 */
export function writeCombiner(deps: Deps): (rcptTo: string[]) => CombinedWrite {
  type Waiting = { p: PreparedEmail; resolve(r: IngestResult): void; reject(e: unknown): void };
  type Key = { queue: Waiting[]; running: number; preparing: number; holdUntil: number; timer: NodeJS.Timeout | null };
  const keys = new Map<string, Key>();
  const keyOf = (rcptTo: string[]) => [...new Set(rcptTo.map((a) => a.toLowerCase()))].sort().join('\n');
  const entry = (key: string): Key => {
    let k = keys.get(key);
    if (!k) keys.set(key, (k = { queue: [], running: 0, preparing: 0, holdUntil: 0, timer: null }));
    return k;
  };
  const release = (key: string, k: Key) => {
    if (k.running === 0 && k.preparing === 0 && k.queue.length === 0 && k.timer === null) keys.delete(key);
  };
  /** Whether the queued messages should wait for those still being prepared. */
  const holding = (key: string, k: Key): boolean => {
    if (k.preparing === 0 || k.queue.length >= MAX_BATCH) return false;
    const now = Date.now();
    if (k.holdUntil === 0) k.holdUntil = now + HOLD_MS;
    if (now >= k.holdUntil) return false;
    if (k.timer === null) {
      k.timer = setTimeout(() => {
        k.timer = null;
        pump(key, k);
      }, k.holdUntil - now);
    }
    return true;
  };
  const pump = (key: string, k: Key) => {
    while (k.running < LANES_PER_KEY && k.queue.length > 0 && !holding(key, k)) {
      if (k.timer !== null) clearTimeout(k.timer);
      k.timer = null;
      k.holdUntil = 0;
      const batch = k.queue.splice(0, MAX_BATCH);
      k.running++;
      void run(key, k, batch);
    }
    release(key, k);
  };
  const run = async (key: string, k: Key, batch: Waiting[]) => {
    try {
      const outcomes = await commitEmails(deps, batch.map((w) => w.p));
      batch.forEach((w, i) => {
        const o = outcomes[i];
        if (o.status === 'fulfilled') w.resolve(o.value);
        else w.reject(o.reason);
      });
    } catch (e) {
      for (const w of batch) w.reject(e);
    }
    k.running--;
    pump(key, k);
  };
  /**
   * Announces a message for `rcptTo` whose preparation (parsing, authentication) has begun,
   * so that batches of the same recipients may wait for it; then `commit` or `cancel` it.
   */
  return (rcptTo) => {
    const key = keyOf(rcptTo);
    const k = entry(key);
    k.preparing++;
    let open = true;
    const close = () => {
      if (!open) return false;
      open = false;
      k.preparing--;
      return true;
    };
    return {
      commit: (p) =>
        new Promise<IngestResult>((resolve, reject) => {
          close();
          k.queue.push({ p, resolve, reject });
          pump(key, k);
        }),
      cancel() {
        if (close()) pump(key, k);
      },
    };
  };
}

/**
 * Starts the inbound SMTP server.
 * @returns the bound port and `stop()`, which stops accepting, lets open connections
 *   finish for a few seconds, and waits for messages being ingested
 * @throws Error when the port cannot be bound
 */
export async function startSmtpServer(deps: Deps): Promise<{ port: number; stop(): Promise<void> }> {
  const { config, log } = deps;
  const inFlight = new Set<Promise<unknown>>();
  const announce = writeCombiner(deps);
  const checkRcpt = cachedRecipientCheck(deps);
  const client = (s: SMTPServerSession) => ({ ip: s.remoteAddress, helo: s.hostNameAppearsAs || undefined, session: s.id });

  const server = new SMTPServer({
    name: config.domains[0],
    banner: 'Parley ESMTP',
    size: config.maxMessageBytes,
    disabledCommands: ['AUTH', 'STARTTLS'],
    authOptional: true,
    hideENHANCEDSTATUSCODES: true,
    disableReverseLookup: true,
    maxClients: MAX_CLIENTS,
    maxRecipients: MAX_RECIPIENTS,
    socketTimeout: SOCKET_TIMEOUT_MS,
    closeTimeout: CLOSE_TIMEOUT_MS,
    logger: protocolRefusalLogger(log),

    onRcptTo(address, session, callback) {
      checkRcpt(address.address).then(
        (r) => {
          if (r.kind !== 'refused') return callback();
          log.warn({ smtp: client(session), rcpt: address.address, code: r.code, reason: r.reason }, 'smtp: recipient refused');
          callback(smtpError(r.code, `${r.enhanced} <${r.address}>: ${r.reason}`));
        },
        (e) => {
          log.error({ err: e, smtp: client(session), rcpt: address.address }, 'smtp: recipient check failed');
          callback(smtpError(451, '4.3.0 Temporary local problem checking the recipient; try again later'));
        },
      );
    },

    onData(stream: SMTPServerDataStream, session, callback) {
      const chunks: Buffer[] = [];
      let bytes = 0;
      stream.on('data', (chunk: Buffer) => {
        bytes += chunk.length;
        if (bytes <= config.maxMessageBytes) chunks.push(chunk);
      });
      stream.on('error', (e) => log.warn({ err: e, smtp: client(session) }, 'smtp: data stream error'));
      stream.on('end', () => {
        const rcptTo = session.envelope.rcptTo.map((r) => r.address);
        const mailFrom = session.envelope.mailFrom ? session.envelope.mailFrom.address : '';
        if (stream.sizeExceeded || bytes > config.maxMessageBytes) {
          const reason = `5.3.4 Message too big: ${bytes} bytes, the limit is ${config.maxMessageBytes} bytes`;
          log.warn({ smtp: client(session), mailFrom, rcptTo, bytes, reason }, 'smtp: message refused');
          return callback(smtpError(552, reason));
        }
        let raw: Buffer;
        try {
          raw = Buffer.concat(chunks, bytes);
        } catch (e) {
          log.error({ err: e, smtp: client(session) }, 'smtp: message could not be read');
          return callback(smtpError(451, '4.3.0 Temporary local problem reading the message; try again later'));
        }
        const write = announce(rcptTo);
        const job = prepareEmail(deps, raw, { mailFrom, rcptTo, remoteIp: session.remoteAddress ?? '', helo: session.hostNameAppearsAs || '' })
          .then((p) => write.commit(p), (e) => {
            write.cancel();
            throw e;
          })
          .then((r) => {
            if (r.status === 'failed') {
              // A refusal says why; an internal error's details stay in the log and the database.
              const code = r.permanent ? 554 : 451;
              const reply = r.permanent
                ? `5.6.0 Message refused: ${r.reason} (kept as inbound message ${r.inboundId})`
                : `4.3.0 Temporary local problem processing the message; try again later (inbound message ${r.inboundId})`;
              log.warn({ smtp: client(session), mailFrom, rcptTo, inbound: r.inboundId, code, reason: r.reason }, 'smtp: message refused');
              return callback(smtpError(code, reply));
            }
            log.info(
              { smtp: client(session), mailFrom, rcptTo, inbound: r.inboundId, status: r.status, created: r.created, threaded: r.threaded },
              'smtp: message accepted',
            );
            callback(null, `2.0.0 OK ${r.status === 'duplicate' ? 'already delivered' : 'stored'} as inbound message ${r.inboundId}`);
          })
          .catch((e) => {
            log.error({ err: e, smtp: client(session), mailFrom, rcptTo }, 'smtp: message could not be stored');
            callback(smtpError(451, '4.3.0 Temporary local problem storing the message; try again later'));
          })
          .finally(() => inFlight.delete(job));
        inFlight.add(job);
      });
    },
  });

  // Socket and protocol errors of one client must never take the process down.
  server.on('error', (e) => log.warn({ err: e }, 'smtp: connection error'));

  await new Promise<void>((resolve, reject) => {
    const onError = (e: NodeJS.ErrnoException) => reject(listenError(e, 'PARLEY_SMTP_PORT', config.smtpHost, config.smtpPort));
    server.server.once('error', onError);
    server.listen(config.smtpPort, config.smtpHost, () => {
      server.server.off('error', onError);
      resolve();
    });
  });
  const port = (server.server.address() as AddressInfo).port;
  log.info({ host: config.smtpHost, port }, 'smtp role listening');

  let stopping: Promise<void> | null = null;
  return {
    port,
    stop: () =>
      (stopping ??= (async () => {
        await new Promise<void>((resolve) => server.close(() => resolve()));
        await Promise.allSettled([...inFlight]);
      })()),
  };
}
