import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { ApiClient, type TestPlatform, startTestPlatform } from '../support/platform.ts';
import { createUser } from '../../src/accounts/users.ts';

const PASSWORD = 'correct horse battery';

describe('admin API: users, suspension, password reset', () => {
  let tp: TestPlatform;
  let anon: ApiClient;
  let root: ApiClient;
  let bob: ApiClient;
  const login = (address: string, password = PASSWORD) => anon.post('/api/login', { address, password });

  before(async () => {
    tp = await startTestPlatform({}, ['web']);
    anon = new ApiClient(tp.base, null, '');
    await createUser(tp.platform.deps, { address: 'root@alpha.test', password: PASSWORD, isAdmin: true });
    const r = await login('root@alpha.test');
    assert.equal(r.status, 200);
    root = new ApiClient(tp.base, r.body.token, 'root@alpha.test');
    bob = await tp.user('bob@alpha.test');
  });
  after(async () => tp.stop());

  it('refuses non-admins (403 not_admin) and anonymous callers (401)', async () => {
    const attempts = [
      () => bob.post('/api/admin/users', { address: 'mallory@alpha.test', password: PASSWORD }),
      () => bob.get('/api/admin/users'),
      () => bob.call('PATCH', '/api/admin/users/bob@alpha.test', { is_admin: true }),
    ];
    for (const a of attempts) {
      const r = await a();
      assert.equal(r.status, 403);
      assert.equal(r.body.error.code, 'not_admin');
    }
    assert.equal((await anon.get('/api/admin/users')).status, 401);
    assert.equal((await anon.post('/api/admin/users', { address: 'x@alpha.test' })).status, 401);
    assert.equal((await login('mallory@alpha.test')).status, 401);
    assert.equal((await bob.get('/api/me')).body.is_admin, false);
  });

  it('creates users: 201, then they log in; 409 on a duplicate; 400 for a foreign domain, bad address or weak password', async () => {
    const r = await root.post('/api/admin/users', { address: 'Carol@Alpha.test', name: 'Carol C', password: PASSWORD });
    assert.equal(r.status, 201, JSON.stringify(r.body));
    assert.equal(r.body.address, 'carol@alpha.test');
    assert.equal(r.body.name, 'Carol C');
    assert.equal(r.body.is_admin, false);
    assert.equal(r.body.status, 'active');
    assert.equal(r.body.has_password, true);
    assert.equal((await login('carol@alpha.test')).status, 200);

    const dup = await root.post('/api/admin/users', { address: 'carol@alpha.test', password: PASSWORD });
    assert.equal(dup.status, 409);
    assert.equal(dup.body.error.code, 'user_exists');
    const foreign = await root.post('/api/admin/users', { address: 'dan@beta.test', password: PASSWORD });
    assert.equal(foreign.status, 400);
    assert.equal(foreign.body.error.code, 'foreign_domain');
    const bad = await root.post('/api/admin/users', { address: 'no at sign' });
    assert.equal(bad.status, 400);
    assert.equal(bad.body.error.code, 'invalid_address');
    const weak = await root.post('/api/admin/users', { address: 'weak@alpha.test', password: 'short' });
    assert.equal(weak.status, 400);
    assert.equal(weak.body.error.code, 'weak_password');
    const unknownField = await root.post('/api/admin/users', { address: 'odd@alpha.test', role: 'king' });
    assert.equal(unknownField.status, 400);
    assert.equal(unknownField.body.error.code, 'invalid_request');
    const stored = await tp.platform.deps.db.kysely.selectFrom('users').select('address').where('address', 'in', ['dan@beta.test', 'weak@alpha.test', 'odd@alpha.test']).execute();
    assert.deepEqual(stored, [], 'refused users are not stored');

    const admin = await root.post('/api/admin/users', { address: 'eve@alpha.test', is_admin: true });
    assert.equal(admin.status, 201);
    assert.equal(admin.body.has_password, false);
    assert.equal((await login('eve@alpha.test', '')).status, 401);
  });

  it('pages through users in address order', async () => {
    for (const a of ['p1@alpha.test', 'p2@alpha.test', 'p3@alpha.test']) await createUser(tp.platform.deps, { address: a });
    const expected = (await tp.platform.deps.db.kysely.selectFrom('users').select('address').execute()).map((r) => r.address).sort();
    const seen: string[] = [];
    let after: string | null = null;
    let pages = 0;
    do {
      const r: any = await root.get(`/api/admin/users?limit=2${after ? `&after=${encodeURIComponent(after)}` : ''}`);
      assert.equal(r.status, 200, JSON.stringify(r.body));
      assert.ok(r.body.items.length <= 2);
      seen.push(...r.body.items.map((u: any) => u.address));
      after = r.body.next_after;
      pages++;
    } while (after && pages < 50);
    assert.deepEqual(seen, expected);
    assert.equal((await root.get('/api/admin/users?limit=0')).status, 400);
  });

  it('a suspended user cannot act or log in; reactivated, they log in afresh', async () => {
    await createUser(tp.platform.deps, { address: 'sue@alpha.test', password: PASSWORD });
    const r = await login('sue@alpha.test');
    const sue = new ApiClient(tp.base, r.body.token, 'sue@alpha.test');
    assert.equal((await sue.post('/api/conversations', { subject: 'Hi', participants: ['bob@alpha.test'], messages: [{ body: 'x' }] })).status, 201);

    const s = await root.call('PATCH', '/api/admin/users/sue@alpha.test', { status: 'suspended' });
    assert.equal(s.status, 200, JSON.stringify(s.body));
    assert.equal(s.body.status, 'suspended');
    assert.equal((await sue.get('/api/me')).status, 401);
    assert.equal((await sue.post('/api/conversations', { subject: 'Hi', participants: ['bob@alpha.test'], messages: [{ body: 'x' }] })).status, 401);
    const refused = await login('sue@alpha.test');
    assert.equal(refused.status, 403);
    assert.equal(refused.body.error.code, 'account_suspended');
    // A wrong password on a suspended account says nothing about the suspension.
    assert.equal((await login('sue@alpha.test', 'wrong wrong')).body.error.code, 'invalid_credentials');

    const a = await root.call('PATCH', '/api/admin/users/sue%40alpha.test', { status: 'active' });
    assert.equal(a.status, 200);
    assert.equal(a.body.status, 'active');
    assert.equal((await sue.get('/api/me')).status, 401, 'sessions revoked by the suspension stay revoked');
    const again = await login('sue@alpha.test');
    assert.equal(again.status, 200);
    assert.equal((await new ApiClient(tp.base, again.body.token, 'sue@alpha.test').get('/api/me')).status, 200);
  });

  it('resets and removes passwords (revoking sessions), renames, grants admin', async () => {
    await createUser(tp.platform.deps, { address: 'tom@alpha.test', password: PASSWORD });
    const tom = new ApiClient(tp.base, (await login('tom@alpha.test')).body.token, 'tom@alpha.test');
    const reset = await root.call('PATCH', '/api/admin/users/tom@alpha.test', { password: 'a brand new secret', name: 'Tom T', is_admin: true });
    assert.equal(reset.status, 200, JSON.stringify(reset.body));
    assert.equal(reset.body.name, 'Tom T');
    assert.equal(reset.body.is_admin, true);
    assert.equal((await tom.get('/api/me')).status, 401);
    assert.equal((await login('tom@alpha.test')).status, 401);
    const fresh = await login('tom@alpha.test', 'a brand new secret');
    assert.equal(fresh.status, 200);
    const tom2 = new ApiClient(tp.base, fresh.body.token, 'tom@alpha.test');
    assert.equal((await tom2.get('/api/me')).body.is_admin, true);
    assert.equal((await tom2.get('/api/admin/users?limit=1')).status, 200);

    const removed = await root.call('PATCH', '/api/admin/users/tom@alpha.test', { password: null });
    assert.equal(removed.status, 200);
    assert.equal(removed.body.has_password, false);
    assert.equal((await tom2.get('/api/me')).status, 401);
    assert.equal((await login('tom@alpha.test', 'a brand new secret')).status, 401);
  });

  it('rejects bad patches: unknown user 404, empty 400, weak password 400, self-suspension 400', async () => {
    const cases: [string, unknown, number, string][] = [
      ['/api/admin/users/ghost@alpha.test', { status: 'suspended' }, 404, 'not_found'],
      ['/api/admin/users/bob@alpha.test', {}, 400, 'invalid_request'],
      ['/api/admin/users/bob@alpha.test', { status: 'deleted' }, 400, 'invalid_request'],
      ['/api/admin/users/bob@alpha.test', { password: 'short' }, 400, 'weak_password'],
      ['/api/admin/users/root@alpha.test', { status: 'suspended' }, 400, 'self_lockout'],
      ['/api/admin/users/root@alpha.test', { is_admin: false }, 400, 'self_lockout'],
    ];
    for (const [path, body, status, code] of cases) {
      const r = await root.call('PATCH', path, body);
      assert.equal(r.status, status, `${path} ${JSON.stringify(body)}: ${JSON.stringify(r.body)}`);
      assert.equal(r.body.error.code, code);
    }
    assert.equal((await root.get('/api/me')).body.is_admin, true);
    assert.equal((await bob.get('/api/me')).status, 200);
  });
});
