import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { ApiClient, startTestPlatform, type TestPlatform } from '../support/platform.ts';
import { createUser } from '../../src/accounts/users.ts';
import { applyInboundEvents } from '../../src/delivery/inbound.ts';
import { knownPlugins } from '../../src/delivery/registry.ts';
import { ingestEmail } from '../../src/mail/inbound/ingest-email.ts';
import { createContact } from '../../src/organisations/contacts.ts';
import { createOrganisation, orgById } from '../../src/organisations/orgs.ts';
import { sendMessage } from '../../src/organisations/send.ts';

/**
 * The organisation / application API (issue 4 §5): organisations, roles, tokens and
 * scopes, contacts, CSV import, messages, templates, blasts, quota, idempotency. Web role
 * only: no worker runs, so deliveries stay where the API left them (pending).
 */
describe('organisations API', () => {
  let tp: TestPlatform;
  let admin: ApiClient;
  let owner: ApiClient;
  let member: ApiClient;
  let app: ApiClient; // an API token with every scope
  const db = () => tp.platform.deps.db.kysely;

  async function login(address: string, isAdmin = false): Promise<ApiClient> {
    await createUser(tp.platform.deps, { address, password: 'correct horse battery', isAdmin });
    const r = await new ApiClient(tp.base, null, address).post('/api/login', { address, password: 'correct horse battery' });
    assert.equal(r.status, 200);
    return new ApiClient(tp.base, r.body.token, address);
  }

  before(async () => {
    tp = await startTestPlatform({}, ['web']);
    admin = await login('root@alpha.test', true);
    owner = await tp.user('olive@alpha.test');
    member = await tp.user('mo@alpha.test');
  });
  after(async () => tp?.stop());

  test('a platform admin creates an organisation with its own address and owner; others cannot', async () => {
    const body = { slug: 'acme', name: 'Acme', address: 'acme@alpha.test', owner: 'olive@alpha.test', default_chain: ['smtp'] };
    assert.equal((await owner.post('/api/admin/organisations', body)).status, 403);
    const r = await admin.post('/api/admin/organisations', body);
    assert.equal(r.status, 201, JSON.stringify(r.body));
    assert.equal(r.body.address, 'acme@alpha.test');
    const u = await db().selectFrom('users').select(['type', 'password_hash']).where('address', '=', 'acme@alpha.test').executeTakeFirstOrThrow();
    assert.equal(u.type, 'shared');
    assert.equal(u.password_hash, null);
    assert.equal((await admin.post('/api/admin/organisations', { ...body, address: 'acme2@alpha.test' })).body.error.code, 'slug_taken');
    assert.equal((await admin.post('/api/admin/organisations', { ...body, default_chain: ['pigeon'] })).body.error.code, 'unknown_plugin');
    const mine = await owner.get('/api/organisations');
    assert.deepEqual(mine.body.items.map((o: any) => [o.slug, o.role]), [['acme', 'owner']]);
    const doc = await owner.get('/api/openapi.json');
    assert.equal(doc.status, 200);
    for (const path of ['/api/organisations/{slug}/messages', '/api/organisations/{slug}/blasts/{id}', '/api/organisations/{slug}/contacts/import'])
      assert.ok(Object.values(doc.body.paths[path] ?? {}).some((op: any) => op.tags?.includes('organisations') && op.summary), path);
  });

  test('roles: a member cannot create tokens or manage members; an owner can', async () => {
    assert.equal((await owner.call('PUT', '/api/organisations/acme/members/mo@alpha.test', { role: 'member' })).status, 200);
    const t = await member.post('/api/organisations/acme/tokens', { scopes: ['contacts:read'] });
    assert.equal(t.status, 403);
    assert.equal(t.body.error.code, 'insufficient_role');
    assert.equal((await member.call('PUT', '/api/organisations/acme/members/mo@alpha.test', { role: 'admin' })).status, 403);
    // An outsider does not even see the organisation.
    const outsider = await tp.user('eve@alpha.test');
    assert.equal((await outsider.get('/api/organisations/acme')).status, 404);
    // The last owner cannot be demoted.
    assert.equal((await owner.call('PUT', '/api/organisations/acme/members/olive@alpha.test', { role: 'admin' })).body.error.code, 'last_owner');
  });

  test('API tokens: shown once, scoped; missing scope → 403 naming it, bad token → 401', async () => {
    const bad = await owner.post('/api/organisations/acme/tokens', { scopes: ['contacts:read', 'root'] });
    assert.equal(bad.body.error.code, 'invalid_scope');
    const ro = await owner.post('/api/organisations/acme/tokens', { name: 'reader', scopes: ['contacts:read'] });
    assert.equal(ro.status, 201);
    assert.match(ro.body.token, /^pat_/);
    const reader = new ApiClient(tp.base, ro.body.token, 'reader');
    assert.equal((await reader.get('/api/organisations/acme/contacts')).status, 200);
    const w = await reader.post('/api/organisations/acme/contacts', { email: 'x@example.com' });
    assert.equal(w.status, 403);
    assert.equal(w.body.error.code, 'insufficient_scope');
    assert.equal(w.body.error.details.scope, 'contacts:write');
    assert.equal((await db().selectFrom('contacts').select('id').execute()).length, 0, 'nothing written');
    // Tokens never manage the organisation.
    assert.equal((await reader.post('/api/organisations/acme/tokens', { scopes: ['contacts:read'] })).body.error.code, 'session_required');
    const forged = new ApiClient(tp.base, 'pat_not-a-real-token', 'forged');
    const f = await forged.get('/api/organisations/acme/contacts');
    assert.equal(f.status, 401);
    assert.equal(f.body.error.code, 'invalid_token');
    // Listing shows no secret; revoking stops it at once.
    const list = await owner.get('/api/organisations/acme/tokens');
    assert.equal(list.body.items.length, 1);
    assert.equal(list.body.items[0].token, undefined);
    assert.equal((await owner.call('DELETE', `/api/organisations/acme/tokens/${ro.body.id}`)).status, 204);
    assert.equal((await reader.get('/api/organisations/acme/contacts')).status, 401);
    const all = await owner.post('/api/organisations/acme/tokens', { name: 'app', scopes: ['contacts:read', 'contacts:write', 'messages:send', 'blasts:send', 'deliveries:read'] });
    app = new ApiClient(tp.base, all.body.token, 'app');
  });

  test('contacts: CRUD, E.164 phones, invalid phone → 400 and nothing written', async () => {
    const c = await app.post('/api/organisations/acme/contacts', { name: 'Ann', email: 'Ann@Example.com', phone: '+44 7700-900 123', fields: { city: 'Leeds' } });
    assert.equal(c.status, 201, JSON.stringify(c.body));
    assert.equal(c.body.email, 'ann@example.com');
    assert.equal(c.body.phone, '+447700900123');
    for (const phone of ['07700 900123', '+0123', '+1234567890123456', 'call me']) {
      const r = await app.post('/api/organisations/acme/contacts', { name: 'Bad', phone });
      assert.equal(r.status, 400, phone);
      assert.equal(r.body.error.code, 'invalid_phone', phone);
    }
    assert.equal((await app.post('/api/organisations/acme/contacts', { name: 'Nobody' })).body.error.code, 'no_address');
    assert.equal((await app.post('/api/organisations/acme/contacts', { email: 'ann@example.com' })).status, 409);
    const p = await app.call('PATCH', `/api/organisations/acme/contacts/${c.body.id}`, { name: 'Ann Smith', preferred_chain: ['sms', 'smtp'] });
    assert.equal(p.status, 200);
    assert.equal(p.body.name, 'Ann Smith');
    assert.deepEqual(p.body.preferred_chain, ['sms', 'smtp']);
    assert.equal((await app.call('PATCH', `/api/organisations/acme/contacts/${c.body.id}`, { phone: '12' })).status, 400);
    assert.equal((await app.get(`/api/organisations/acme/contacts/${c.body.id}`)).body.phone, '+447700900123');
    const tmp = await app.post('/api/organisations/acme/contacts', { email: 'tmp@example.com' });
    assert.equal((await app.call('DELETE', `/api/organisations/acme/contacts/${tmp.body.id}`)).status, 204);
    assert.equal((await app.get(`/api/organisations/acme/contacts/${tmp.body.id}`)).status, 404);
    const n = await db().selectFrom('contacts').select('id').execute();
    assert.equal(n.length, 1);
  });

  test('CSV import: creates, updates, reports bad rows with their line numbers', async () => {
    const csv = [
      'name,email,phone,group,plan',
      'Ann Again,ann@example.com,,vip,gold', // line 2: updates Ann (by email)
      'Bob,bob@example.com,+1 (415) 555-0100,vip;news,', // line 3: created, two groups
      'Cat,not-an-email,,,', // line 4: bad email
      'Dan,,0207 946 0958,,', // line 5: national number, no default country
      ',,,news,', // line 6: no address
      '"Eve, Jr.",eve@example.com,+33612345678,news,silver', // line 7
    ].join('\n');
    const r = await app.call('POST', '/api/organisations/acme/contacts/import', csv, { 'content-type': 'text/csv' });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    assert.equal(r.body.created, 2);
    assert.equal(r.body.updated, 1);
    assert.deepEqual(r.body.skipped.map((s: any) => s.line), [4, 5, 6]);
    assert.match(r.body.skipped[1].reason, /E\.164/);
    const bob = await db().selectFrom('contacts').selectAll().where('email', '=', 'bob@example.com').executeTakeFirstOrThrow();
    assert.equal(bob.phone, '+14155550100');
    const ann = await db().selectFrom('contacts').selectAll().where('email', '=', 'ann@example.com').executeTakeFirstOrThrow();
    assert.equal(ann.name, 'Ann Again');
    assert.deepEqual(ann.fields, { city: 'Leeds', plan: 'gold' });
    const groups = await app.get('/api/organisations/acme/groups');
    assert.deepEqual(groups.body.items.map((g: any) => [g.name, g.size]).sort(), [['news', 2], ['vip', 2]]);
    // With a default country code the national number is accepted.
    const again = await app.call('POST', '/api/organisations/acme/contacts/import?default_country_code=44', 'name,phone\nDan,0207 946 0958\n', { 'content-type': 'text/csv' });
    assert.equal(again.body.created, 1);
    assert.ok(await db().selectFrom('contacts').select('id').where('phone', '=', '+442079460958').executeTakeFirst());
    const broken = await app.call('POST', '/api/organisations/acme/contacts/import', 'name,email\n"unclosed,a@b.c\n', { 'content-type': 'text/csv' });
    assert.equal(broken.body.error.code, 'invalid_csv');
    const noAddr = await app.call('POST', '/api/organisations/acme/contacts/import', 'name,city\nX,Y\n', { 'content-type': 'text/csv' });
    assert.equal(noAddr.body.error.code, 'invalid_header');
  });

  test('a message to a contact is a message:add in a new conversation, with its delivery pending (no relay)', async () => {
    const ann = await db().selectFrom('contacts').selectAll().where('email', '=', 'ann@example.com').executeTakeFirstOrThrow();
    const r = await app.post('/api/organisations/acme/messages', { contact_id: ann.id, subject: 'Hello {{name}}', body: 'Hi {{name}}, plan {{fields.plan}}, pet {{ fields.pet }}.', chain: ['smtp'] });
    assert.equal(r.status, 201, JSON.stringify(r.body));
    assert.equal(r.body.body, 'Hi Ann Again, plan gold, pet .');
    assert.equal(r.body.state, 'pending');
    const conv = await db().selectFrom('conversations').selectAll().where('key', '=', r.body.conversation).executeTakeFirstOrThrow();
    assert.equal(conv.creator, 'acme@alpha.test');
    assert.equal(conv.subject, 'Hello Ann Again');
    assert.ok(conv.org_id);
    const parts = await db().selectFrom('participants').select('address').where('conv_id', '=', conv.id).orderBy('address').execute();
    assert.deepEqual(parts.map((p) => p.address), ['acme@alpha.test', 'ann@example.com']);
    const msg = await db().selectFrom('messages').selectAll().where('conv_id', '=', conv.id).where('id', '=', r.body.action_id).executeTakeFirstOrThrow();
    assert.equal(msg.author, 'acme@alpha.test');
    assert.equal(msg.body, 'Hi Ann Again, plan gold, pet .');
    const ds = await db().selectFrom('deliveries').selectAll().where('conv_id', '=', conv.id).execute();
    assert.equal(ds.length, 1, 'one delivery: the chain’s, not also the email bridge’s');
    assert.equal(ds[0].plugin, 'smtp');
    assert.equal(ds[0].destination, 'ann@example.com');
    assert.equal(ds[0].state, 'pending');
    assert.equal(ds[0].outbound_message_id, r.body.id);
    assert.equal(ds[0].contact_id, ann.id);
    assert.equal((await db().selectFrom('contacts').select('conv_id').where('id', '=', ann.id).executeTakeFirstOrThrow()).conv_id, conv.id);
    // A second message joins the same conversation.
    const r2 = await app.post('/api/organisations/acme/messages', { contact_id: ann.id, body: 'Second', chain: ['smtp'] });
    assert.equal(r2.body.conversation, r.body.conversation);
    assert.ok(r2.body.action_id > r.body.action_id);
    const one = await app.get(`/api/organisations/acme/messages/${r.body.id}`);
    assert.equal(one.body.deliveries[0].state, 'pending');
    assert.deepEqual(one.body.deliveries[0].attempts, []);
  });

  test('templates: unknown placeholders → 400 listing them, nothing created', async () => {
    const ann = await db().selectFrom('contacts').select('id').where('email', '=', 'ann@example.com').executeTakeFirstOrThrow();
    const before = (await db().selectFrom('outbound_messages').select('id').execute()).length;
    const r = await app.post('/api/organisations/acme/messages', { contact_id: ann.id, body: 'Hi {{first_name}} {{name}} {{fields.}} {{ 1+1 }}' });
    assert.equal(r.status, 400);
    assert.equal(r.body.error.code, 'unknown_placeholder');
    assert.deepEqual(r.body.error.details.placeholders.map((p: any) => p.placeholder), ['{{first_name}}', '{{fields.}}', '{{ 1+1 }}']);
    assert.equal((await db().selectFrom('outbound_messages').select('id').execute()).length, before);
  });

  test('a member’s reply in a contact conversation reaches the contact through the chain, not the email bridge', async () => {
    const ann = await db().selectFrom('contacts').selectAll().where('email', '=', 'ann@example.com').executeTakeFirstOrThrow();
    const conv = await db().selectFrom('conversations').select('key').where('id', '=', ann.conv_id!).executeTakeFirstOrThrow();
    const j = await member.post(`/api/organisations/acme/conversations/${conv.key}/join`);
    assert.equal(j.status, 200, JSON.stringify(j.body));
    const r = await member.post(`/api/conversations/${conv.key}/actions`, { actions: [{ act: 'message:add', body: 'A member writes' }] });
    assert.ok(r.status < 300, JSON.stringify(r.body));
    const ds = await db()
      .selectFrom('deliveries as d')
      .innerJoin('outbound_messages as m', 'm.id', 'd.outbound_message_id')
      .select(['d.plugin', 'd.chain', 'd.destination', 'm.author', 'm.body'])
      .where('m.author', '=', 'mo@alpha.test')
      .execute();
    assert.equal(ds.length, 1);
    assert.deepEqual(ds[0].chain, ['sms', 'smtp'], 'the contact’s preferred chain');
    assert.equal(ds[0].destination, '+447700900123');
    assert.equal(ds[0].body, 'A member writes');
    const bridge = await db().selectFrom('deliveries').select('id').where('idempotency_key', 'like', 'smtp:%').execute();
    assert.equal(bridge.length, 0, 'no automatic email to the contact');
  });

  test('idempotency_key: a replay returns the same message and sends nothing more', async () => {
    const bob = await db().selectFrom('contacts').select('id').where('email', '=', 'bob@example.com').executeTakeFirstOrThrow();
    const body = { contact_id: bob.id, body: 'Your code is 1234', chain: ['smtp'], idempotency_key: 'order-77' };
    const a = await app.post('/api/organisations/acme/messages', body);
    assert.equal(a.status, 201);
    const b = await app.post('/api/organisations/acme/messages', body);
    assert.equal(b.status, 200);
    assert.equal(b.body.id, a.body.id);
    assert.equal(b.body.delivery_id, a.body.delivery_id);
    const n = await db().selectFrom('outbound_messages').select('id').where('contact_id', '=', bob.id).execute();
    assert.equal(n.length, 1);
    const ann = await db().selectFrom('contacts').select('id').where('email', '=', 'ann@example.com').executeTakeFirstOrThrow();
    assert.equal((await app.post('/api/organisations/acme/messages', { ...body, contact_id: ann.id })).body.error.code, 'idempotency_key_reused');
  });

  test('a blast to 200 contacts: 202 at once, live counts equal a recount of its deliveries', async () => {
    const csv = ['name,email,phone,group', ...Array.from({ length: 200 }, (_, i) => `P${i},p${i}@example.org,${i % 2 ? `+1555000${String(i).padStart(4, '0')}` : ''},crowd`)].join('\n');
    const imp = await app.call('POST', '/api/organisations/acme/contacts/import', csv, { 'content-type': 'text/csv' });
    assert.equal(imp.body.created, 200, JSON.stringify(imp.body));
    const g = (await app.get('/api/organisations/acme/groups')).body.items.find((x: any) => x.name === 'crowd');
    assert.equal(g.size, 200);
    const r = await app.post('/api/organisations/acme/blasts', { group_id: g.id, subject: 'News', template: 'Dear {{name}}', chain: ['sms', 'smtp'] });
    assert.equal(r.status, 202, JSON.stringify(r.body));
    assert.equal(r.body.total, 200);
    const deadline = Date.now() + 60_000;
    let view: any;
    for (;;) {
      view = (await app.get(`/api/organisations/acme/blasts/${r.body.id}`)).body;
      if (view.prepared_at) break;
      assert.ok(Date.now() < deadline, `blast not prepared in time: ${JSON.stringify(view)}`);
      await new Promise((res) => setTimeout(res, 50));
    }
    const rows = await db().selectFrom('deliveries').select(['state', 'plugin', 'contact_id', 'conv_id']).where('blast_id', '=', r.body.id).execute();
    assert.equal(rows.length, 200);
    assert.equal(new Set(rows.map((d) => d.contact_id)).size, 200);
    assert.equal(new Set(rows.map((d) => d.conv_id)).size, 200, 'one conversation per contact');
    const recount: Record<string, number> = {};
    const byPlugin: Record<string, number> = {};
    for (const d of rows) {
      recount[d.state] = (recount[d.state] ?? 0) + 1;
      byPlugin[d.plugin] = (byPlugin[d.plugin] ?? 0) + 1;
    }
    for (const [state, n] of Object.entries(view.counts)) assert.equal(n, recount[state] ?? 0, state);
    assert.equal(byPlugin.sms, 100, 'contacts with a phone start on sms');
    assert.equal(byPlugin.smtp, 100, 'the others skip to smtp');
    assert.equal(view.by_plugin.sms.pending, 100);
    assert.equal(view.preparing, 0);
    const m = await db().selectFrom('outbound_messages').select('body').where('blast_id', '=', r.body.id).orderBy('id').limit(1).executeTakeFirstOrThrow();
    assert.equal(m.body, 'Dear P0');
  });

  test('quota: over the daily quota → 429 quota_exceeded; a blast larger than what remains creates nothing', async () => {
    const used = (await app.get('/api/organisations/acme')).body.usage.used_today;
    assert.equal((await admin.call('PATCH', '/api/admin/organisations/acme', { quota_per_day: used + 1 })).status, 200);
    const g = (await app.get('/api/organisations/acme/groups')).body.items.find((x: any) => x.name === 'news');
    const blastsBefore = (await db().selectFrom('blasts').select('id').execute()).length;
    const b = await app.post('/api/organisations/acme/blasts', { group_id: g.id, template: 'Hi' });
    assert.equal(b.status, 429);
    assert.equal(b.body.error.code, 'quota_exceeded');
    assert.equal(b.body.error.details.remaining_today, 1);
    assert.equal(b.body.error.details.requested, 2);
    assert.ok(b.headers.get('retry-after'));
    assert.equal((await db().selectFrom('blasts').select('id').execute()).length, blastsBefore);
    const bob = await db().selectFrom('contacts').select('id').where('email', '=', 'bob@example.com').executeTakeFirstOrThrow();
    assert.equal((await app.post('/api/organisations/acme/messages', { contact_id: bob.id, body: 'one', chain: ['smtp'] })).status, 201);
    const over = await app.post('/api/organisations/acme/messages', { contact_id: bob.id, body: 'two', chain: ['smtp'] });
    assert.equal(over.status, 429);
    assert.equal(over.body.error.code, 'quota_exceeded');
  });
});

describe('organisations: inbound replies', () => {
  let tp: TestPlatform;
  let orgId: number;
  const db = () => tp.platform.deps.db.kysely;

  before(async () => {
    tp = await startTestPlatform({}, ['web']);
    const deps = tp.platform.deps;
    await createUser(deps, { address: 'boss@alpha.test' });
    orgId = (await createOrganisation(deps, { slug: 'shop', name: 'Shop', address: 'shop@alpha.test', owner: 'boss@alpha.test', default_chain: ['sms', 'smtp'] })).id;
  });
  after(async () => tp?.stop());

  async function contact(email: string | null, phone: string | null): Promise<number> {
    return (await createContact(tp.platform.deps, orgId, { name: 'C', email, phone })).id;
  }
  async function send(contactId: number, body: string) {
    return (await sendMessage(tp.platform.deps, await orgById(db(), orgId), { contact_id: contactId, body })).message;
  }
  async function smsReply(from: string, text: string) {
    return applyInboundEvents(tp.platform.deps, knownPlugins().get('sms')!, orgId, [{ kind: 'replied', from, text }]);
  }
  const messagesOf = (convId: number) => db().selectFrom('messages').select(['author', 'body']).where('conv_id', '=', convId).orderBy('id').execute();

  test('an SMS reply is matched to the contact (phone-only: its sms.invalid address) and threads into its conversation', async () => {
    const id = await contact(null, '+15550001111');
    const m = await send(id, 'Your table is ready');
    const conv = await db().selectFrom('conversations').select('id').where('key', '=', m.conversation!).executeTakeFirstOrThrow();
    const parts = await db().selectFrom('participants').select('address').where('conv_id', '=', conv.id).orderBy('address').execute();
    assert.deepEqual(parts.map((p) => p.address), ['+15550001111@sms.invalid', 'shop@alpha.test']);
    await smsReply('+15550001111', 'On my way');
    assert.deepEqual((await messagesOf(conv.id)).slice(-1), [{ author: '+15550001111@sms.invalid', body: 'On my way' }]);
    const d = await db().selectFrom('deliveries').select('state').where('id', '=', m.delivery_id!).executeTakeFirstOrThrow();
    assert.equal(d.state, 'replied');
    // No email of the reply to the contact's pseudo-address.
    assert.equal((await db().selectFrom('deliveries').select('id').where('destination', 'like', '%@sms.invalid').execute()).length, 0);
  });

  test('a text from a contact with no conversation starts one; an unknown number changes nothing', async () => {
    const id = await contact('kim@example.com', '+15550002222');
    await smsReply('+1 555 000 2222', 'Hello?');
    const c = await db().selectFrom('contacts').select('conv_id').where('id', '=', id).executeTakeFirstOrThrow();
    assert.ok(c.conv_id);
    const conv = await db().selectFrom('conversations').select(['creator', 'org_id']).where('id', '=', c.conv_id).executeTakeFirstOrThrow();
    assert.equal(conv.creator, 'kim@example.com');
    assert.equal(conv.org_id, orgId);
    assert.deepEqual(await messagesOf(c.conv_id), [{ author: 'kim@example.com', body: 'Hello?' }]);
    const before = (await db().selectFrom('actions').select('id').execute()).length;
    const r = await smsReply('+15559999999', 'who is this');
    assert.equal(r.unmatched, 1);
    assert.equal((await db().selectFrom('actions').select('id').execute()).length, before);
  });

  test('an email reply threaded by the bridge marks the delivery it answers replied', async () => {
    const id = await contact('lee@example.com', null);
    const m = await send(id, 'Invoice attached');
    // The worker would have sent it; this platform runs no worker.
    await db().updateTable('deliveries').set({ state: 'sent' }).where('id', '=', m.delivery_id!).execute();
    const d0 = await db().selectFrom('deliveries').select(['payload']).where('id', '=', m.delivery_id!).executeTakeFirstOrThrow();
    const raw = Buffer.from(
      `From: Lee <lee@example.com>\r\nTo: shop@alpha.test\r\nSubject: Re: Shop\r\nMessage-ID: <r1@example.com>\r\n` +
        `In-Reply-To: <${(d0.payload as any).message_id}>\r\nDate: ${new Date().toUTCString()}\r\n\r\nThanks, paid.\r\n`,
    );
    const r = await ingestEmail(tp.platform.deps, raw, { mailFrom: 'lee@example.com', rcptTo: ['shop@alpha.test'], remoteIp: '', helo: '' }, { mode: 'import' });
    assert.deepEqual(r.threaded, [m.conversation], JSON.stringify(r));
    const d = await db().selectFrom('deliveries').select('state').where('id', '=', m.delivery_id!).executeTakeFirstOrThrow();
    assert.equal(d.state, 'replied');
    const ev = await db().selectFrom('delivery_events').select(['kind']).where('delivery_id', '=', m.delivery_id!).execute();
    assert.deepEqual(ev.map((e) => e.kind), ['replied']);
  });
});
