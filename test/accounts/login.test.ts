import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { ApiClient, type ApiResponse, type TestPlatform, startTestPlatform } from '../support/platform.ts';
import { createUser } from '../../src/accounts/users.ts';

const PASSWORD = 'correct horse battery';

describe('login, throttling and sessions', () => {
  let tp: TestPlatform;
  let anon: ApiClient;
  /** POST /api/login as if from `ip` (trustProxy is on: X-Forwarded-For sets the client IP). */
  const login = (address: string, password: string, ip: string, extra: Record<string, string> = {}, body: Record<string, unknown> = {}) =>
    anon.call('POST', '/api/login', { address, password, ...body }, { 'x-forwarded-for': ip, ...extra });
  const as = (r: ApiResponse, address: string) => {
    assert.equal(r.status, 200, JSON.stringify(r.body));
    return new ApiClient(tp.base, r.body.token, address);
  };
  const addUser = (address: string) => createUser(tp.platform.deps, { address, password: PASSWORD });

  before(async () => {
    tp = await startTestPlatform({ trustProxy: true }, ['web']);
    anon = new ApiClient(tp.base, null, '');
  });
  after(async () => tp.stop());

  it('logs in with the right password; wrong password and unknown address get the same 401', async () => {
    await addUser('ann@alpha.test');
    const ok = await login('Ann@Alpha.test', PASSWORD, '192.0.2.1');
    assert.equal(ok.status, 200, JSON.stringify(ok.body));
    assert.match(ok.body.token, /^prl_/);
    assert.match(ok.body.session_id, /^ses_/);
    assert.ok(Date.parse(ok.body.expires_at) > Date.now());
    const me = await as(ok, 'ann@alpha.test').get('/api/me');
    assert.equal(me.status, 200);
    assert.equal(me.body.address, 'ann@alpha.test');
    assert.equal(me.body.is_admin, false);
    assert.equal(me.body.status, 'active');
    assert.equal(me.body.session_id, ok.body.session_id);

    const wrong = await login('ann@alpha.test', 'not the password', '192.0.2.1');
    const unknown = await login('nobody@alpha.test', PASSWORD, '192.0.2.1');
    const malformed = await login('not an address', PASSWORD, '192.0.2.1');
    for (const r of [wrong, unknown, malformed]) {
      assert.equal(r.status, 401);
      assert.deepEqual(r.body, { error: { code: 'invalid_credentials', message: 'wrong address or password' } });
    }
    assert.equal((await anon.get('/api/me')).status, 401);
  });

  it('a user without a password cannot log in', async () => {
    await createUser(tp.platform.deps, { address: 'nopass@alpha.test' });
    const r = await login('nopass@alpha.test', '', '192.0.2.2');
    assert.equal(r.status, 401);
    assert.equal(r.body.error.code, 'invalid_credentials');
  });

  it('refuses the 6th attempt on an address after 5 failures, even with the right password, with Retry-After', async () => {
    await addUser('bea@alpha.test');
    for (let i = 0; i < 5; i++) {
      const r = await login('bea@alpha.test', `guess ${i}`, `198.51.100.${i + 1}`);
      assert.equal(r.status, 401, `attempt ${i + 1}`);
    }
    const r = await login('bea@alpha.test', PASSWORD, '198.51.100.99');
    assert.equal(r.status, 429);
    assert.equal(r.body.error.code, 'rate_limited');
    const retry = r.body.error.details.retry_after_s;
    assert.ok(Number.isInteger(retry) && retry >= 1 && retry <= 900, String(retry));
    assert.equal(r.headers.get('retry-after'), String(retry));
    // Other addresses from the same IPs are unaffected.
    await addUser('bea2@alpha.test');
    assert.equal((await login('bea2@alpha.test', PASSWORD, '198.51.100.1')).status, 200);
  });

  it('a success clears the address\'s failures', async () => {
    await addUser('cid@alpha.test');
    for (let i = 0; i < 4; i++) assert.equal((await login('cid@alpha.test', 'nope nope', '198.51.101.1')).status, 401);
    assert.equal((await login('cid@alpha.test', PASSWORD, '198.51.101.1')).status, 200);
    for (let i = 0; i < 5; i++) assert.equal((await login('cid@alpha.test', 'nope nope', '198.51.101.1')).status, 401, `after success, attempt ${i + 1}`);
    assert.equal((await login('cid@alpha.test', 'nope nope', '198.51.101.1')).status, 429);
  });

  it('counts only failures of the last 15 minutes, and Retry-After says when the window frees up', async () => {
    await addUser('dee@alpha.test');
    await addUser('dee2@alpha.test');
    const db = tp.platform.deps.db.kysely;
    const ago = (min: number) => new Date(Date.now() - min * 60_000);
    // Five failures 16-20 minutes ago: outside the window.
    await db.insertInto('login_failures').values([16, 17, 18, 19, 20].map((m) => ({ address: 'dee@alpha.test', ip: '198.51.102.1', at: ago(m) }))).execute();
    assert.equal((await login('dee@alpha.test', PASSWORD, '198.51.102.1')).status, 200);
    // Five failures 6-10 minutes ago: the oldest leaves the window in 5 minutes.
    await db.insertInto('login_failures').values([6, 7, 8, 9, 10].map((m) => ({ address: 'dee2@alpha.test', ip: '198.51.102.2', at: ago(m) }))).execute();
    const r = await login('dee2@alpha.test', PASSWORD, '198.51.102.3');
    assert.equal(r.status, 429);
    const retry = r.body.error.details.retry_after_s;
    assert.ok(retry > 280 && retry <= 300, String(retry));
  });

  it('refuses the 21st attempt from one IP after 20 failures, while other IPs still log in', async () => {
    const ip = '203.0.113.9';
    for (let i = 0; i < 20; i++) {
      const r = await login(`spray${i % 5}@alpha.test`, 'password1', ip);
      assert.equal(r.status, 401, `attempt ${i + 1}`);
    }
    await addUser('eli@alpha.test');
    const blocked = await login('eli@alpha.test', PASSWORD, ip);
    assert.equal(blocked.status, 429);
    assert.equal(blocked.body.error.code, 'rate_limited');
    assert.ok(Number(blocked.headers.get('retry-after')) >= 1);
    assert.equal((await login('eli@alpha.test', PASSWORD, '203.0.113.10')).status, 200);
    // IPv6 is counted per /64: another host of the same /64 is throttled too.
    for (let i = 0; i < 20; i++) assert.equal((await login(`v6spray${i % 5}@alpha.test`, 'password1', `2001:db8:1:2::${i + 1}`)).status, 401);
    assert.equal((await login('eli@alpha.test', PASSWORD, '2001:db8:1:2:ffff::1')).status, 429);
    assert.equal((await login('eli@alpha.test', PASSWORD, '2001:db8:1:3::1')).status, 200);
  });

  it('a burst of parallel guesses gets no more than 5 evaluated', async () => {
    await addUser('fay@alpha.test');
    const burst = await Promise.all(Array.from({ length: 10 }, (_, i) => login('fay@alpha.test', `burst ${i}`, `198.51.103.${i + 1}`)));
    const statuses = burst.map((r) => r.status);
    const evaluated = statuses.filter((s) => s === 401).length;
    assert.equal(evaluated + statuses.filter((s) => s === 429).length, 10, JSON.stringify(statuses));
    assert.ok(evaluated <= 5, JSON.stringify(statuses));
    // Sequential guesses until refused: exactly 5 evaluated in all.
    let more = 0;
    while ((await login('fay@alpha.test', 'again and again', '198.51.103.50')).status === 401) more++;
    assert.equal(evaluated + more, 5);
  });

  it('lists the caller\'s live sessions with device, IP and kind, and revokes one', async () => {
    await addUser('gil@alpha.test');
    await addUser('hal@alpha.test');
    const phone = as(await login('gil@alpha.test', PASSWORD, '192.0.2.10', {}, { device: 'Gil’s phone' }), 'gil@alpha.test');
    const lr = await login('gil@alpha.test', PASSWORD, '192.0.2.11', { 'user-agent': 'TestBrowser/1.0', 'sec-fetch-site': 'same-origin' });
    const browser = as(lr, 'gil@alpha.test');
    const cookie = lr.headers.get('set-cookie') ?? '';
    assert.match(cookie, new RegExp(`^parley_session=${lr.body.token};`));
    assert.match(cookie, /HttpOnly/i);

    const list = await phone.get('/api/sessions');
    assert.equal(list.status, 200);
    const byDevice = Object.fromEntries(list.body.items.map((s: any) => [s.device, s]));
    assert.deepEqual(Object.keys(byDevice).sort(), ['Gil’s phone', 'TestBrowser/1.0']);
    assert.equal(byDevice['Gil’s phone'].ip, '192.0.2.10');
    assert.equal(byDevice['Gil’s phone'].kind, 'bearer');
    assert.equal(byDevice['Gil’s phone'].current, true);
    assert.equal(byDevice['TestBrowser/1.0'].ip, '192.0.2.11');
    assert.equal(byDevice['TestBrowser/1.0'].kind, 'cookie');
    assert.equal(byDevice['TestBrowser/1.0'].current, false);
    assert.equal(byDevice['TestBrowser/1.0'].id, lr.body.session_id);

    // The cookie alone authenticates.
    const viaCookie = await anon.call('GET', '/api/me', undefined, { cookie: `parley_session=${lr.body.token}` });
    assert.equal(viaCookie.status, 200);
    assert.equal(viaCookie.body.session_id, lr.body.session_id);

    // Another user cannot see or revoke Gil's sessions.
    const hal = as(await login('hal@alpha.test', PASSWORD, '192.0.2.12'), 'hal@alpha.test');
    assert.equal((await hal.get('/api/sessions')).body.items.length, 1);
    const foreign = await hal.call('DELETE', `/api/sessions/${lr.body.session_id}`);
    assert.equal(foreign.status, 404);
    assert.equal((await browser.get('/api/me')).status, 200);

    const del = await phone.call('DELETE', `/api/sessions/${lr.body.session_id}`);
    assert.equal(del.status, 204);
    assert.equal((await browser.get('/api/me')).status, 401);
    assert.equal((await anon.call('GET', '/api/me', undefined, { cookie: `parley_session=${lr.body.token}` })).status, 401);
    assert.equal((await phone.call('DELETE', `/api/sessions/${lr.body.session_id}`)).status, 404);
    assert.deepEqual((await phone.get('/api/sessions')).body.items.map((s: any) => s.device), ['Gil’s phone']);
  });

  it('logout ends the current session only', async () => {
    await addUser('ida@alpha.test');
    const a = as(await login('ida@alpha.test', PASSWORD, '192.0.2.20'), 'ida@alpha.test');
    const b = as(await login('ida@alpha.test', PASSWORD, '192.0.2.21'), 'ida@alpha.test');
    const out = await a.post('/api/logout');
    assert.equal(out.status, 204);
    assert.match(out.headers.get('set-cookie') ?? '', /^parley_session=;/);
    assert.equal((await a.get('/api/me')).status, 401);
    assert.equal((await a.post('/api/logout')).status, 401);
    assert.equal((await b.get('/api/me')).status, 200);
  });

  it('documents the throttling limits in the OpenAPI document', async () => {
    const doc = await anon.get('/api/openapi.json');
    const d: string = doc.body.paths['/api/login'].post.description;
    assert.match(d, /5 failed logins per address/);
    assert.match(d, /20 per client IP/);
    for (const p of ['/api/sessions', '/api/sessions/{id}', '/api/me', '/api/admin/users', '/api/admin/users/{address}']) assert.ok(doc.body.paths[p], p);
  });
});
