/**
 * `kill -HUP` of a running `parley start` (a real child process on its embedded PostgreSQL, as
 * the README starts it): the federation allow and deny lists and rate limits are read again
 * from the config file and apply at once; an invalid configuration changes nothing; a changed
 * setting that needs a restart is named; the process and its database keep running.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const BIN = fileURLToPath(new URL('../../bin/parley.js', import.meta.url));

/** A request that names `platform` in its signature's keyid (the signature itself is garbage). */
async function requestFrom(base: string, platform: string): Promise<{ status: number; code: string | undefined }> {
  const r = await fetch(`${base}/federation/v1/ping`, {
    method: 'POST',
    headers: {
      'content-type': 'application/json',
      'signature-input': `parley=("@method" "@target-uri");created=${Math.floor(Date.now() / 1000)};keyid="${platform}#k1"`,
      signature: `parley=:${Buffer.alloc(64).toString('base64')}:`,
    },
    body: '{}',
  });
  const body = (await r.json().catch(() => null)) as { error?: { code?: string } } | null;
  return { status: r.status, code: body?.error?.code };
}

describe('parley start reloads its configuration on SIGHUP', () => {
  let dir: string;
  let configFile: string;
  let child: ChildProcess;
  let base: string;
  /** Log lines (pino JSON) of the child so far, and a way to wait for one. */
  const lines: Record<string, unknown>[] = [];
  let onLine: (() => void) | null = null;
  const waitForLog = async (msg: string, from = 0): Promise<Record<string, unknown>> => {
    for (;;) {
      const found = lines.slice(from).find((l) => l.msg === msg);
      if (found) return found;
      if (child.exitCode !== null) throw new Error(`parley exited (${child.exitCode}) before logging "${msg}"`);
      await new Promise<void>((r) => (onLine = r));
    }
  };
  const writeConfig = (c: Record<string, unknown>) => writeFileSync(configFile, JSON.stringify(c));

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'parley-reload-'));
    chmodSync(dir, 0o755); // as root the embedded server runs as the `postgres` user, which must reach it
    configFile = join(dir, 'parley.json');
    writeConfig({ federationDeny: [] });
    const env: NodeJS.ProcessEnv = {
      ...process.env,
      PARLEY_CONFIG: configFile,
      PARLEY_DOMAINS: 'alpha.test',
      PARLEY_DATA_DIR: join(dir, 'data'),
      PARLEY_HTTP_PORT: '0',
      PARLEY_SMTP_PORT: '0',
      PARLEY_LOG_LEVEL: 'info',
      PARLEY_DNS_OFFLINE: '1',
      // evil.test's keys would be fetched from here: a closed port, refused at once
      PARLEY_FEDERATION_ROUTES: 'evil.test=http://127.0.0.1:1',
    };
    delete env.DATABASE_URL; // the embedded database, under PARLEY_DATA_DIR
    child = spawn(process.execPath, [BIN, 'start', '--roles', 'web'], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let buf = '';
    child.stdout!.on('data', (c: Buffer) => {
      buf += c.toString();
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        try {
          lines.push(JSON.parse(line));
        } catch {
          /* not a log line */
        }
        onLine?.();
      }
    });
    child.stderr!.resume();
    child.on('exit', () => onLine?.());
    const started = await waitForLog('parley started');
    base = `http://127.0.0.1:${started.http}`;
  });
  after(async () => {
    if (child && child.exitCode === null) {
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      await exited;
    }
    rmSync(dir, { recursive: true, force: true });
  });

  it('denies a platform once the deny list names it, and lets it in again when it no longer does', async () => {
    const before = await requestFrom(base, 'evil.test');
    assert.notEqual(before.code, 'platform_denied', JSON.stringify(before));
    assert.equal(before.status, 401, 'not denied: its signature is checked (and fails)');

    writeConfig({ federationDeny: ['evil.test'], federationRatePerS: 5 });
    let mark = lines.length;
    child.kill('SIGHUP');
    const reloaded = await waitForLog('configuration reloaded', mark);
    assert.deepEqual([...(reloaded.applied as string[])].sort(), ['federationDeny', 'federationRatePerS']);
    assert.deepEqual(await requestFrom(base, 'evil.test'), { status: 403, code: 'platform_denied' });
    assert.equal((await requestFrom(base, 'other.test')).status, 401, 'only the named platform is denied');

    writeConfig({ federationDeny: [] });
    mark = lines.length;
    child.kill('SIGHUP');
    await waitForLog('configuration reloaded', mark);
    assert.equal((await requestFrom(base, 'evil.test')).status, 401);
  });

  it('keeps the running configuration when the new one is invalid, and names settings that need a restart', async () => {
    writeFileSync(configFile, '{"federationDeny": ["evil.test"');
    let mark = lines.length;
    child.kill('SIGHUP');
    const refused = await waitForLog('configuration not reloaded: it is invalid; the running one stays', mark);
    assert.match(String(refused.err), /not valid JSON/);
    assert.equal((await requestFrom(base, 'evil.test')).status, 401, 'the old (empty) deny list still holds');

    writeConfig({ federationDeny: ['evil.test'], maxBodyBytes: 2048 });
    mark = lines.length;
    child.kill('SIGHUP');
    const warned = await waitForLog('configuration reloaded: these changed settings apply only after a restart', mark);
    assert.deepEqual(warned.settings, ['maxBodyBytes']);
    assert.deepEqual(await requestFrom(base, 'evil.test'), { status: 403, code: 'platform_denied' });
    assert.equal(child.exitCode, null, 'still running after four SIGHUPs');
    assert.equal((await fetch(`${base}/health`)).status, 200, 'and its embedded database answers');
  });
});
