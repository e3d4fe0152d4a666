/**
 * Rows whose foreign keys were dropped for the write path's sake (user_events: migration 034;
 * actions and messages: migration 038) still go with their conversation or user: deleting
 * one deletes them, as ON DELETE CASCADE did, and nothing of the others.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { sql } from 'kysely';
import { type ApiClient, type TestPlatform, startTestPlatform } from '../support/platform.ts';

describe('deleting conversations and users', () => {
  let tp: TestPlatform;
  let alice: ApiClient;
  before(async () => {
    tp = await startTestPlatform();
    alice = await tp.user('alice@alpha.test');
    await tp.user('bob@alpha.test');
  });
  after(async () => tp.stop());

  /** Rows of `table` for conversation `convId`. */
  const rowsOf = async (table: 'actions' | 'messages' | 'user_events' | 'participants', convId: number) =>
    Number((await sql<{ n: number }>`select count(*)::int as n from ${sql.table(table)} where conv_id = ${convId}`.execute(tp.platform.deps.db.kysely)).rows[0].n);

  const start = async (subject: string) => {
    const r = await alice.post('/api/conversations', { subject, participants: ['bob@alpha.test'], messages: [{ body: `${subject}: hello` }] });
    assert.equal(r.status, 201, JSON.stringify(r.body));
    const row = await tp.platform.deps.db.kysely.selectFrom('conversations').select('id').where('key', '=', r.body.key).executeTakeFirstOrThrow();
    return row.id;
  };

  it('deleting a conversation deletes its log, messages, participants and stream events, and no other', async () => {
    const gone = await start('to be deleted');
    const kept = await start('to be kept');
    for (const id of [gone, kept]) {
      assert.ok((await rowsOf('actions', id)) >= 4);
      assert.equal(await rowsOf('messages', id), 1);
      assert.ok((await rowsOf('user_events', id)) >= 2);
    }
    const keptBefore = { actions: await rowsOf('actions', kept), events: await rowsOf('user_events', kept) };

    await tp.platform.deps.db.kysely.deleteFrom('conversations').where('id', '=', gone).execute();

    for (const table of ['actions', 'messages', 'user_events', 'participants'] as const) assert.equal(await rowsOf(table, gone), 0, table);
    assert.equal(await rowsOf('actions', kept), keptBefore.actions);
    assert.equal(await rowsOf('messages', kept), 1);
    assert.equal(await rowsOf('user_events', kept), keptBefore.events);
  });
});
