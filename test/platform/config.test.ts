import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { ConfigError, loadConfig } from '../../src/platform/config.ts';

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
});
