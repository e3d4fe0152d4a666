// `parley import` (issue 2 §6; Done means 2) through the real CLI in a child process, on the
// database of a platform started in-process: counts of the summary, threading whatever the
// order of the archive, and "importing twice adds nothing". The whole easy_ham corpus is
// imported when ../shared/corpus/email is present.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { importArchive } from '../../src/mail/inbound/import-archive.ts';
import { type ApiClient, type TestPlatform, startTestPlatform } from '../support/platform.ts';

const run = promisify(execFile);
const FIXTURES = resolve('test/fixtures/mail-inbound');
const EASY_HAM = resolve('../shared/corpus/email/spamassassin-publiccorpus-easy_ham');

/** Runs `parley <args>` against the test platform's database and data directory. */
async function parley(tp: TestPlatform, args: string[]): Promise<{ stdout: string; stderr: string }> {
  return run(process.execPath, ['bin/parley.js', ...args], {
    env: {
      ...process.env,
      DATABASE_URL: tp.config.databaseUrl,
      PARLEY_DOMAINS: 'alpha.test',
      PARLEY_DATA_DIR: tp.config.dataDir,
      PARLEY_LOG_LEVEL: 'warn',
    },
    maxBuffer: 64 * 1024 * 1024,
    timeout: 300_000,
  });
}

/** `parley import … --json`: the summary it prints. */
async function importJson(tp: TestPlatform, path: string, owner: string): Promise<any> {
  const { stdout } = await parley(tp, ['import', path, '--owner', owner, '--json']);
  return JSON.parse(stdout);
}

/** Number of conversations, messages and actions in the database. */
async function totals(tp: TestPlatform): Promise<{ conversations: number; messages: number; actions: number }> {
  const db = tp.platform.deps.db.kysely;
  const count = async (table: 'conversations' | 'messages' | 'actions') =>
    Number((await db.selectFrom(table).select((eb) => eb.fn.countAll().as('n')).executeTakeFirstOrThrow()).n);
  return { conversations: await count('conversations'), messages: await count('messages'), actions: await count('actions') };
}

/** The unfolded header fields of a raw message (first occurrence of each, lower-cased names). */
function headerFields(raw: Buffer): Map<string, string> {
  const text = raw.toString('latin1');
  const end = text.search(/\r?\n\r?\n/);
  const fields = new Map<string, string>();
  for (const line of (end < 0 ? text : text.slice(0, end)).replace(/\r?\n[ \t]+/g, ' ').split(/\r?\n/)) {
    const colon = line.indexOf(':');
    if (colon <= 0 || /\s/.test(line.slice(0, colon))) continue;
    const name = line.slice(0, colon).toLowerCase();
    if (!fields.has(name)) fields.set(name, line.slice(colon + 1).trim());
  }
  return fields;
}
const msgIds = (v: string | undefined): string[] => [...(v ?? '').matchAll(/<([^<>\s]+)>/g)].map((m) => m[1]);

describe('parley import', () => {
  let tp: TestPlatform;
  let owner: ApiClient;
  before(async () => {
    tp = await startTestPlatform({}, ['web']);
    owner = await tp.user('owner@alpha.test');
  });
  after(async () => tp.stop());

  it('imports a folder whose replies sort before their parent, threaded, and a second import adds nothing', async () => {
    const startedAt = Date.now();
    const first = await importJson(tp, join(FIXTURES, 'folder'), 'owner@alpha.test');
    assert.deepEqual(
      { total: first.total, processed: first.processed, imported: first.imported, threaded: first.threaded, duplicates: first.duplicates, failed: first.failed },
      { total: 6, processed: 6, imported: 3, threaded: 3, duplicates: 0, failed: 0 },
      JSON.stringify(first.failures),
    );
    // 0499, 0503 and 0511 answer 0506 (In-Reply-To): one conversation of four messages.
    const list = await owner.get('/api/conversations?limit=100');
    assert.equal(list.status, 200);
    const wedded = list.body.items.filter((i: any) => i.subject === 'Re[2]: Selling Wedded Bliss (was Re: Ouch...)');
    assert.equal(wedded.length, 1, JSON.stringify(list.body.items.map((i: any) => i.subject)));
    const conv = await owner.get(`/api/conversations/${wedded[0].key}`);
    assert.deepEqual(
      conv.body.messages.map((m: any) => m.author).sort(),
      ['beberg@mithral.com', 'bitbitch@magnesium.net', 'cdale@techmonkeys.net', 'eugen@leitl.org'],
    );
    assert.equal(conv.body.creator, 'bitbitch@magnesium.net');
    assert.ok(conv.body.participants.some((p: any) => p.address === 'owner@alpha.test'), 'the owner takes part in every imported conversation');
    assert.equal(list.body.items.length, 3);
    // Imported actions are stamped with the time of the import, not the emails' Date
    // (signatures are judged by the key's validity at `ts`); the Date stays in source.date.
    const published = Date.parse(conv.body.published_at);
    assert.ok(published >= startedAt && published <= Date.now(), `published_at ${conv.body.published_at} is the time of the import`);
    const dates = Object.fromEntries(conv.body.messages.map((m: any) => [m.author, m.source?.date]));
    // From the fixtures' Date fields: 0506 (bitbitch, the parent), 0499, 0503, 0511.
    assert.deepEqual(dates, {
      'bitbitch@magnesium.net': '2002-09-06T03:41:16.000Z',
      'cdale@techmonkeys.net': '2002-09-06T07:41:48.000Z',
      'beberg@mithral.com': '2002-09-06T04:16:51.000Z',
      'eugen@leitl.org': '2002-09-06T09:38:36.000Z',
    });
    const actions = await tp.platform.deps.db.kysely.selectFrom('actions').select('ts').execute();
    for (const a of actions) assert.ok(new Date(a.ts).getTime() >= startedAt, `action ts ${new Date(a.ts).toISOString()} predates the import`);
    // A replica accepts an action's signature when a key of the platform was valid at its ts.
    const keys = await tp.platform.deps.db.kysely.selectFrom('platform_keys').select(['created_at', 'not_after', 'retired_at']).execute();
    assert.equal(keys.filter((k) => k.retired_at === null).length, 1, 'the import rotated no key');
    for (const a of actions) {
      const at = new Date(a.ts).getTime();
      assert.ok(
        keys.some((k) => new Date(k.created_at).getTime() <= at && at <= new Date(k.not_after).getTime()),
        `no key was valid at ${new Date(a.ts).toISOString()}`,
      );
    }
    // The list is still ordered by the emails' Date (latest message of each conversation), not by import order.
    assert.deepEqual(
      list.body.items.map((i: any) => i.subject),
      ['[Spambayes] understanding high false negative rate', 'Re[2]: Selling Wedded Bliss (was Re: Ouch...)', 'Lyrics'],
    );
    // Imported mail is never emailed to anyone.
    const deliveries = await tp.platform.deps.db.kysely.selectFrom('deliveries').select('id').execute();
    assert.equal(deliveries.length, 0);

    const before = await totals(tp);
    const second = await importJson(tp, join(FIXTURES, 'folder'), 'owner@alpha.test');
    assert.deepEqual([second.imported, second.threaded, second.duplicates, second.failed], [0, 0, 6, 0]);
    assert.deepEqual(await totals(tp), before);
  });

  it('imports an mbox whose replies come first (one by References only), with a text summary, progress lines and a report', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'parley-import-'));
    try {
      const report = join(dir, 'report.json');
      const { stdout, stderr } = await parley(tp, ['import', join(FIXTURES, 'exmh-thread.mbox'), '--owner', 'owner@alpha.test', '--report', report]);
      assert.match(stdout, /4 of 4 messages/);
      assert.match(stdout, /imported \(new conversations\): +1\n/);
      assert.match(stdout, /threaded \(added to a conversation\): +3\n/);
      assert.match(stdout, /duplicates skipped \(already there\): +0\n/);
      assert.match(stdout, /failed \(kept raw, not imported\): +0\n/);
      assert.match(stderr, /import: 4 messages \(mbox\)/, 'without a terminal, progress goes to stderr as lines');
      const written = JSON.parse(readFileSync(report, 'utf8'));
      assert.equal(written.threaded, 3);
      assert.deepEqual(written.failures, []);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
    const list = await owner.get('/api/conversations?limit=100');
    const exmh = list.body.items.filter((i: any) => /Exmh && speed/.test(i.subject));
    assert.equal(exmh.length, 1);
    const conv = await owner.get(`/api/conversations/${exmh[0].key}`);
    assert.equal(conv.body.messages.length, 4);
    assert.equal(conv.body.creator, 'aeriksson@fastmail.fm');
    const again = await importJson(tp, join(FIXTURES, 'exmh-thread.mbox'), 'owner@alpha.test');
    assert.deepEqual([again.imported, again.threaded, again.duplicates, again.failed], [0, 0, 4, 0]);
  });

  it('reads an archive twice when it is too large to keep in memory, with the same result', async () => {
    await tp.user('owner2@alpha.test');
    const progress: number[] = [];
    const s = await importArchive(tp.platform.deps, join(FIXTURES, 'folder'), 'owner2@alpha.test', {
      retainBytes: 1000,
      concurrency: 2,
      onProgress: (p) => progress.push(p.processed),
    });
    assert.deepEqual([s.total, s.imported, s.threaded, s.duplicates, s.failed], [6, 3, 3, 0, 0]);
    assert.deepEqual(progress, [1, 2, 3, 4, 5, 6]);
  });

  it('refuses an owner that is not a user, and a path that is not an archive, with exit status 2', async () => {
    await assert.rejects(parley(tp, ['import', join(FIXTURES, 'folder'), '--owner', 'ghost@alpha.test']), (e: any) => {
      assert.equal(e.code, 2);
      assert.match(e.stderr, /no user ghost@alpha\.test/);
      return true;
    });
    await assert.rejects(parley(tp, ['import', join(FIXTURES, 'nope'), '--owner', 'owner@alpha.test']), (e: any) => {
      assert.equal(e.code, 2);
      assert.match(e.stderr, /^parley: Archive not found: .*nope does not exist$/m);
      assert.doesNotMatch(e.stderr, /^\s+at /m, 'a message, not a stack trace');
      return true;
    });
  });
});

describe('parley import of the whole easy_ham corpus', { skip: existsSync(EASY_HAM) ? false : `corpus not found at ${EASY_HAM}` }, () => {
  let tp: TestPlatform;
  before(async () => {
    tp = await startTestPlatform({}, ['web']);
    await parley(tp, ['user', 'add', 'archive@alpha.test']);
  });
  after(async () => tp.stop());

  it('imports all 2,403 messages, puts every reply whose parent is in the set in its parent’s conversation, and adds nothing the second time', async () => {
    // Expected parent/child pairs, from the files' headers read here (not by the code under test).
    const byId = new Map<string, string>();
    const parentOf = new Map<string, string>();
    for (const name of readdirSync(EASY_HAM).filter((n) => n.endsWith('.eml'))) {
      const h = headerFields(readFileSync(join(EASY_HAM, name)));
      const id = msgIds(h.get('message-id'))[0];
      if (!id) continue;
      byId.set(id, name);
      const inReplyTo = msgIds(h.get('in-reply-to'))[0];
      if (inReplyTo) parentOf.set(id, inReplyTo);
    }
    const pairs = [...parentOf].filter(([, parent]) => byId.has(parent));
    assert.ok(pairs.length > 600, `only ${pairs.length} reply pairs found`);

    const first = await importJson(tp, EASY_HAM, 'archive@alpha.test');
    assert.equal(first.total, 2403);
    assert.equal(first.processed, 2403);
    assert.equal(first.failed, 0, JSON.stringify(first.failures.slice(0, 5)));
    assert.equal(first.imported + first.threaded + first.duplicates, 2403);

    const rows = await tp.platform.deps.db.kysely.selectFrom('email_messages').select(['message_id', 'conv_id']).where('direction', '=', 'in').execute();
    const convOf = new Map(rows.map((r) => [r.message_id, r.conv_id]));
    const misplaced = pairs.filter(([child, parent]) => convOf.get(child) === undefined || convOf.get(child) !== convOf.get(parent));
    assert.deepEqual(
      misplaced.map(([child, parent]) => `${byId.get(child)} → ${byId.get(parent)}`),
      [],
      'every reply is in its parent’s conversation',
    );

    const before = await totals(tp);
    const second = await importJson(tp, EASY_HAM, 'archive@alpha.test');
    assert.deepEqual([second.processed, second.imported, second.threaded, second.duplicates, second.failed], [2403, 0, 0, 2403, 0]);
    assert.deepEqual(await totals(tp), before);
    // Throughput for the record (not asserted: no timing assertions in tests).
    console.log(`# easy_ham import: ${first.processed} messages in ${first.seconds} s (${Math.round(first.processed / first.seconds)} msg/s); re-import ${second.seconds} s`);
  });
});
