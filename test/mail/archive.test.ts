import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { openArchive, type ArchiveMessage } from '../../src/mail/archive.ts';

const fixturePath = (name: string): string => fileURLToPath(new URL(`../fixtures/mail/${name}`, import.meta.url));
const root = mkdtempSync(join(tmpdir(), 'parley-archive-'));
after(() => rmSync(root, { recursive: true, force: true }));

/** Writes `files` (relative path → content) under a new directory and returns its path. */
function tree(name: string, files: Record<string, string | Buffer>): string {
  const dir = join(root, name);
  for (const [path, content] of Object.entries(files)) {
    mkdirSync(join(dir, path, '..'), { recursive: true });
    writeFileSync(join(dir, path), content);
  }
  mkdirSync(dir, { recursive: true });
  return dir;
}

async function collect(messages: AsyncIterable<ArchiveMessage>): Promise<ArchiveMessage[]> {
  const all: ArchiveMessage[] = [];
  for await (const message of messages) all.push(message);
  return all;
}

const simpleMessage = (subject: string): string => `From: a@example.com\nSubject: ${subject}\n\nBody of ${subject}\n`;

describe('openArchive: mbox', () => {
  test('an mbox with three messages', async () => {
    const path = fixturePath('node-mbox-test-3-message.mbox');
    const archive = await openArchive(path);
    assert.equal(archive.kind, 'mbox');
    assert.equal(archive.count, 3);
    const messages = await collect(archive.messages());
    assert.deepEqual(
      messages.map((m) => m.source),
      [`${path}#0`, `${path}#1`, `${path}#2`],
    );
    assert.deepEqual(
      messages.map((m) => /^Subject: (.*)$/m.exec(m.raw.toString())?.[1]),
      ['mail 1', 'mail 2', 'mail 3'],
    );
    // the envelope line is gone and the blank line that separates messages is not part of them
    assert.ok(messages[0].raw.toString().startsWith('Date: Sun, 25 Dec 2011 21:33:37 +0800\n'));
    assert.ok(messages[0].raw.toString().endsWith('The mail content of mail 1...\n'));
    // messages() can be iterated again
    assert.equal((await collect(archive.messages())).length, 3);
  });

  test('only a From line after a blank line and before a header field separates messages; >From is unescaped', async () => {
    const mbox = [
      'From a@example.com Mon Jan  1 00:00:00 2024',
      'From: a@example.com',
      'Subject: one',
      '',
      'Hello',
      'From the body: no blank line before this one',
      '',
      'From here on it is prose, with no header field after it',
      '>From escaped once',
      '>>From escaped twice',
      '',
      'From b@example.com Mon Jan  1 00:00:01 2024',
      'Subject: two',
      '',
      'Bye',
      '',
    ];
    for (const newline of ['\n', '\r\n']) {
      const dir = tree(`rd${newline.length}`, { 'box.mbox': mbox.join(newline) });
      const archive = await openArchive(join(dir, 'box.mbox'));
      assert.equal(archive.count, 2);
      const [first, second] = await collect(archive.messages());
      assert.equal(
        first.raw.toString(),
        [
          'From: a@example.com',
          'Subject: one',
          '',
          'Hello',
          'From the body: no blank line before this one',
          '',
          'From here on it is prose, with no header field after it',
          'From escaped once',
          '>From escaped twice',
          '',
        ].join(newline),
      );
      assert.equal(second.raw.toString(), ['Subject: two', '', 'Bye', ''].join(newline));
    }
  });

  test('a large mbox is split correctly across read chunks', async () => {
    const count = 600;
    const bodies = Array.from({ length: count }, (_, i) => `From: n${i}@example.com\nSubject: ${i}\n\n${`line ${i} `.repeat(60 + (i % 7))}\n`);
    const dir = tree('large', { 'big.mbox': bodies.map((b) => `From n@example.com Mon Jan  1 00:00:00 2024\n${b}\n`).join('') });
    const archive = await openArchive(join(dir, 'big.mbox'));
    assert.equal(archive.count, count);
    const messages = await collect(archive.messages());
    assert.equal(messages.length, count);
    messages.forEach((m, i) => assert.equal(m.raw.toString(), bodies[i], `message ${i}`));
  });

  test('an empty file named .mbox is an empty mbox', async () => {
    const dir = tree('empty', { 'empty.mbox': '' });
    const archive = await openArchive(join(dir, 'empty.mbox'));
    assert.deepEqual([archive.kind, archive.count], ['mbox', 0]);
    assert.deepEqual(await collect(archive.messages()), []);
  });
});

describe('openArchive: single files', () => {
  test('a message file with an mbox envelope line is one message, without the envelope line', async () => {
    const path = fixturePath('easy_ham-2451-8bit-subject.eml');
    const archive = await openArchive(path);
    assert.deepEqual([archive.kind, archive.count], ['eml-file', 1]);
    const [message] = await collect(archive.messages());
    assert.equal(message.source, path);
    assert.ok(message.raw.toString('latin1').startsWith('Return-Path: <rssfeeds@example.com>\n'));
  });

  test('a plain .eml file comes back byte for byte', async () => {
    const path = fixturePath('enmime-html-mime-inline.raw');
    const archive = await openArchive(path);
    assert.deepEqual([archive.kind, archive.count], ['eml-file', 1]);
    const [message] = await collect(archive.messages());
    assert.deepEqual(message.raw, readFileSync(path));
  });

  test('clear errors for a missing path and for a file that is not mail', async () => {
    // AppErrors: the CLI prints their message alone (no stack) and exits 2.
    await assert.rejects(openArchive(join(root, 'nowhere.mbox')), { name: 'AppError', code: 'archive_not_found', message: /^Archive not found: .*nowhere\.mbox does not exist$/ });
    const dir = tree('notmail', { 'notes.txt': 'Shopping list:\n- milk\n' });
    await assert.rejects(openArchive(join(dir, 'notes.txt')), { name: 'AppError', code: 'not_an_archive', message: /Not an email archive: .*notes\.txt is neither an email message nor an mbox file/ });
  });
});

describe('openArchive: Maildir', () => {
  test('cur/ and new/ of the Maildir and its Maildir++ folders; tmp/ is skipped', async () => {
    const dir = tree('Maildir', {
      'cur/1700000001.M1P1.host:2,S': simpleMessage('seen one'),
      'cur/1700000002.M2P1.host:2,RS': simpleMessage('seen two'),
      'new/1700000003.M3P1.host': simpleMessage('unseen'),
      'tmp/1700000004.M4P1.host': simpleMessage('being delivered'),
      '.Sent/cur/1700000005.M5P1.host:2,S': simpleMessage('sent'),
      '.Sent/new/.keep': '',
      'dovecot-uidlist': '3 V1 N4\n',
    });
    const archive = await openArchive(dir);
    assert.equal(archive.kind, 'maildir');
    assert.equal(archive.count, 4);
    const messages = await collect(archive.messages());
    assert.deepEqual(
      messages.map((m) => /^Subject: (.*)$/m.exec(m.raw.toString())?.[1]),
      ['seen one', 'seen two', 'unseen', 'sent'],
    );
    assert.equal(messages[2].source, join(dir, 'new', '1700000003.M3P1.host'));
  });
});

describe('openArchive: folder of message files', () => {
  test('walks subfolders, skips notes and non-mail, expands mbox files and nested Maildirs', async () => {
    const dir = tree('export', {
      'README.md': '# Export\n\nFrom: the team\nSubject: docs\n',
      'SOURCE.md': 'Subject: provenance\n',
      'notes.txt': 'Remember: call Bob\n',
      'image.png': Buffer.from('89504e470d0a1a0a', 'hex'),
      '.hidden.eml': simpleMessage('hidden'),
      'a.eml': simpleMessage('a'),
      'b': simpleMessage('extensionless'),
      'c.txt': simpleMessage('c'),
      'mime-entity.msg': 'Content-Type: text/plain\n\nbare MIME entity\n',
      'part.raw': 'Content-Type: text/plain\n\nnot a message: no message header field\n',
      'with-envelope.eml': `From a@example.com Mon Jan  1 00:00:00 2024\n${simpleMessage('enveloped')}`,
      'sub/deeper/d.eml': simpleMessage('d'),
      'sub/box.mbx': ['x', 'y', 'z'].map((s) => `From a@example.com Mon Jan  1 00:00:00 2024\n${simpleMessage(s)}\n`).join(''),
      'sub/Maildir/cur/1.M1P1.host:2,S': simpleMessage('maildir cur'),
      'sub/Maildir/new/2.M2P1.host': simpleMessage('maildir new'),
      'sub/Maildir/tmp/3.M3P1.host': simpleMessage('maildir tmp'),
    });
    copyFileSync(fixturePath('easy_ham-0316-misplaced-envelope.eml'), join(dir, 'sub', 'forwarded.eml'));
    const archive = await openArchive(dir);
    assert.equal(archive.kind, 'eml-folder');
    const expected = [
      ['a.eml', 'a'],
      ['b', 'extensionless'],
      ['c.txt', 'c'],
      ['mime-entity.msg', undefined],
      ['sub/Maildir/cur/1.M1P1.host:2,S', 'maildir cur'],
      ['sub/Maildir/new/2.M2P1.host', 'maildir new'],
      ['sub/box.mbx#0', 'x'],
      ['sub/box.mbx#1', 'y'],
      ['sub/box.mbx#2', 'z'],
      ['sub/deeper/d.eml', 'd'],
      ['sub/forwarded.eml', 'The Disappearing Alliance'],
      ['with-envelope.eml', 'enveloped'],
    ];
    assert.equal(archive.count, expected.length);
    const messages = await collect(archive.messages());
    assert.deepEqual(
      messages.map((m) => [m.source.slice(dir.length + 1), /^Subject: (.*)$/m.exec(m.raw.toString())?.[1]]),
      expected,
    );
  });
});
