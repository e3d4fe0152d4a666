import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { composeEmail, renderHtmlFromText, type OutboundEmail } from '../../src/mail/compose.ts';
import { parseEmail } from '../../src/mail/parse.ts';

const png = Buffer.from('89504e470d0a1a0a0000000d49484452', 'hex');

const reply: OutboundEmail = {
  from: { address: 'ann@parley.example', name: 'Ann Émile' },
  replyTo: { address: 'reply+k1@parley.example', name: 'Lunch, tomorrow?' },
  to: [{ address: 'bob@example.org', name: 'Bob' }],
  cc: [{ address: 'carol@example.net', name: 'Carol "CJ" Jones' }],
  subject: 'Déjeuner demain ? 🍱',
  messageId: 'k1.7@parley.example',
  inReplyTo: 'k1.6@parley.example',
  references: ['k1.1@parley.example', 'k1.6@parley.example'],
  date: new Date('2024-05-01T10:00:00.000Z'),
  text: `Yes!\n\nSee https://example.com/menu.\n${'long line '.repeat(150)}`,
  html: '<p>Yes!</p><p><img src="cid:menu@parley.example"></p>',
  attachments: [
    { filename: 'menu.png', contentType: 'image/png', content: png, contentId: 'menu@parley.example', inline: true },
    { filename: 'naïve plan.pdf', contentType: 'application/pdf', content: Buffer.from('%PDF-1.4 test') },
  ],
  headers: { 'X-Parley-Conversation': 'k1' },
};

/** The header section of a composed message (RFC 5322 §2.1). */
const headerSection = (raw: Buffer): string => raw.toString('latin1').split('\r\n\r\n')[0];

describe('composeEmail', () => {
  test('produces an RFC 5322 message: CRLF lines of at most 998 octets, ASCII header section', async () => {
    const raw = await composeEmail(reply);
    const source = raw.toString('latin1');
    assert.ok(!/[^\r]\n/.test(source), 'every line ends with CRLF');
    for (const line of source.split('\r\n')) assert.ok(line.length <= 998, `line of ${line.length} octets`);
    assert.ok(![...Buffer.from(headerSection(raw), 'latin1')].some((byte) => byte >= 0x80), 'header section is 7-bit');
    assert.match(headerSection(raw), /^MIME-Version: 1\.0$/m);
    assert.match(headerSection(raw), /^Message-ID: <k1\.7@parley\.example>$/m);
    assert.match(headerSection(raw), /^In-Reply-To: <k1\.6@parley\.example>$/m);
    assert.match(headerSection(raw), /^References: <k1\.1@parley\.example> <k1\.6@parley\.example>$/m);
    assert.match(headerSection(raw), /^Date: Wed, 01 May 2024 10:00:00 \+0000$/m);
    assert.match(headerSection(raw), /^X-Parley-Conversation: k1$/m);
    assert.match(source, /Content-Type: multipart\/alternative/);
  });

  test('round-trips through parseEmail', async () => {
    const parsed = await parseEmail(await composeEmail(reply));
    assert.equal(parsed.subject, 'Déjeuner demain ? 🍱');
    assert.deepEqual(parsed.from, { address: 'ann@parley.example', name: 'Ann Émile' });
    assert.deepEqual(parsed.replyTo, [{ address: 'reply+k1@parley.example', name: 'Lunch, tomorrow?' }]);
    assert.deepEqual(parsed.to, [{ address: 'bob@example.org', name: 'Bob' }]);
    assert.deepEqual(parsed.cc, [{ address: 'carol@example.net', name: 'Carol "CJ" Jones' }]);
    assert.equal(parsed.messageId, 'k1.7@parley.example');
    assert.deepEqual(parsed.inReplyTo, ['k1.6@parley.example']);
    assert.deepEqual(parsed.references, ['k1.1@parley.example', 'k1.6@parley.example']);
    assert.equal(parsed.date?.toISOString(), '2024-05-01T10:00:00.000Z');
    assert.equal(parsed.text.trimEnd(), reply.text.trimEnd());
    assert.ok(parsed.html?.includes('<img src="cid:menu@parley.example">'));
    assert.deepEqual(
      parsed.attachments.map((a) => ({ filename: a.filename, contentType: a.contentType, inline: a.inline, contentId: a.contentId, content: a.content.toString('hex') })),
      [
        { filename: 'menu.png', contentType: 'image/png', inline: true, contentId: 'menu@parley.example', content: png.toString('hex') },
        { filename: 'naïve plan.pdf', contentType: 'application/pdf', inline: false, contentId: null, content: Buffer.from('%PDF-1.4 test').toString('hex') },
      ],
    );
    assert.deepEqual(parsed.warnings, []);
  });

  test('threading headers: the parent is appended to References, or is all of it', async () => {
    const base = { ...reply, attachments: [] };
    const appended = headerSection(await composeEmail({ ...base, inReplyTo: 'p@x.example', references: ['r@x.example'] }));
    assert.match(appended, /^References: <r@x\.example> <p@x\.example>$/m);
    const onlyParent = headerSection(await composeEmail({ ...base, inReplyTo: 'p@x.example', references: undefined }));
    assert.match(onlyParent, /^References: <p@x\.example>$/m);
    const fresh = headerSection(await composeEmail({ ...base, inReplyTo: undefined, references: undefined }));
    assert.doesNotMatch(fresh, /^(In-Reply-To|References):/im);
  });

  test('rejects invalid addresses, message ids and extra header fields', async () => {
    await assert.rejects(composeEmail({ ...reply, from: { address: 'not an address', name: '' } }), /Invalid email address "not an address"/);
    await assert.rejects(composeEmail({ ...reply, to: [{ address: 'bob@', name: '' }] }), /Invalid email address "bob@"/);
    await assert.rejects(composeEmail({ ...reply, messageId: '<k1.7@parley.example>' }), /Invalid message id/);
    await assert.rejects(composeEmail({ ...reply, references: ['no-at-sign'] }), /Invalid message id "no-at-sign"/);
    await assert.rejects(composeEmail({ ...reply, headers: { 'X-Note': 'a\r\nBcc: eve@example.com' } }), /line break/);
    await assert.rejects(composeEmail({ ...reply, headers: { 'Bad Name': 'x' } }), /Invalid header field name/);
    await assert.rejects(composeEmail({ ...reply, headers: { 'message-id': '<x@y>' } }), /set by composeEmail itself/);
  });
});

describe('renderHtmlFromText', () => {
  test('escapes, makes paragraphs and line breaks', () => {
    assert.equal(renderHtmlFromText('Hi <Bob> & "Ann",\nsee below.\n\n\nBye'), '<p>Hi &lt;Bob&gt; &amp; &quot;Ann&quot;,<br>\nsee below.</p>\n<p>Bye</p>');
  });

  test('links http(s) and www URLs without trailing punctuation', () => {
    assert.equal(
      renderHtmlFromText('Menu: https://example.com/a?b=1&c=2. Or www.example.org/x, (https://example.net/y)'),
      '<p>Menu: <a href="https://example.com/a?b=1&amp;c=2">https://example.com/a?b=1&amp;c=2</a>. ' +
        'Or <a href="https://www.example.org/x">www.example.org/x</a>, (<a href="https://example.net/y">https://example.net/y</a>)</p>',
    );
  });

  test('does not link other schemes and escapes quotes in URLs', () => {
    assert.equal(renderHtmlFromText('javascript:alert(1) https://x.example/"onmouseover="'), '<p>javascript:alert(1) <a href="https://x.example/">https://x.example/</a>&quot;onmouseover=&quot;</p>');
  });

  test('CRLF input and whitespace-only text', () => {
    assert.equal(renderHtmlFromText('a\r\nb\r\n\r\nc'), '<p>a<br>\nb</p>\n<p>c</p>');
    assert.equal(renderHtmlFromText(' \n\n '), '');
  });
});
