/**
 * Files attached to messages are downloadable by the participants who can see them
 * (issue 2 §2, attachments; GET /api/attachments/{sha256}) — also a file that a
 * message:modify puts in place of an earlier one, and the earlier one, which the log still names.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { type ApiClient, type TestPlatform, startTestPlatform } from '../support/platform.ts';

describe('attachments of modified messages', () => {
  let tp: TestPlatform;
  let alice: ApiClient;
  let bob: ApiClient;
  before(async () => {
    tp = await startTestPlatform();
    alice = await tp.user('alice@alpha.test');
    bob = await tp.user('bob@alpha.test');
  });
  after(() => tp.stop());

  const upload = async (text: string) => {
    const r = await alice.call('POST', '/api/attachments', new TextEncoder().encode(text), { 'content-type': 'text/plain' });
    assert.equal(r.status, 201, JSON.stringify(r.body));
    return r.body as { sha256: string; size: number };
  };
  const file = (f: { sha256: string; size: number }, name: string) => ({ sha256: f.sha256, name, content_type: 'text/plain', size: f.size });

  it('lets every participant download the files of each version of a message', async () => {
    const first = await upload('first version of the notes\n');
    const second = await upload('second version of the notes, replacing the first\n');
    const c = await alice.post('/api/conversations', {
      subject: 'Notes',
      participants: ['bob@alpha.test'],
      messages: [{ body: 'notes attached', files: [file(first, 'notes.txt')] }],
    });
    assert.equal(c.status, 201, JSON.stringify(c.body));
    const add = c.body.actions.find((a: any) => a.act === 'message:add');
    const mod = await alice.post(`/api/conversations/${c.body.key}/actions`, {
      actions: [{ act: 'message:modify', follows: add.id, body: 'notes attached (updated)', files: [file(second, 'notes.txt')] }],
    });
    assert.equal(mod.status, 200, JSON.stringify(mod.body));

    for (const f of [first, second]) {
      const r = await bob.call('GET', `/api/attachments/${f.sha256}`);
      assert.equal(r.status, 200, `bob downloads ${f.sha256}: ${JSON.stringify(r.body)}`);
    }
    const stranger = await tp.user('carol@alpha.test');
    assert.equal((await stranger.call('GET', `/api/attachments/${second.sha256}`)).status, 404);
  });
});
