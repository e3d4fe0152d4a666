import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createServer, type Server } from 'node:net';
import { promisify } from 'node:util';
import { ConfigError, loadConfig } from '../../src/platform/config.ts';
import { createTestDatabase } from '../support/db.ts';
import { startTestPlatform } from '../support/platform.ts';

const run = promisify(execFile);

/** Configuration from the environment, validated with clear errors (issue 2 §1; src/platform/config.ts). */
describe('configuration', () => {
  it('works with nothing set: the defaults the README documents', () => {
    const c = loadConfig({}, undefined);
    assert.equal(c.httpPort, 8080);
    assert.equal(c.smtpPort, 2525);
    assert.deepEqual(c.domains, ['parley.localhost']);
    assert.equal(c.baseUrl, 'http://localhost:8080');
  });

  it('names the variable and shows the text it was given when a number is not a number', () => {
    assert.throws(
      () => loadConfig({ PARLEY_HTTP_PORT: 'abc' }, undefined),
      (e: unknown) => e instanceof ConfigError && /environment variable PARLEY_HTTP_PORT: .*\(got "abc"\)/.test(e.message),
    );
    assert.throws(
      () => loadConfig({ PARLEY_SMTP_PORT: '99999' }, undefined),
      (e: unknown) => e instanceof ConfigError && /environment variable PARLEY_SMTP_PORT: .*65535 \(got 99999\)/.test(e.message),
    );
  });

  it('parley start refuses an unknown role with a one-line message and exit status 2, before starting anything', async () => {
    await assert.rejects(run(process.execPath, ['bin/parley.js', 'start', '--roles', 'web,foo'], { env: { ...process.env, PARLEY_LOG_LEVEL: 'warn' }, timeout: 60_000 }), (e: any) => {
      assert.equal(e.code, 2);
      assert.match(e.stderr, /^parley: unknown role\(s\) foo; roles are web, worker, smtp$/m);
      assert.doesNotMatch(e.stderr, /^\s+at /m, 'a message, not a stack trace');
      return true;
    });
  });

  describe('a port another process holds', () => {
    let holder: Server;
    let port = 0;
    before(async () => {
      holder = createServer();
      await new Promise<void>((resolve) => holder.listen(0, '127.0.0.1', resolve));
      port = (holder.address() as { port: number }).port;
    });
    after(() => holder.close());

    it('is a ConfigError naming PARLEY_HTTP_PORT or PARLEY_SMTP_PORT, and a failed start lets go of the port it had taken', async () => {
      await assert.rejects(startTestPlatform({ httpPort: port }, ['web']), (e: unknown) => {
        assert.ok(e instanceof ConfigError, String(e));
        assert.equal(e.message, `127.0.0.1:${port} is already in use by another process: stop it, or choose another port with PARLEY_HTTP_PORT`);
        return true;
      });
      // The web role listens first, then the SMTP role fails: the HTTP port is let go again.
      const free = createServer();
      await new Promise<void>((resolve) => free.listen(0, '127.0.0.1', resolve));
      const httpPort = (free.address() as { port: number }).port;
      await new Promise<void>((resolve) => free.close(() => resolve()));
      await assert.rejects(startTestPlatform({ httpPort, smtpPort: port }, ['web', 'smtp']), (e: unknown) => e instanceof ConfigError && /PARLEY_SMTP_PORT/.test(e.message));
      const again = createServer();
      await new Promise<void>((resolve, reject) => again.once('error', reject).listen(httpPort, '127.0.0.1', resolve));
      await new Promise<void>((resolve) => again.close(() => resolve()));
    });

    it('parley start says so in one line and exits 2', async () => {
      const db = await createTestDatabase();
      try {
        const env = { ...process.env, DATABASE_URL: db.url, PARLEY_DOMAINS: 'alpha.test', PARLEY_HTTP_PORT: String(port), PARLEY_SMTP_PORT: '0', PARLEY_LOG_LEVEL: 'warn', PARLEY_DNS_OFFLINE: '1' };
        await assert.rejects(run(process.execPath, ['bin/parley.js', 'start', '--roles', 'web'], { env, timeout: 60_000 }), (e: any) => {
          assert.equal(e.code, 2);
          assert.match(e.stderr, new RegExp(`^parley: 127\\.0\\.0\\.1:${port} is already in use by another process: stop it, or choose another port with PARLEY_HTTP_PORT$`, 'm'));
          assert.doesNotMatch(e.stderr, /^\s+at /m, 'a message, not a stack trace');
          return true;
        });
      } finally {
        await db.drop();
      }
    });
  });
});
