import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { sql } from 'kysely';
import { createUser } from '../../src/accounts/users.ts';
import { ApiClient, startTestPlatform, type TestPlatform } from '../support/platform.ts';
import { type SmtpSink, startSmtpSink } from '../support/smtp-sink.ts';
import { type FakeSms, type SmsMode, startFakeSms } from '../delivery/support/fake-sms.ts';

/**
 * Issue 4, Done means 2 and 3, in one run: a blast to 10,000 contacts (imported through the
 * CSV endpoint, each with a phone and an email) along the servicechain [sms, smtp], where the
 * SMS gateway (the fake Twilio-like gateway, honouring Idempotency-Key) refuses 10 % of the
 * numbers permanently and never answers for 5 % — which number gets which fate is decided
 * here, by a hash of the number, so the expected outcome of every contact is known in advance.
 * Email goes to a real SMTP server (the sink), as PARLEY_RELAY_URL.
 *
 * The web role runs in this process (API, blast preparation); the delivery worker is a real
 * `parley start --roles worker` child process, killed with SIGKILL once about 30 % of the
 * deliveries are final, then replaced by a new one.
 *
 * What the engine does with a timeout (docs/delivery.md, "Retry policy" and "Servicechains"):
 * an attempt that times out is a `retry` outcome; the step is attempted again with the same
 * idempotency key after the sms backoff, until the sms policy's 5 attempts ran out; then the
 * row moves on to the next step (smtp) — so a number that never answers is reached by email.
 * The attempt timeout is the plugin's (10 s for sms) capped at 80 % of the lease, so the
 * worker runs with PARLEY_DELIVERY_LEASE_MS = LEASE_MS: 1 s, an 800 ms timeout — short, since
 * every silent number costs 5 of them and a hanging attempt holds up its whole claimed batch,
 * yet long enough that emails to the sink are not cut short on a busy machine (a timed-out
 * SMTP attempt the relay did take is sent again, same Message-ID: at 400 ms, ~270 of 1,500
 * emails came twice).
 *
 * Duration: 5–8 minutes on the shared 2-CPU machine (load 4–9): blast preparation at
 * 30–60 messages/s (docs/organisations.md), then the silent numbers' retries.
 *
 * Asserted: every contact's delivery ends final; accepted numbers got exactly one SMS and no
 * email; refused and silent numbers got no SMS and exactly one email (one Message-ID — an SMTP
 * repeat after a lost reply would carry the same one); every request the gateway saw for a
 * number carried that number's one idempotency key, and it took at most one message per
 * number; silent numbers gave up after the policy's attempts, each a timed-out `retry`, and
 * moved on to smtp; an email that came twice came from a repeated smtp attempt; the blast's
 * counts equal a recount of the contacts' delivery rows and the outcome the fates predict.
 */

const CONTACTS = 10_000;
/** Lease of the child workers: the sms attempt timeout becomes 80 % of it. */
const LEASE_MS = 1000;
/** Deadline for the whole blast once it is created. */
const BLAST_DEADLINE_MS = 20 * 60_000;
const FINAL = ['sent', 'delivered', 'read', 'replied', 'failed', 'cancelled'];

/** The fate of a phone number at the SMS gateway: 10 % refused, 5 % never answered, the rest accepted. */
function fate(phone: string): SmsMode {
  const h = createHash('sha256').update(phone).digest().readUInt32BE(0) % 100;
  return h < 10 ? 'permanent' : h < 15 ? 'hang' : 'accept';
}

const phoneOf = (i: number) => `+1555${String(1_000_000 + i * 7).padStart(7, '0')}`;
const emailOf = (i: number) => `contact${i}@example.com`;

/** Polls `fn` every `everyMs` until it returns something truthy; throws after `timeoutMs`. */
async function until<T>(what: string, fn: () => Promise<T | null | undefined | false>, timeoutMs: number, everyMs = 250): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

describe('a blast to 10,000 contacts along [sms, smtp], a worker killed midway (issue 4, Done means 2 and 3)', () => {
  let tp: TestPlatform;
  let sink: SmtpSink;
  let sms: FakeSms;
  const dataDirs: string[] = [];
  const children = new Set<ChildProcess>();

  before(async () => {
    sink = await startSmtpSink();
    sms = await startFakeSms();
    sms.decide = fate;
    tp = await startTestPlatform({ relayUrl: `smtp://127.0.0.1:${sink.port}` }, ['web']);
  });
  after(async () => {
    for (const c of children) c.kill('SIGKILL');
    await tp?.stop();
    await sms?.close();
    await sink?.close();
    for (const d of dataDirs) rmSync(d, { recursive: true, force: true });
  });

  /** Spawns `parley start --roles worker` on the test database; `exited` resolves with its exit signal or code. */
  function startWorker(name: string) {
    const dataDir = mkdtempSync(join(tmpdir(), `parley-${name}-`));
    dataDirs.push(dataDir);
    const child = spawn(process.execPath, ['bin/parley.js', 'start', '--roles', 'worker'], {
      env: {
        ...process.env,
        DATABASE_URL: tp.config.databaseUrl,
        PARLEY_DOMAINS: 'alpha.test',
        PARLEY_DATA_DIR: dataDir,
        PARLEY_RELAY_URL: `smtp://127.0.0.1:${sink.port}`,
        PARLEY_DELIVERY_LEASE_MS: String(LEASE_MS),
        PARLEY_LOG_LEVEL: 'error',
        PARLEY_DNS_OFFLINE: '1',
      },
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    children.add(child);
    let stderr = '';
    child.stderr!.on('data', (c) => (stderr = (stderr + c).slice(-4000)));
    const exited = new Promise<NodeJS.Signals | number | null>((resolve) =>
      child.once('exit', (code, sig) => {
        children.delete(child);
        resolve(sig ?? code);
      }),
    );
    return { child, exited, stderr: () => stderr };
  }

  test('every contact ends final, refused and silent numbers are reached by email, nobody gets a message twice, counts add up', async () => {
    const t0 = Date.now();
    const mark = (what: string) => console.log(`# ${((Date.now() - t0) / 1000).toFixed(1)} s: ${what}`);

    // An organisation, created and configured through the API.
    await createUser(tp.platform.deps, { address: 'root@alpha.test', password: 'correct horse battery', isAdmin: true });
    const login = await new ApiClient(tp.base, null, 'root@alpha.test').post('/api/login', { address: 'root@alpha.test', password: 'correct horse battery' });
    assert.equal(login.status, 200);
    const admin = new ApiClient(tp.base, login.body.token, 'root@alpha.test');
    const owner = await tp.user('olive@alpha.test');
    const created = await admin.post('/api/admin/organisations', { slug: 'bulk', name: 'Bulk Ltd', address: 'bulk@alpha.test', owner: 'olive@alpha.test' });
    assert.equal(created.status, 201, JSON.stringify(created.body));
    const limits = await admin.call('PATCH', '/api/admin/organisations/bulk', { quota_per_day: 1_000_000, rate_per_minute: 1_000_000 });
    assert.equal(limits.status, 200, JSON.stringify(limits.body));
    const cfg = await owner.call('PATCH', '/api/organisations/bulk', {
      plugin_config: { sms: { base_url: sms.baseUrl, account: sms.account, token: sms.token, from: '+15550001000', status_callback: false } },
    });
    assert.equal(cfg.status, 200, JSON.stringify(cfg.body));
    const tok = await owner.post('/api/organisations/bulk/tokens', { name: 'blaster', scopes: ['contacts:read', 'contacts:write', 'messages:send', 'blasts:send', 'deliveries:read'] });
    assert.equal(tok.status, 201, JSON.stringify(tok.body));
    const app = new ApiClient(tp.base, tok.body.token, 'token');

    // 10,000 contacts with a phone and an email, all in one group, through the CSV import.
    const lines = ['name,email,phone,group'];
    for (let i = 0; i < CONTACTS; i++) lines.push(`Contact ${i},${emailOf(i)},${phoneOf(i)},everyone`);
    const imp = await app.call('POST', '/api/organisations/bulk/contacts/import', lines.join('\n') + '\n', { 'content-type': 'text/csv' });
    assert.equal(imp.status, 200, JSON.stringify(imp.body).slice(0, 500));
    assert.deepEqual([imp.body.created, imp.body.updated, imp.body.skipped], [CONTACTS, 0, []]);
    const groups = await app.get('/api/organisations/bulk/groups');
    const group = groups.body.items.find((g: any) => g.name === 'everyone');
    assert.ok(group, JSON.stringify(groups.body));
    mark('10,000 contacts imported');

    // The fates, decided here: what every contact must end with.
    const expected = new Map<string, { mode: SmsMode; email: string }>();
    for (let i = 0; i < CONTACTS; i++) expected.set(phoneOf(i), { mode: fate(phoneOf(i)), email: emailOf(i) });
    const byMode = (m: SmsMode) => [...expected.values()].filter((e) => e.mode === m).length;
    const nAccept = byMode('accept');
    const nRefuse = byMode('permanent');
    const nSilent = byMode('hang');
    assert.ok(nRefuse > 800 && nSilent > 350, `the hash spreads the fates (${nRefuse} refused, ${nSilent} silent)`);

    const blast = await app.post('/api/organisations/bulk/blasts', { group_id: group.id, subject: 'Notice', template: 'Hello {{name}}, your table is ready.', chain: ['sms', 'smtp'] });
    assert.equal(blast.status, 202, JSON.stringify(blast.body));
    assert.equal(blast.body.total, CONTACTS);
    const blastUrl = `/api/organisations/bulk/blasts/${blast.body.id}`;
    const tBlast = Date.now();
    mark('blast created');

    const finalOf = (v: any) => FINAL.reduce((n, s) => n + (v.counts[s] ?? 0), 0);
    let lastProgress = Date.now();
    const view = async () => {
      const r = await app.get(blastUrl);
      assert.equal(r.status, 200);
      if (Date.now() - lastProgress >= 20_000) {
        lastProgress = Date.now();
        mark(`${CONTACTS - r.body.preparing} prepared, ${finalOf(r.body)} final`);
      }
      return r.body;
    };

    // The first worker, killed with SIGKILL once about 30 % of the deliveries are final.
    const first = startWorker('worker-1');
    let atKill: any;
    try {
      atKill = await Promise.race([
        until('30 % of the deliveries final', async () => {
          const v = await view();
          return finalOf(v) >= CONTACTS * 0.3 ? v : null;
        }, BLAST_DEADLINE_MS, 200),
        first.exited.then((how) => {
          throw new Error(`the first worker exited (${how}) on its own: ${first.stderr()}`);
        }),
      ]);
      first.child.kill('SIGKILL');
      assert.equal(await first.exited, 'SIGKILL');
    } finally {
      first.child.kill('SIGKILL');
    }
    const inFlight = Number(
      (await sql<{ n: string }>`select count(*) as n from deliveries where blast_id = ${blast.body.id} and state = 'sending'`.execute(tp.platform.deps.db.kysely)).rows[0].n,
    );
    mark(`first worker killed: ${finalOf(atKill)} final, ${atKill.preparing} still preparing, ${inFlight} claimed by the dead worker`);
    assert.ok(finalOf(atKill) < CONTACTS, 'the worker was killed while the blast was under way');

    // A new worker finishes the blast.
    const second = startWorker('worker-2');
    let done: any;
    try {
      done = await Promise.race([
        until('every delivery of the blast final', async () => {
          const v = await view();
          return v.preparing === 0 && finalOf(v) + v.errors >= CONTACTS ? v : null;
        }, BLAST_DEADLINE_MS - (Date.now() - tBlast), 1000),
        second.exited.then((how) => {
          throw new Error(`the second worker exited (${how}): ${second.stderr()}`);
        }),
      ]);
    } finally {
      second.child.kill('SIGTERM');
    }
    await second.exited;
    mark(`blast done in ${((Date.now() - tBlast) / 1000).toFixed(1)} s: ${JSON.stringify(done.counts)} ${JSON.stringify(done.by_plugin)}`);

    // Our own recount, contact by contact, from the deliveries table.
    const rows = (
      await sql<{ phone: string; email: string; n: string; state: string; plugin: string; id: string; message_id: string | null }>`
        select c.phone, c.email, count(d.id) over (partition by c.id) as n, d.state, d.plugin, d.id::text, d.payload->>'message_id' as message_id
          from contact_group_members m
          join contacts c on c.id = m.contact_id
          left join deliveries d on d.contact_id = c.id and d.blast_id = ${blast.body.id}
         where m.group_id = ${group.id}`.execute(tp.platform.deps.db.kysely)
    ).rows;
    assert.equal(rows.length, CONTACTS, 'one row per contact');
    const recount: Record<string, number> = {};
    const recountByPlugin: Record<string, Record<string, number>> = {};
    const problems: string[] = [];
    const emailed = new Map<string, Set<string>>(); // recipient → Message-IDs the sink got
    const emailCopies = new Map<string, number>();
    for (const m of sink.messages) {
      assert.equal(m.rcptTo.length, 1, 'one envelope recipient per email');
      const to = m.rcptTo[0].toLowerCase();
      if (!emailed.has(to)) emailed.set(to, new Set());
      emailed.get(to)!.add(m.messageId ?? '(none)');
      emailCopies.set(to, (emailCopies.get(to) ?? 0) + 1);
    }
    const smsTaken = new Map<string, number>();
    for (const m of sms.messages) smsTaken.set(m.to, (smsTaken.get(m.to) ?? 0) + 1);
    const smsKeys = new Map<string, Set<string | null>>();
    for (const r of sms.requests) {
      if (!smsKeys.has(r.to)) smsKeys.set(r.to, new Set());
      smsKeys.get(r.to)!.add(r.key);
    }
    for (const r of rows) {
      if (Number(r.n) !== 1) {
        problems.push(`${r.phone}: ${r.n} deliveries`);
        continue;
      }
      recount[r.state] = (recount[r.state] ?? 0) + 1;
      (recountByPlugin[r.plugin] ??= {})[r.state] = (recountByPlugin[r.plugin]?.[r.state] ?? 0) + 1;
      const e = expected.get(r.phone)!;
      assert.equal(e.email, r.email);
      const keys = smsKeys.get(r.phone) ?? new Set();
      if (keys.size !== 1 || keys.has(null)) problems.push(`${r.phone}: the gateway saw idempotency keys ${JSON.stringify([...keys])}`);
      if ((smsTaken.get(r.phone) ?? 0) > 1) problems.push(`${r.phone}: ${smsTaken.get(r.phone)} SMS taken`);
      const mids = emailed.get(r.email) ?? new Set();
      if (mids.size > 1) problems.push(`${r.email}: ${mids.size} different emails (Message-IDs ${[...mids].join(' ')})`);
      if (e.mode === 'accept') {
        if (r.state !== 'sent' || r.plugin !== 'sms') problems.push(`${r.phone} (accepted): ${r.state} on ${r.plugin}`);
        if (smsTaken.get(r.phone) !== 1) problems.push(`${r.phone} (accepted): ${smsTaken.get(r.phone) ?? 0} SMS taken`);
        if (mids.size !== 0) problems.push(`${r.email} (SMS accepted) was emailed too`);
      } else {
        if (r.state !== 'sent' || r.plugin !== 'smtp') problems.push(`${r.phone} (${e.mode}): ${r.state} on ${r.plugin}`);
        if (smsTaken.has(r.phone)) problems.push(`${r.phone} (${e.mode}): an SMS was taken`);
        if (mids.size !== 1) problems.push(`${r.email} (${e.mode}): ${mids.size} emails`);
        else if (![...mids][0].includes(r.message_id ?? '\0')) problems.push(`${r.email}: the email is not the conversation's message ${r.message_id}`);
      }
      if (problems.length > 20) break;
    }
    assert.deepEqual(problems, []);
    assert.equal(emailed.size, nRefuse + nSilent, 'the sink got mail for the refused and silent numbers only');
    assert.equal(new Set(sms.messages.map((m) => m.key)).size, sms.messages.length, 'one message per idempotency key at the gateway');
    const sinkRepeats = [...emailCopies.values()].reduce((n, c) => n + c - 1, 0);
    // A repeated email (same Message-ID) comes only from a repeated attempt: an attempt that
    // timed out after the relay took the message, or one lost with the killed worker.
    const smtpAttempts = new Map(
      (
        await sql<{ delivery_id: string; n: string }>`
          select delivery_id::text, count(*) as n from delivery_attempts
           where plugin = 'smtp' and delivery_id in (select id from deliveries where blast_id = ${blast.body.id}) group by delivery_id`.execute(tp.platform.deps.db.kysely)
      ).rows.map((r) => [r.delivery_id, Number(r.n)]),
    );
    for (const r of rows) {
      const copies = emailCopies.get(r.email) ?? 0;
      if (copies > 1) assert.ok(copies <= (smtpAttempts.get(r.id) ?? 0) + 1, `${r.email}: ${copies} copies from ${smtpAttempts.get(r.id) ?? 0} recorded smtp attempts`);
    }

    // Timeouts: retried with the same key, every recorded attempt a `retry`, until the sms
    // policy's 5 attempts ran out; then the chain moved on to smtp. A claim lost to the kill
    // counts as an attempt without a record: then it gave up after 6 claims (and the gateway
    // may have seen 6 requests).
    const silentIds = rows.filter((r) => expected.get(r.phone)!.mode === 'hang').map((r) => r.id);
    const silentAttempts = (
      await sql<{ delivery_id: string; outcomes: string[]; errors: string[] }>`
        select delivery_id::text, array_agg(outcome order by id) as outcomes, array_agg(coalesce(error, '') order by id) as errors
          from delivery_attempts where plugin = 'sms' and delivery_id = any(${silentIds}::bigint[]) group by delivery_id`.execute(tp.platform.deps.db.kysely)
    ).rows;
    const silentFallbacks = (
      await sql<{ delivery_id: string; reason: string }>`
        select delivery_id::text, detail->>'reason' as reason from delivery_events
         where kind = 'fallback' and delivery_id = any(${silentIds}::bigint[])`.execute(tp.platform.deps.db.kysely)
    ).rows;
    assert.equal(silentFallbacks.length, nSilent, 'one fallback (sms → smtp) per silent number');
    for (const f of silentFallbacks) assert.match(f.reason, /^sms: gave up after [56] attempts: .*timed out/, `delivery ${f.delivery_id}`);
    for (const a of silentAttempts) {
      assert.ok(a.outcomes.length <= 5 && a.outcomes.every((o) => o === 'retry'), `delivery ${a.delivery_id}: sms attempts ${JSON.stringify(a.outcomes)}`);
      assert.ok(a.errors.every((e) => /timed out/.test(e)), `delivery ${a.delivery_id}: ${JSON.stringify(a.errors)}`);
    }
    const silentRequests = [...expected.entries()].filter(([, e]) => e.mode === 'hang').map(([p]) => sms.requests.filter((r) => r.to === p).length);
    assert.ok(silentRequests.every((n) => n >= 1 && n <= 6), `a silent number was asked 1 to 6 times: ${JSON.stringify(silentRequests.filter((n) => n < 1 || n > 6))}`);

    // The blast's counts equal our recount and what the fates predict.
    const final = await view();
    const nonzero = (o: Record<string, number | undefined>) => Object.fromEntries(Object.entries(o).filter(([, n]) => n));
    assert.deepEqual(nonzero(final.counts), recount);
    assert.deepEqual(Object.fromEntries(Object.entries(final.by_plugin as Record<string, Record<string, number>>).map(([p, c]) => [p, nonzero(c)])), recountByPlugin);
    assert.deepEqual(recount, { sent: CONTACTS });
    assert.deepEqual(recountByPlugin, { sms: { sent: nAccept }, smtp: { sent: nRefuse + nSilent } });
    assert.deepEqual([final.total, final.preparing, final.errors, final.prepared_at !== null], [CONTACTS, 0, 0, true]);

    const requests = sms.requests.length;
    const repeatedKeys = [...sms.requestsByKey.values()].filter((n) => n > 1).length;
    mark(
      `checked: ${nAccept} by SMS, ${nRefuse} refused + ${nSilent} silent by email; gateway requests ${requests} (${repeatedKeys} keys repeated), ` +
        `sink messages ${sink.messages.length} (${sinkRepeats} repeats with the same Message-ID), ${inFlight} in flight at the kill`,
    );
  });
});
