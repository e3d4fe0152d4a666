/**
 * Test harness that runs a REAL Postfix (Debian's package) as a private, foreground
 * instance per test: its own config dir, queue, data dir, log file and loopback port.
 *
 * Two modes, which may be combined:
 *  - relay mode (`relayHost`): Postfix accepts mail from loopback for any recipient and
 *    relays everything to `relayHost` (e.g. Parley's own inbound SMTP port, or an
 *    in-process sink), retrying deferred mail quickly (every ~2 s; `flushQueue()` now);
 *  - mailbox mode (`mailboxDomains`): Postfix delivers mail for those domains into a
 *    catch-all Maildir per domain, `mailboxDir/<domain>/` (virtual(8) delivery, one copy
 *    per recipient, each with its Delivered-To header), so it can serve as the outbound
 *    relay Parley sends through. Other recipients are relayed to `relayHost` if given,
 *    else bounced at once (5.3.0) rather than looked up in DNS.
 *
 * Requirements: /usr/sbin/postfix (install with `scripts/install-system-deps.sh`) and
 * root (Postfix's master must start as root and drop to the `postfix` user). Tests
 * should skip with {@link postfixSkipReason} when {@link postfixAvailable} is false.
 *
 * Set PARLEY_KEEP_POSTFIX=1 to keep an instance's directory after `stop()` (for
 * post-mortems); its path is printed then.
 */
import { spawn, execFile, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { chmod, chown, mkdir, mkdtemp, readdir, readFile, rm, stat, utimes, writeFile } from 'node:fs/promises';
import { createConnection, createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';

const execFileAsync = promisify(execFile);

const POSTFIX_BIN = '/usr/sbin/postfix';
const POSTQUEUE_BIN = '/usr/sbin/postqueue';
const DIR_PREFIX = 'parley-postfix-';

/** Options for {@link startPostfix}. */
export interface StartPostfixOptions {
  /** Loopback address Postfix listens on (default 127.0.0.1). Must be in 127.0.0.0/8. */
  listenHost?: string;
  /** Port to listen on; 0 or undefined picks a free port. */
  listenPort?: number;
  /** Domains accepted for relaying (`relay_domains`); loopback clients may relay anything anyway. */
  myDomains?: string[];
  /** Relay mode: every message not for `mailboxDomains` is relayed to this host:port. */
  relayHost?: { host: string; port: number };
  /** Mailbox mode: domains whose mail is delivered into Maildirs under `mailboxDir`. */
  mailboxDomains?: string[];
  /** `message_size_limit` in bytes (Postfix default 10240000). */
  messageSizeLimit?: number;
  /** How long to wait for the 220 banner (default 30 s). */
  startTimeoutMs?: number;
  /** Extra main.cf settings, applied last (for one-off experiments). */
  extraMainCf?: Record<string, string>;
}

/** One entry of `postqueue -j` (subset of fields). */
export interface PostfixQueueEntry {
  queue_name: string;
  queue_id: string;
  sender: string;
  message_size: number;
  arrival_time: number;
  recipients: { address: string; delay_reason?: string }[];
}

/** A running private Postfix instance. */
export interface PostfixInstance {
  /** Address the SMTP service listens on. */
  host: string;
  /** Port the SMTP service listens on. */
  port: number;
  /** Directory holding main.cf and master.cf (pass to `postfix -c`). */
  configDir: string;
  /** Root of the virtual mailboxes: one Maildir per domain, `<mailboxDir>/<domain>/{new,cur,tmp}`. */
  mailboxDir: string;
  /** Postfix's queue_directory for this instance. */
  queueDir: string;
  /** The instance's log file (maillog_file). */
  logFile: string;
  /** The instance's temp directory (everything above lives under it). */
  rootDir: string;
  /** Stops Postfix (`postfix -c DIR stop`, then kills what is left) and removes its directory. Idempotent. */
  stop(): Promise<void>;
  /**
   * All messages delivered so far to localPart@domain (mailbox mode), oldest first,
   * matched case-insensitively on the Delivered-To header virtual(8) adds.
   */
  readMailbox(localPart: string, domain: string): Promise<Buffer[]>;
  /** Every message delivered to any recipient of `domain` (its catch-all Maildir), oldest first. */
  readDomainMailbox(domain: string): Promise<Buffer[]>;
  /**
   * Polls the Maildir every 50 ms until at least `count` messages arrived, then returns
   * them (oldest first). Rejects after `timeoutMs` with the queue state and log tail.
   */
  waitForMail(localPart: string, domain: string, count: number, timeoutMs: number): Promise<Buffer[]>;
  /** True when no message is in maildrop, incoming, active, deferred or hold. */
  queueIsEmpty(): Promise<boolean>;
  /** Polls until the queue is empty; rejects with the queue listing after `timeoutMs`. */
  waitForQueueEmpty(timeoutMs: number): Promise<void>;
  /** The queue as reported by `postqueue -c DIR -j` (includes deferral reasons). */
  listQueue(): Promise<PostfixQueueEntry[]>;
  /** `postqueue -c DIR -f`: retry all deferred mail now, forgetting "dead" destinations. */
  flushQueue(): Promise<void>;
  /** The whole log file so far ('' when none yet). */
  readLog(): Promise<string>;
}

/**
 * True when Postfix can be used here: /usr/sbin/postfix exists and we are root
 * (Postfix's master must be started by root).
 */
export function postfixAvailable(): boolean {
  return existsSync(POSTFIX_BIN) && typeof process.getuid === 'function' && process.getuid() === 0;
}

/**
 * Why Postfix tests are skipped on this machine, for `test(..., { skip })`; `false`
 * when Postfix is available.
 */
export function postfixSkipReason(): string | false {
  if (!existsSync(POSTFIX_BIN)) {
    return 'Postfix is not installed (/usr/sbin/postfix missing): run scripts/install-system-deps.sh';
  }
  if (typeof process.getuid !== 'function' || process.getuid() !== 0) {
    return 'Postfix tests need root (the master daemon starts as root); installed via scripts/install-system-deps.sh';
  }
  return false;
}

/**
 * Picks a free TCP port on `host` by binding port 0 and closing it again. There is a
 * small race until the real server binds; {@link startPostfix} retries on EADDRINUSE.
 */
export async function getFreePort(host = '127.0.0.1'): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, host, () => {
      const addr = srv.address();
      if (addr === null || typeof addr === 'string') {
        srv.close();
        reject(new Error('could not determine a free port'));
        return;
      }
      srv.close(() => resolve(addr.port));
    });
  });
}

let instanceCounter = 0;
const liveInstances = new Set<{ queueDir: string; child: ChildProcess }>();
let exitHooksInstalled = false;

/** The master's pid from its pid file, or undefined while there is none. */
function readMasterPid(queueDir: string): number | undefined {
  try {
    const pid = Number(readFileSync(join(queueDir, 'pid', 'master.pid'), 'utf8').trim());
    return pid > 0 ? pid : undefined;
  } catch {
    return undefined;
  }
}

/** Last-resort cleanup: a test process that dies must not leave Postfix masters behind. */
function killLiveInstancesSync(): void {
  for (const inst of liveInstances) {
    try {
      const pid = readMasterPid(inst.queueDir);
      if (pid) process.kill(pid, 'SIGTERM'); // master terminates its whole process group
    } catch {
      // already gone
    }
    try {
      if (inst.child.pid !== undefined && inst.child.exitCode === null) process.kill(inst.child.pid, 'SIGTERM');
    } catch {
      // already gone
    }
  }
  liveInstances.clear();
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * Stops and removes instances left behind by test processes that were killed outright
 * (SIGKILL leaves no chance to clean up): each instance dir records its owner's pid.
 */
async function sweepStaleInstances(base: string): Promise<void> {
  let names: string[];
  try {
    names = (await readdir(base)).filter((n) => n.startsWith(DIR_PREFIX));
  } catch {
    return;
  }
  for (const name of names) {
    const dir = join(base, name);
    try {
      const owner = Number((await readFile(join(dir, 'owner.pid'), 'utf8')).trim());
      if (!(owner > 0) || isAlive(owner)) continue;
      const master = readMasterPid(join(dir, 'spool'));
      // Only signal a live process that really is a Postfix master (pids get reused).
      if (master && (await readFile(`/proc/${master}/cmdline`, 'latin1').catch(() => '')).includes('master')) {
        process.kill(master, 'SIGTERM');
      }
      await rm(dir, { recursive: true, force: true });
    } catch {
      // not ours or already gone
    }
  }
}

function installExitHooks(): void {
  if (exitHooksInstalled) return;
  exitHooksInstalled = true;
  process.once('exit', killLiveInstancesSync);
  for (const sig of ['SIGINT', 'SIGTERM'] as const) {
    process.once(sig, () => {
      killLiveInstancesSync();
      process.kill(process.pid, sig); // re-raise with the default action
    });
  }
}

/** Parent of instance dirs; short, since unix socket paths (spool/private/...) must stay under 108 bytes. */
function baseDir(): string {
  return tmpdir().length > 40 ? '/tmp' : tmpdir();
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function assertLoopback(host: string, what: string, allowLocalhost: boolean): void {
  if (!/^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(host) && !(allowLocalhost && host === 'localhost')) {
    throw new Error(`${what} must be a loopback IPv4 address (127.0.0.0/8), got ${host}`);
  }
}

function assertDomains(domains: string[], what: string): void {
  for (const d of domains) {
    if (!/^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$/i.test(d)) {
      throw new Error(`${what}: not a domain name: ${JSON.stringify(d)}`);
    }
  }
}

/** Reads the uid/gid of a system user from /etc/passwd (Postfix's mail_owner). */
async function lookupUser(name: string): Promise<{ uid: number; gid: number }> {
  const passwd = await readFile('/etc/passwd', 'utf8');
  for (const line of passwd.split('\n')) {
    const f = line.split(':');
    if (f[0] === name) return { uid: Number(f[2]), gid: Number(f[3]) };
  }
  throw new Error(`user ${name} not found: is postfix installed? run scripts/install-system-deps.sh`);
}

/** Resolves with the first line the server sends, or rejects (refused, closed, timeout). */
function readBanner(host: string, port: number, timeoutMs: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const sock = createConnection({ host, port });
    let buf = '';
    const done = (err: Error | null, line?: string) => {
      clearTimeout(timer);
      sock.removeAllListeners();
      sock.on('error', () => {});
      if (line !== undefined) sock.end('QUIT\r\n');
      sock.destroy();
      if (err) reject(err);
      else resolve(line ?? '');
    };
    const timer = setTimeout(() => done(new Error('banner timeout')), timeoutMs);
    sock.setEncoding('latin1');
    sock.on('data', (chunk: string) => {
      buf += chunk;
      const nl = buf.indexOf('\n');
      if (nl >= 0) done(null, buf.slice(0, nl).trimEnd());
    });
    sock.on('error', (err) => done(err));
    sock.on('close', () => done(new Error('connection closed before banner')));
  });
}

function myHostname(id: string): string {
  return `mx-${id}.postfix.test`;
}

function syslogName(id: string): string {
  return `postfix-parley-${id}`;
}

function buildMainCf(p: {
  id: string;
  rootDir: string;
  configDir: string;
  queueDir: string;
  dataDir: string;
  mailboxDir: string;
  logFile: string;
  host: string;
  relayHost?: { host: string; port: number };
  relayDomains: string[];
  mailboxDomains: string[];
  messageSizeLimit?: number;
  mailUid: number;
  mailGid: number;
  extra?: Record<string, string>;
}): string {
  const s: [string, string][] = [
    ['compatibility_level', '3.6'],
    // Everything private to this instance.
    ['queue_directory', p.queueDir],
    ['data_directory', p.dataDir],
    ['mail_owner', 'postfix'],
    ['setgid_group', 'postdrop'],
    ['syslog_name', syslogName(p.id)],
    ['maillog_file', p.logFile],
    ['maillog_file_prefixes', p.rootDir],
    // Identity: fixed names, no reliance on the machine's hostname or DNS.
    ['myhostname', myHostname(p.id)],
    ['mydomain', 'postfix.test'],
    ['myorigin', '$myhostname'],
    ['mydestination', ''],
    ['local_recipient_maps', ''],
    ['alias_maps', ''],
    ['alias_database', ''],
    ['biff', 'no'],
    ['append_dot_mydomain', 'no'],
    ['readme_directory', 'no'],
    ['smtpd_banner', '$myhostname ESMTP Postfix (Parley test instance)'],
    // Loopback only.
    // inet_interfaces must name configured interface addresses (127.0.0.2 is routable
    // on lo but not "configured"), so keep it at 127.0.0.1; the smtpd service binds to
    // listenHost:port explicitly in master.cf.
    ['inet_interfaces', '127.0.0.1'],
    ['inet_protocols', 'ipv4'],
    ['mynetworks', '127.0.0.0/8'],
    ['smtpd_relay_restrictions', 'permit_mynetworks, reject_unauth_destination'],
    ['smtpd_peername_lookup', 'no'],
    ['smtp_host_lookup', 'native'],
    ['lmtp_host_lookup', 'native'],
    ['smtp_tls_security_level', 'none'],
    ['smtpd_tls_security_level', 'none'],
    ['smtp_connect_timeout', '5s'],
    // Tests want each delivery to open and QUIT its own connection.
    ['smtp_connection_cache_on_demand', 'no'],
    ['smtpd_error_sleep_time', '0s'],
    ['in_flow_delay', '0s'],
    ['default_process_limit', '20'],
    // Retry deferred mail quickly; keep it long enough that it never bounces mid-test.
    // minimal_backoff_time is 2s, not 1s: time stamps have 1 s resolution, so with 1s a
    // deferred message can be rescanned within milliseconds, while the delivery agent
    // still holds its lock; qmgr then parks it in "incoming" for 60 s.
    ['queue_run_delay', '1s'],
    ['minimal_backoff_time', '2s'],
    ['maximal_backoff_time', '2s'],
    ['maximal_queue_lifetime', '1d'],
    ['bounce_queue_lifetime', '1d'],
    ['delay_warning_time', '0h'],
    ['relay_domains', p.relayDomains.join(' ')],
  ];
  if (p.relayHost) {
    // [brackets]: no MX lookup, connect to exactly this host:port.
    s.push(['relayhost', `[${p.relayHost.host}]:${p.relayHost.port}`]);
    // Same transport for relay_domains and everything else, so a message with
    // recipients in both goes out in one SMTP transaction.
    s.push(['relay_transport', 'smtp']);
  } else {
    // No relay: anything not for a mailbox domain bounces at once instead of trying DNS.
    s.push(['relayhost', '']);
    s.push(['default_transport', 'error:5.3.0 this test Postfix has no relayhost']);
    s.push(['relay_transport', 'error:5.3.0 this test Postfix has no relayhost']);
  }
  if (p.mailboxDomains.length > 0) {
    s.push(
      ['virtual_mailbox_domains', p.mailboxDomains.join(' ')],
      ['virtual_mailbox_base', p.mailboxDir],
      // virtual(8) refuses regexp substitutions, so: one catch-all Maildir per domain
      // ("@domain domain/"); readMailbox() picks a recipient's mail by Delivered-To.
      ['virtual_mailbox_maps', `texthash:${join(p.configDir, 'virtual_mailbox')}`],
      ['virtual_uid_maps', `static:${p.mailUid}`],
      ['virtual_gid_maps', `static:${p.mailGid}`],
      ['virtual_minimum_uid', '1'],
      ['virtual_mailbox_limit', '0'],
    );
  }
  if (p.messageSizeLimit !== undefined) s.push(['message_size_limit', String(p.messageSizeLimit)]);
  const settings = new Map(s);
  for (const [k, v] of Object.entries(p.extra ?? {})) settings.set(k, v);
  return `# Generated by test/support/postfix.ts\n${[...settings].map(([k, v]) => `${k} = ${v}`).join('\n')}\n`;
}

function buildMasterCf(host: string, port: number, syslogName: string): string {
  // chroot = n everywhere: the instance's files live in a temp dir, not a jail.
  return `# Generated by test/support/postfix.ts
# service  type  private unpriv  chroot  wakeup  maxproc command
${host}:${port} inet n - n - - smtpd
pickup     unix  n       -       n       60      1       pickup
cleanup    unix  n       -       n       -       0       cleanup
qmgr       unix  n       -       n       300     1       qmgr
rewrite    unix  -       -       n       -       -       trivial-rewrite
bounce     unix  -       -       n       -       0       bounce
defer      unix  -       -       n       -       0       bounce
trace      unix  -       -       n       -       0       bounce
verify     unix  -       -       n       -       1       verify
flush      unix  n       -       n       1000?   0       flush
proxymap   unix  -       -       n       -       -       proxymap
proxywrite unix  -       -       n       -       1       proxymap
smtp       unix  -       -       n       -       -       smtp
relay      unix  -       -       n       -       -       smtp
  -o syslog_name=${syslogName}/relay
showq      unix  n       -       n       -       -       showq
error      unix  -       -       n       -       -       error
retry      unix  -       -       n       -       -       error
discard    unix  -       -       n       -       -       discard
local      unix  -       n       n       -       -       local
virtual    unix  -       n       n       -       -       virtual
anvil      unix  -       -       n       -       1       anvil
scache     unix  -       -       n       -       1       scache
postlog    unix-dgram n  -       n       -       1       postlogd
`;
}

function buildVirtualMailboxMap(domains: string[]): string {
  // Trailing slash = Maildir.
  return domains.map((d) => `@${d}\t${d}/\n`).join('');
}

/** Runs a postfix tool, returning stdout; rejects with stdout+stderr on failure. */
async function run(cmd: string, args: string[], timeoutMs = 30_000): Promise<string> {
  try {
    const { stdout } = await execFileAsync(cmd, args, { timeout: timeoutMs, maxBuffer: 16 * 1024 * 1024 });
    return stdout;
  } catch (err) {
    const e = err as { stdout?: string; stderr?: string; message: string };
    throw new Error(`${cmd} ${args.join(' ')} failed: ${e.message}\n${e.stdout ?? ''}${e.stderr ?? ''}`);
  }
}

/**
 * `postfix check`'s messages. postfix(1) only writes them to stderr when that is a
 * terminal (else to syslog, which isn't running), so run it under script(1)'s pty.
 */
async function diagnoseConfig(configDir: string): Promise<string> {
  try {
    const { stdout } = await execFileAsync('script', ['-qec', `${POSTFIX_BIN} -c '${configDir}' check`, '/dev/null'], {
      timeout: 20_000,
    });
    return stdout.trim() || '(no complaints)';
  } catch (err) {
    const e = err as { stdout?: string; message: string };
    return (e.stdout ?? '').trim() || `(could not run postfix check: ${e.message})`;
  }
}

async function countQueueFiles(dir: string): Promise<number> {
  let entries;
  try {
    entries = await readdir(dir, { withFileTypes: true });
  } catch {
    return 0;
  }
  let n = 0;
  for (const e of entries) {
    if (e.isDirectory()) n += await countQueueFiles(join(dir, e.name));
    else n += 1;
  }
  return n;
}

/** The first (i.e. latest) Delivered-To header of a message, lower-cased. */
function deliveredTo(raw: Buffer): string | undefined {
  const head = raw.subarray(0, Math.min(raw.length, 8192)).toString('latin1');
  const end = head.search(/\r?\n\r?\n/);
  const m = /^delivered-to:[ \t]*(.*?)\r?$/im.exec(end >= 0 ? head.slice(0, end) : head);
  return m ? m[1].trim().toLowerCase() : undefined;
}

/** Maildir file names start with "<seconds>." and contain "M<microseconds>". */
function maildirOrder(a: { name: string; mtimeMs: number }, b: { name: string; mtimeMs: number }): number {
  const key = (n: string): [number, number] => {
    const sec = /^(\d+)\./.exec(n);
    const usec = /M(\d+)/.exec(n);
    return [sec ? Number(sec[1]) : 0, usec ? Number(usec[1]) : 0];
  };
  const [as, au] = key(a.name);
  const [bs, bu] = key(b.name);
  return as - bs || au - bu || a.mtimeMs - b.mtimeMs || a.name.localeCompare(b.name);
}

/**
 * Starts a private Postfix instance in the foreground (`postfix -c DIR start-fg` as a
 * child process) and resolves once its SMTP port answers 220. Always `stop()` it
 * (e.g. in `after`/`t.after`). See the module comment for the two modes.
 */
export async function startPostfix(opts: StartPostfixOptions = {}): Promise<PostfixInstance> {
  const reason = postfixSkipReason();
  if (reason) throw new Error(reason);
  const host = opts.listenHost ?? '127.0.0.1';
  assertLoopback(host, 'listenHost', false);
  if (opts.relayHost) assertLoopback(opts.relayHost.host, 'relayHost.host', true);
  assertDomains(opts.myDomains ?? [], 'myDomains');
  assertDomains(opts.mailboxDomains ?? [], 'mailboxDomains');
  if (!exitHooksInstalled) await sweepStaleInstances(baseDir());
  installExitHooks();

  // EADDRINUSE is worth retrying: a picked port lost a race (pick another), or a fixed
  // port is still held by an instance that is just going away (wait a little).
  const attempts = opts.listenPort ? 5 : 3;
  let lastErr: unknown;
  for (let i = 0; i < attempts; i++) {
    const port = opts.listenPort ? opts.listenPort : await getFreePort(host);
    try {
      return await startOnce(opts, host, port);
    } catch (err) {
      lastErr = err;
      if (!/Address already in use/i.test(String((err as Error).message))) throw err;
      if (opts.listenPort) await sleep(500);
    }
  }
  throw lastErr;
}

async function startOnce(opts: StartPostfixOptions, host: string, port: number): Promise<PostfixInstance> {
  const id = `${process.pid}-${++instanceCounter}`;
  const base = baseDir();
  const rootDir = await mkdtemp(join(base, DIR_PREFIX));
  const configDir = join(rootDir, 'etc');
  const queueDir = join(rootDir, 'spool');
  const dataDir = join(rootDir, 'data');
  const mailboxDir = join(rootDir, 'mail');
  const logFile = join(rootDir, 'postfix.log');
  const owner = await lookupUser('postfix');
  const mailboxDomains = (opts.mailboxDomains ?? []).map((d) => d.toLowerCase());
  const relayDomains = (opts.myDomains ?? []).map((d) => d.toLowerCase()).filter((d) => !mailboxDomains.includes(d));

  // Postfix is strict about ownership: root-owned, non-writable config and queue roots;
  // data_directory and the mailbox base owned by the postfix user.
  await chmod(rootDir, 0o755);
  await writeFile(join(rootDir, 'owner.pid'), `${process.pid}\n`);
  await mkdir(configDir, { mode: 0o755 });
  await mkdir(queueDir, { mode: 0o755 });
  await mkdir(dataDir, { mode: 0o700 });
  await chown(dataDir, owner.uid, owner.gid);
  await mkdir(mailboxDir, { mode: 0o755 });
  await chown(mailboxDir, owner.uid, owner.gid);
  await writeFile(
    join(configDir, 'main.cf'),
    buildMainCf({
      id,
      rootDir,
      configDir,
      queueDir,
      dataDir,
      mailboxDir,
      logFile,
      host,
      relayHost: opts.relayHost,
      relayDomains,
      mailboxDomains,
      messageSizeLimit: opts.messageSizeLimit,
      mailUid: owner.uid,
      mailGid: owner.gid,
      extra: opts.extraMainCf,
    }),
    { mode: 0o644 },
  );
  await writeFile(join(configDir, 'master.cf'), buildMasterCf(host, port, syslogName(id)), { mode: 0o644 });
  if (mailboxDomains.length > 0) {
    await writeFile(join(configDir, 'virtual_mailbox'), buildVirtualMailboxMap(mailboxDomains), { mode: 0o644 });
  }
  // Postfix won't read a file modified within the last second ("pausing to let it cool
  // down", 300 ms at a time), and every postconf/postfix-script step reads main.cf:
  // back-date the config so a start takes ~0.5 s instead of ~2.5 s.
  const past = new Date(Date.now() - 60_000);
  for (const f of await readdir(configDir)) await utimes(join(configDir, f), past, past);

  const readLog = async (): Promise<string> => {
    try {
      return await readFile(logFile, 'utf8');
    } catch {
      return '';
    }
  };
  const logTail = async (lines = 40): Promise<string> => (await readLog()).split('\n').slice(-lines - 1).join('\n');

  // Start in the foreground: postfix-script runs `master -s`, which stays our child.
  const child = spawn(POSTFIX_BIN, ['-c', configDir, 'start-fg'], {
    stdio: ['ignore', 'pipe', 'pipe'],
    // Own process group: "postfix stop" may signal the master's group, never ours.
    detached: true,
    env: { ...process.env, LANG: 'C', LC_ALL: 'C' },
  });
  const tracked = { queueDir, child };
  liveInstances.add(tracked);
  let output = '';
  const collect = (d: string) => {
    if (output.length < 64 * 1024) output += d;
  };
  child.stdout?.setEncoding('utf8').on('data', collect);
  child.stderr?.setEncoding('utf8').on('data', collect);
  const exited = new Promise<number | null>((resolve) => {
    if (child.exitCode !== null) resolve(child.exitCode);
    else child.once('exit', (code) => resolve(code));
  });
  let childError: Error | undefined;
  child.once('error', (err) => (childError = err));

  let stopped = false;
  const stop = async (): Promise<void> => {
    if (stopped) return;
    stopped = true;
    try {
      if (child.exitCode === null && child.signalCode === null) {
        // Graceful: master terminates its children; postfix-script waits up to 5 s.
        await run(POSTFIX_BIN, ['-c', configDir, 'stop'], 20_000).catch(() => undefined);
        const code = await Promise.race([exited, sleep(10_000).then(() => 'timeout' as const)]);
        if (code === 'timeout') {
          // The master runs in its own session/process group (it calls setsid), and
          // postfix-script in ours (detached): kill both groups.
          for (const pgid of [readMasterPid(queueDir), child.pid]) {
            try {
              if (pgid) process.kill(-pgid, 'SIGKILL');
            } catch {
              // already gone
            }
          }
          await Promise.race([exited, sleep(2_000)]);
        }
      }
    } finally {
      liveInstances.delete(tracked);
      if (process.env.PARLEY_KEEP_POSTFIX === '1') {
        process.stderr.write(`[postfix harness] kept instance directory ${rootDir}\n`);
      } else {
        await rm(rootDir, { recursive: true, force: true, maxRetries: 3 });
      }
    }
  };

  // Wait for the 220 banner (or for the child to die).
  const timeoutMs = opts.startTimeoutMs ?? 30_000;
  const deadline = Date.now() + timeoutMs;
  let banner: string | undefined;
  let lastErr = '';
  while (Date.now() < deadline) {
    if (childError || child.exitCode !== null || child.signalCode !== null) break;
    try {
      banner = await readBanner(host, port, 2_000);
      break;
    } catch (err) {
      lastErr = (err as Error).message;
      await sleep(50);
    }
  }
  // Our own banner, not some other server that grabbed the port in the meantime.
  if (banner === undefined || !banner.startsWith('220 ') || !banner.includes(myHostname(id))) {
    const why = childError
      ? `spawn failed: ${childError.message}`
      : child.exitCode !== null || child.signalCode !== null
        ? `postfix exited early (code ${child.exitCode}, signal ${child.signalCode})`
        : banner !== undefined
          ? `unexpected banner: ${banner}`
          : `no 220 banner within ${timeoutMs} ms (last error: ${lastErr})`;
    const log = await logTail();
    const check = await diagnoseConfig(configDir);
    await stop();
    throw new Error(
      `Postfix on ${host}:${port} did not start: ${why}\n--- output ---\n${output}\n--- log ---\n${log}` +
        `\n--- postfix check ---\n${check}`,
    );
  }

  const readDomainMailbox = async (domain: string): Promise<Buffer[]> => {
    const d = domain.toLowerCase();
    if (!mailboxDomains.includes(d)) throw new Error(`${domain} is not one of this instance's mailboxDomains`);
    const dir = join(mailboxDir, d);
    const files: { path: string; name: string; mtimeMs: number }[] = [];
    for (const sub of ['new', 'cur']) {
      let names: string[];
      try {
        names = await readdir(join(dir, sub));
      } catch {
        continue; // nothing delivered yet
      }
      for (const name of names) {
        const path = join(dir, sub, name);
        try {
          files.push({ path, name, mtimeMs: (await stat(path)).mtimeMs });
        } catch {
          // moved between readdir and stat: ignore
        }
      }
    }
    files.sort(maildirOrder);
    return Promise.all(files.map((f) => readFile(f.path)));
  };

  const readMailbox = async (localPart: string, domain: string): Promise<Buffer[]> => {
    const want = `${localPart}@${domain}`.toLowerCase();
    return (await readDomainMailbox(domain)).filter((m) => deliveredTo(m) === want);
  };

  const queueIsEmpty = async (): Promise<boolean> => {
    for (const q of ['maildrop', 'incoming', 'active', 'deferred', 'hold']) {
      if ((await countQueueFiles(join(queueDir, q))) > 0) return false;
    }
    return true;
  };

  const listQueue = async (): Promise<PostfixQueueEntry[]> => {
    const out = await run(POSTQUEUE_BIN, ['-c', configDir, '-j']);
    return out
      .split('\n')
      .filter((l) => l.trim() !== '')
      .map((l) => JSON.parse(l) as PostfixQueueEntry);
  };

  const describeState = async (): Promise<string> => {
    let queue: string;
    try {
      queue = JSON.stringify(await listQueue(), null, 2);
    } catch (err) {
      queue = `(postqueue failed: ${(err as Error).message})`;
    }
    return `--- queue ---\n${queue}\n--- log tail ---\n${await logTail()}`;
  };

  const waitForMail = async (localPart: string, domain: string, count: number, timeoutMs: number) => {
    const until = Date.now() + timeoutMs;
    for (;;) {
      const msgs = await readMailbox(localPart, domain);
      if (msgs.length >= count) return msgs;
      if (Date.now() >= until) {
        throw new Error(
          `timed out after ${timeoutMs} ms waiting for ${count} message(s) for ${localPart}@${domain}` +
            ` (have ${msgs.length})\n${await describeState()}`,
        );
      }
      await sleep(50);
    }
  };

  const waitForQueueEmpty = async (timeoutMs: number): Promise<void> => {
    const until = Date.now() + timeoutMs;
    while (!(await queueIsEmpty())) {
      if (Date.now() >= until) {
        throw new Error(`Postfix queue not empty after ${timeoutMs} ms\n${await describeState()}`);
      }
      await sleep(50);
    }
  };

  const flushQueue = async (): Promise<void> => {
    await run(POSTQUEUE_BIN, ['-c', configDir, '-f']);
  };

  return {
    host,
    port,
    configDir,
    mailboxDir,
    queueDir,
    logFile,
    rootDir,
    stop,
    readMailbox,
    readDomainMailbox,
    waitForMail,
    queueIsEmpty,
    waitForQueueEmpty,
    listQueue,
    flushQueue,
    readLog,
  };
}
