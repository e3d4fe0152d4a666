// Runs the mail layer over the shared corpus of real mail (../shared/corpus/email, next to
// the repository). Skipped where the corpus is absent.
import assert from 'node:assert/strict';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { openArchive } from '../../src/mail/archive.ts';
import { parseEmail } from '../../src/mail/parse.ts';

const corpus = fileURLToPath(new URL('../../../shared/corpus/email/', import.meta.url));
const skip = existsSync(corpus) ? false : `no corpus at ${corpus}`;

function walk(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? walk(join(dir, e.name)) : [join(dir, e.name)]));
}

describe('email corpus', { skip }, () => {
  test('parseEmail reads every file without throwing (empty files are rejected as not messages)', async () => {
    const files = walk(corpus);
    assert.ok(files.length > 2800, `only ${files.length} files`);
    for (const file of files) {
      const raw = readFileSync(file);
      if (raw.toString('latin1').trim() === '') {
        await assert.rejects(parseEmail(raw), /input is empty/, file);
        continue;
      }
      const parsed = await parseEmail(raw);
      assert.ok(parsed.text.trim() === '' || parsed.newText.trim() !== '', `${file}: empty newText`);
      assert.ok(parsed.quoted === null || parsed.text.replace(/\r\n/g, '\n').includes(parsed.quoted), `${file}: quoted is not part of text`);
      for (const attachment of parsed.attachments) assert.ok(attachment.filename !== '' && !/[/\\]/.test(attachment.filename), `${file}: ${attachment.filename}`);
    }
  });

  test('openArchive counts the 2403 messages of spamassassin-publiccorpus-easy_ham', async () => {
    const archive = await openArchive(join(corpus, 'spamassassin-publiccorpus-easy_ham'));
    assert.equal(archive.kind, 'eml-folder');
    assert.equal(archive.count, 2403);
    let yielded = 0;
    for await (const message of archive.messages()) {
      yielded++;
      assert.ok(!message.raw.subarray(0, 5).equals(Buffer.from('From ')), `${message.source} still starts with its envelope line`);
    }
    assert.equal(yielded, 2403);
  });
});
