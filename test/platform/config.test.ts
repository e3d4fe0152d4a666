import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import pg from 'pg';
import { ConfigError, loadConfig } from '../../src/platform/config.ts';
import { ensureDirectory } from '../../src/platform/data-directory.ts';
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

  describe('the data directory (PARLEY_DATA_DIR)', () => {
    it('is created with its missing parents', () => {
      const root = mkdtempSync(join(tmpdir(), 'parley-config-'));
      try {
        ensureDirectory(join(root, 'a', 'b', 'c'));
        assert.ok(statSync(join(root, 'a', 'b', 'c')).isDirectory());
        ensureDirectory(join(root, 'a', 'b', 'c')); // already there: nothing to do
      } finally {
        rmSync(root, { recursive: true, force: true });
      }
    });

    it('a file in the way, or a place where nothing can be created, is a ConfigError naming the directory and the reason', () => {
      const root = mkdtempSync(join(tmpdir(), 'parley-config-'));
      try {
        writeFileSync(join(root, 'file'), 'x');
        assert.throws(() => ensureDirectory(join(root, 'file', 'data')), (e: unknown) => e instanceof ConfigError && e.message.includes(`${join(root, 'file')} is not a directory`));
        assert.equal(existsSync(join(root, 'file', 'data')), false);
      } finally {
        rmSync(root, { recursive: true, force: true });
      }
      // Node's recursive mkdir loops for ever here (ENOENT under /proc): this must not.
      if (process.platform === 'linux') assert.throws(() => ensureDirectory('/proc/parley-test/data'), (e: unknown) => e instanceof ConfigError && /\/proc\/parley-test/.test(e.message));
    });

    it('parley says so in one line and exits 2', async () => {
      const root = mkdtempSync(join(tmpdir(), 'parley-config-'));
      try {
        writeFileSync(join(root, 'file'), 'x');
        const env: NodeJS.ProcessEnv = { ...process.env, PARLEY_DATA_DIR: join(root, 'file', 'data'), PARLEY_LOG_LEVEL: 'warn' };
        delete env.DATABASE_URL; // the embedded PostgreSQL, under the data directory
        await assert.rejects(run(process.execPath, ['bin/parley.js', 'user', 'list'], { env, timeout: 60_000 }), (e: any) => {
          assert.equal(e.code, 2);
          assert.match(e.stderr, /^parley: the data directory .* cannot be created: .*file is not a directory \(PARLEY_DATA_DIR\)$/m);
          return true;
        });
      } finally {
        rmSync(root, { recursive: true, force: true });
      }
    });
  });

  describe('the database (DATABASE_URL)', () => {
    /** `parley user list` on `url`: the failure's exit status and stderr. */
    const userList = async (url: string) =>
      run(process.execPath, ['bin/parley.js', 'user', 'list'], { env: { ...process.env, DATABASE_URL: url, PARLEY_LOG_LEVEL: 'warn' }, timeout: 60_000 }).then(
        () => assert.fail('parley user list succeeded'),
        (e: any) => ({ code: e.code as number, stderr: e.stderr as string }),
      );

    it('one that cannot be reached or entered is one line naming where and why, without the password, and exit status 2', async () => {
      const admin = new URL(process.env.PARLEY_TEST_PG_URL!);
      const closed = createServer();
      await new Promise<void>((resolve) => closed.listen(0, '127.0.0.1', resolve));
      const deadPort = (closed.address() as { port: number }).port;
      await new Promise<void>((resolve) => closed.close(() => resolve()));
      const wrongPassword = `postgres://${admin.username}:s3cret-pw@${admin.host}/postgres`;
      // A PostgreSQL of one's own (PARLEY_TEST_PG_URL) may trust local connections whatever the password.
      const probe = new pg.Client({ connectionString: wrongPassword });
      const checksPasswords = await probe.connect().then(
        async () => (await probe.end(), false),
        () => true,
      );
      const cases: [string, RegExp][] = [
        [`postgres://parley:s3cret-pw@127.0.0.1:${deadPort}/parley`, /nothing listens there/],
        ...(checksPasswords ? [[wrongPassword, /the password was refused/] as [string, RegExp]] : []),
        [`postgres://${admin.username}:${admin.password}@${admin.host}/no_such_database_here`, /the database does not exist/],
      ];
      for (const [url, why] of cases) {
        const { code, stderr } = await userList(url);
        assert.equal(code, 2, stderr);
        assert.match(stderr, /^parley: cannot connect to PostgreSQL at postgres:\/\/.* — check DATABASE_URL$/m);
        assert.match(stderr, why);
        assert.doesNotMatch(stderr, /s3cret-pw/, 'the password is not shown');
        assert.doesNotMatch(stderr, /^\s+at /m, 'a message, not a stack trace');
      }
    });

    it('one that is not a PostgreSQL URL is refused before any connection', async () => {
      const { code, stderr } = await userList('notaurl');
      assert.equal(code, 2);
      assert.match(stderr, /environment variable DATABASE_URL: must be a PostgreSQL URL such as postgres:\/\/.* \(got "notaurl"\)/);
    });
  });
});
