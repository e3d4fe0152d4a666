// Issue 2, Done means 3: a real Postfix (Debian's package, started by the test in relay mode)
// relays every file of the go-enmime-testdata and cpython-test_email corpora — MIME torture
// sets, non-messages and an empty file included, content unchanged — into Parley's SMTP
// port. Each message must end stored as a conversation, or refused by Parley with a reason
// that appears both in Postfix's log (the bounce) and in Parley's log; the server never
// crashes. Each file goes to a recipient of its own (m<n>@alpha.test), so outcomes are
// matched to files exactly even though many of these files share one Message-ID.
// Skipped where Postfix or the corpus is missing.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { createConnection } from 'node:net';
import { tmpdir } from 'node:os';
import { join, relative, resolve } from 'node:path';
import { Writable } from 'node:stream';
import { createTransport } from 'nodemailer';
import pino from 'pino';
import { createUser } from '../../src/accounts/users.ts';
import { startPlatform, type Platform } from '../../src/app.ts';
import { loadConfig } from '../../src/platform/config.ts';
import { createTestDatabase } from '../support/db.ts';
import { postfixSkipReason, startPostfix, type PostfixInstance } from '../support/postfix.ts';

const CORPUS = resolve('../shared/corpus/email');
const FOLDERS = ['go-enmime-testdata', 'cpython-test_email'].map((f) => join(CORPUS, f));
const skip = postfixSkipReason() || (FOLDERS.every((f) => existsSync(f)) ? false : `corpus not found under ${CORPUS}`);

/** Every file under `dir`, recursively, in sorted order, except SOURCE.md. */
function walk(dir: string): string[] {
  return readdirSync(dir)
    .sort()
    .flatMap((name) => {
      const path = join(dir, name);
      if (statSync(path).isDirectory()) return walk(path);
      return name === 'SOURCE.md' ? [] : [path];
    });
}

/** Resolves with the first line an SMTP server sends (its greeting). */
function banner(port: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = createConnection({ host: '127.0.0.1', port });
    s.setEncoding('latin1');
    s.once('data', (d: string) => {
      s.end('QUIT\r\n');
      resolve(d.split('\r\n')[0]);
    });
    s.once('error', reject);
  });
}

describe('Postfix relaying the MIME torture corpora into Parley', { skip }, () => {
  let platform: Platform;
  let postfix: PostfixInstance | null = null;
  let dropDb: () => Promise<void>;
  let dataDir: string;
  /** Parley's log, one parsed JSON object per line. */
  const parleyLog: any[] = [];

  before(async () => {
    const db = await createTestDatabase();
    dropDb = db.drop;
    dataDir = mkdtempSync(join(tmpdir(), 'parley-postfix-'));
    const config = loadConfig({}, undefined, {
      domains: ['alpha.test'],
      httpPort: 0,
      smtpPort: 0,
      databaseUrl: db.url,
      dataDir,
      dnsOffline: true,
      logLevel: 'info',
    });
    const sink = new Writable({
      write(chunk, _encoding, callback) {
        for (const line of String(chunk).split('\n')) if (line.trim()) parleyLog.push(JSON.parse(line));
        callback();
      },
    });
    platform = await startPlatform(config, ['web', 'smtp'], { log: pino({ level: 'info' }, sink) });
  });
  after(async () => {
    await postfix?.stop();
    await platform?.stop();
    await dropDb?.();
    rmSync(dataDir, { recursive: true, force: true });
  });

  it('stores each message as a conversation or refuses it with a reason logged by both sides, and never crashes', async () => {
    const files = FOLDERS.flatMap(walk);
    assert.ok(files.length > 100, `only ${files.length} corpus files`);
    const deps = platform.deps;
    // The sender's mailbox (bounces come back here) and one recipient per file.
    await createUser(deps, { address: 'sender@alpha.test' });
    for (let i = 0; i < files.length; i++) await createUser(deps, { address: `m${i}@alpha.test` });

    postfix = await startPostfix({ relayHost: { host: '127.0.0.1', port: platform.smtpPort! }, myDomains: ['alpha.test'] });
    const transport = createTransport({ host: postfix.host, port: postfix.port, secure: false, ignoreTLS: true, name: 'corpus.client.test' });
    const notInjected: string[] = [];
    try {
      for (let i = 0; i < files.length; i++) {
        try {
          await transport.sendMail({ envelope: { from: 'sender@alpha.test', to: [`m${i}@alpha.test`] }, raw: readFileSync(files[i]) });
        } catch (e) {
          notInjected.push(`${relative(CORPUS, files[i])}: ${(e as Error).message}`);
        }
      }
    } finally {
      transport.close();
    }
    assert.deepEqual(notInjected, [], 'Postfix accepted every file');
    // Two messages Parley must refuse after Postfix accepted them: an unknown local user
    // (refused at RCPT) and a From naming a local address that is no user (refused after DATA).
    const refusable = createTransport({ host: postfix.host, port: postfix.port, secure: false, ignoreTLS: true });
    try {
      await refusable.sendMail({ envelope: { from: 'sender@alpha.test', to: ['nobody@alpha.test'] }, raw: 'From: a@example.net\r\nSubject: to nobody\r\n\r\nhi\r\n' });
      await refusable.sendMail({ envelope: { from: 'sender@alpha.test', to: ['sender@alpha.test'] }, raw: 'From: ghost@alpha.test\r\nSubject: spoofed\r\n\r\nhi\r\n' });
    } finally {
      refusable.close();
    }
    await postfix.waitForQueueEmpty(120_000);
    const logOf = async () => (await postfix!.readLog()).split('\n');
    const nobody = (await logOf()).find((l) => l.includes('to=<nobody@alpha.test>') && l.includes('status=bounced'));
    assert.match(nobody ?? '', /said: 550 5\.1\.1 <nobody@alpha\.test>: no such user here/);
    assert.ok(parleyLog.some((e) => e.msg === 'smtp: recipient refused' && e.rcpt === 'nobody@alpha.test' && /no such user/.test(e.reason)));
    const spoofed = (await logOf()).find((l) => l.includes('to=<sender@alpha.test>') && l.includes('status=bounced'));
    assert.match(spoofed ?? '', /said: 554 5\.6\.0 Message refused: the sender ghost@alpha\.test is an address of this platform, but no such user exists/);
    assert.ok(parleyLog.some((e) => e.msg === 'smtp: message refused' && /ghost@alpha\.test/.test(e.reason)));

    const db = deps.db.kysely;
    const postfixLog = await postfix.readLog();
    const stored: string[] = [];
    const refused: { file: string; reason: string }[] = [];
    const unaccounted: string[] = [];
    for (let i = 0; i < files.length; i++) {
      const rcpt = `m${i}@alpha.test`;
      const file = relative(CORPUS, files[i]);
      const conversations = await db
        .selectFrom('participants')
        .innerJoin('users', 'users.id', 'participants.user_id')
        .select('participants.conv_id')
        .where('users.address', '=', rcpt)
        .execute();
      if (conversations.length === 1) {
        stored.push(file);
        continue;
      }
      const bounced = postfixLog.split('\n').find((l) => l.includes(`to=<${rcpt}>`) && l.includes('status=bounced'));
      const logged = parleyLog.find((e) => e.msg === 'smtp: message refused' && Array.isArray(e.rcptTo) && e.rcptTo.includes(rcpt));
      if (conversations.length === 0 && bounced && logged?.reason) {
        assert.match(bounced, / said: 5\d\d 5\.\d+\.\d+ /, `${file}: Postfix's bounce carries Parley's reply`);
        assert.ok(bounced.includes(String(logged.reason).slice(0, 40)), `${file}: the same reason on both sides\n${bounced}\n${logged.reason}`);
        refused.push({ file, reason: logged.reason });
      } else unaccounted.push(`${file}: ${conversations.length} conversations, bounce ${bounced ?? 'none'}, Parley log ${JSON.stringify(logged)}`);
    }
    assert.deepEqual(unaccounted, []);
    assert.equal(stored.length + refused.length, files.length);
    // Every refusal is kept raw with its reason.
    const failedRows = await db.selectFrom('inbound_emails').select(['rcpt_to', 'error']).where('status', '=', 'failed').execute();
    for (const r of refused) assert.ok(failedRows.some((row) => row.error === r.reason), `${r.file}: kept as a failed inbound email`);
    console.log(`# postfix relay: ${files.length} files, ${stored.length} stored, ${refused.length} refused${refused.map((r) => `\n#   ${r.file}: ${r.reason}`).join('')}`);

    // Still alive: HTTP health and an SMTP greeting.
    const health = await fetch(`http://127.0.0.1:${platform.httpPort}/health`);
    assert.equal(health.status, 200);
    assert.match(await banner(platform.smtpPort!), /^220 /);
  });
});
