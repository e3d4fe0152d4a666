import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { describe, test } from 'node:test';
import { parseEmail } from '../../src/mail/parse.ts';

const fixture = (name: string): Buffer => readFileSync(new URL(`../fixtures/mail/${name}`, import.meta.url));
const message = (lines: string[]): Buffer => Buffer.from(lines.join('\r\n'), 'latin1');
const hasWarning = (warnings: string[], pattern: RegExp): boolean => warnings.some((w) => pattern.test(w));

describe('parseEmail: threading and addresses', () => {
  test('a reply threads to its parent through In-Reply-To and References', async () => {
    const parent = await parseEmail(fixture('easy_ham-1509-thread-parent.eml'));
    const reply = await parseEmail(fixture('easy_ham-1511-thread-reply.eml'));
    assert.equal(parent.messageId, 'GCEDKONBLEFPPADDJCOEMECOENAA.whisper@oz.net');
    assert.equal(reply.messageId, '20020905225601.GA20578@glacier.arctrix.com');
    assert.deepEqual(reply.inReplyTo, ['GCEDKONBLEFPPADDJCOEMECOENAA.whisper@oz.net']);
    assert.deepEqual(reply.references, ['GCEDKONBLEFPPADDJCOEMECOENAA.whisper@oz.net']);
    assert.deepEqual(parent.from, { address: 'whisper@oz.net', name: 'David LeBlanc' });
    assert.deepEqual(reply.from, { address: 'nas@python.ca', name: 'Neil Schemenauer' });
    assert.equal(reply.subject, '[Spambayes] All but one testing');
    assert.equal(reply.date?.toISOString(), '2002-09-05T22:56:01.000Z');
    // The reply quotes first and answers below: nothing is split off.
    assert.equal(reply.quoted, null);
    assert.equal(reply.newText, reply.text);
    assert.match(reply.newText, /I have no idea\.\s+I made up the name\./);
  });

  test('References and In-Reply-To keep header order and drop brackets and comments', async () => {
    const parsed = await parseEmail(
      message([
        'From: Ann <ann@example.com>',
        'Message-ID: <m3@example.com>',
        'In-Reply-To: <m2@example.com> (Bob\'s message of "Mon, 1 Jan 2024")',
        'References: <m1@example.com>',
        ' <m1b@example.com>  <m2@example.com>',
        'Date: Mon, 1 Jan 2024 10:00:00 +0100',
        '',
        'Hi',
      ]),
    );
    assert.deepEqual(parsed.inReplyTo, ['m2@example.com']);
    assert.deepEqual(parsed.references, ['m1@example.com', 'm1b@example.com', 'm2@example.com']);
    assert.equal(parsed.messageId, 'm3@example.com');
    assert.deepEqual(parsed.warnings, []);
  });

  test('RFC 2047 encoded-words in Subject and display names, several From mailboxes', async () => {
    const parsed = await parseEmail(fixture('enmime-qp-utf8-header.raw'));
    assert.equal(parsed.subject, 'MIME UTF8 Test ¢ More Text');
    assert.deepEqual(parsed.from, { address: 'jamehi03@jamehi03lx.noa.com', name: 'James Hillyerd' });
    assert.deepEqual(parsed.sender, { address: 'pirard@vm1.ulg.ac.be', name: 'André Pirard' });
    assert.deepEqual(parsed.to, [{ address: 'marczak@inbucket.com', name: 'Mirosław Marczak' }]);
    assert.ok(hasWarning(parsed.warnings, /From lists 2 mailboxes/), parsed.warnings.join('\n'));
  });

  test('groups are flattened, addresses normalised, invalid ones dropped with a warning', async () => {
    const parsed = await parseEmail(
      message([
        'From: "Ann" <Ann@Example.COM>',
        'To: Team: a@x.org, "B" <B@Y.org>;, c@z.org, def <ydefmail.com>',
        'Cc: undisclosed-recipients:;',
        'Reply-To: list@example.com',
        'Date: Mon, 1 Jan 2024 10:00:00 +0000',
        'Message-ID: <x@example.com>',
        '',
        'Hi',
      ]),
    );
    assert.deepEqual(parsed.from, { address: 'ann@example.com', name: 'Ann' });
    assert.deepEqual(parsed.to, [
      { address: 'a@x.org', name: '' },
      { address: 'b@y.org', name: 'B' },
      { address: 'c@z.org', name: '' },
    ]);
    assert.deepEqual(parsed.cc, []);
    assert.deepEqual(parsed.replyTo, [{ address: 'list@example.com', name: '' }]);
    assert.deepEqual(parsed.warnings, ['Dropped an invalid address from To: Invalid email address "ydefmail.com": it has no "@"']);
  });
});

describe('parseEmail: bodies and attachments', () => {
  test('multipart/mixed with a file attachment', async () => {
    const parsed = await parseEmail(fixture('enmime-attachment.raw'));
    assert.equal(parsed.text, 'A text section');
    assert.equal(parsed.html, null);
    assert.equal(parsed.attachments.length, 1);
    const [attachment] = parsed.attachments;
    assert.equal(attachment.filename, 'test.html');
    assert.equal(attachment.contentType, 'text/html');
    assert.equal(attachment.content.toString(), '<html>\n');
    assert.equal(attachment.size, 7);
    assert.equal(attachment.inline, false);
    assert.equal(attachment.contentId, null);
    assert.deepEqual(parsed.warnings, []);
  });

  test('inline image of a multipart/related keeps its Content-ID and the cid: link', async () => {
    const parsed = await parseEmail(fixture('enmime-html-mime-inline.raw'));
    assert.equal(parsed.text, 'Test of text section');
    assert.ok(parsed.html?.includes('src="cid:8B8481A2-25CA-4886-9B5A-8EB9115DD064@skynet"'), parsed.html ?? 'no html');
    assert.equal(parsed.attachments.length, 1);
    const [image] = parsed.attachments;
    assert.equal(image.filename, 'favicon.png');
    assert.equal(image.contentType, 'image/png');
    assert.equal(image.contentId, '8B8481A2-25CA-4886-9B5A-8EB9115DD064@skynet');
    assert.equal(image.inline, true);
    assert.deepEqual([...image.content.subarray(0, 4)], [0x89, 0x50, 0x4e, 0x47]);
  });

  test('multipart/signed: the signed text is the body, the signature an attachment', async () => {
    const parsed = await parseEmail(fixture('enmime-mime-signed.raw'));
    assert.match(parsed.text, /^Section one\s+Section two$/);
    assert.deepEqual(
      parsed.attachments.map((a) => [a.filename, a.contentType]),
      [['signature.asc', 'application/pgp-signature']],
    );
    assert.match(parsed.attachments[0].content.toString(), /^-----BEGIN PGP SIGNATURE-----/);
  });

  test('an HTML-only message gets text derived from the HTML', async () => {
    const parsed = await parseEmail(fixture('enmime-non-mime-html.raw'));
    assert.ok(parsed.html?.includes('<strong>a</strong>'));
    assert.match(parsed.text, /^This\s+is\s+a\s+test\s+mailing$/);
    assert.equal(parsed.newText, parsed.text);
  });

  test('iso-8859-1 quoted-printable body', async () => {
    const parsed = await parseEmail(fixture('mime-explode-german.msg'));
    assert.ok(parsed.text.includes('Temme steht der POP schon zur Verfügung!'), parsed.text.slice(0, 400));
    assert.deepEqual(parsed.from, { address: 'deuschle@mnh.telekom.de', name: 'Guenter Deuschle' });
    assert.equal(parsed.subject, 'Re: 34Mbit/s Netz');
    assert.equal(parsed.date?.toISOString(), '1996-06-19T16:12:02.000Z');
  });

  test('windows-1252 8-bit body', async () => {
    const parsed = await parseEmail(
      message(['From: a@example.com', 'Content-Type: text/plain; charset=windows-1252', 'Content-Transfer-Encoding: 8bit', '', 'Price: \x80 5, \x93quoted\x94']),
    );
    assert.equal(parsed.text, 'Price: € 5, “quoted”');
  });

  test('koi8-r encoded-word file name; missing From and Date are reported', async () => {
    const parsed = await parseEmail(fixture('mime-explode-russian.msg'));
    assert.equal(parsed.attachments[0]?.filename, 'Список.doc');
    assert.equal(parsed.from, null);
    assert.equal(parsed.date, null);
    assert.ok(hasWarning(parsed.warnings, /^Missing From header field$/));
    assert.ok(hasWarning(parsed.warnings, /^Missing Date header field$/));
  });

  test('file names: directories stripped, missing ones generated from part number and type', async () => {
    const parsed = await parseEmail(
      message([
        'From: a@example.com',
        'Content-Type: multipart/mixed; boundary="b"',
        '',
        '--b',
        'Content-Type: text/plain',
        '',
        'body',
        '--b',
        'Content-Type: application/octet-stream',
        'Content-Disposition: attachment',
        '',
        'data',
        '--b',
        'Content-Type: application/pdf',
        'Content-Disposition: attachment; filename="../../etc/passwd"',
        '',
        'pdf',
        '--b',
        'Content-Type: image/png',
        // a Windows path; each backslash is escaped as a quoted-pair (RFC 5322 §3.2.1)
        'Content-Disposition: attachment; filename="C:\\\\Users\\\\ann\\\\photo.png"',
        '',
        'png',
        '--b--',
      ]),
    );
    assert.deepEqual(
      parsed.attachments.map((a) => a.filename),
      ['part-2.bin', 'passwd', 'photo.png'],
    );
  });

  test('a DSN (multipart/report) from a mailing list', async () => {
    const parsed = await parseEmail(fixture('cpython-msg_16-dsn.txt'));
    assert.equal(parsed.autoSubmitted, true);
    assert.equal(parsed.listId, 'scr.socal-raves.org');
    assert.deepEqual(parsed.from, { address: 'postmaster@ucla.edu', name: 'Internet Mail Delivery' });
    assert.match(parsed.text, /Reason: recipient reached disk quota/);
    assert.match(parsed.text, /Status: 5\.0\.0/); // the message/delivery-status part
    const returned = parsed.attachments.find((a) => a.contentType === 'message/rfc822');
    assert.equal(returned?.filename, 'part-3.eml');
    assert.match(returned?.content.toString() ?? '', /Subject: \[scr\] yeah for Ians!!/);
  });

  test('Auto-Submitted and Precedence', async () => {
    const headers = async (...lines: string[]) => (await parseEmail(message(['From: a@example.com', ...lines, '', 'x']))).autoSubmitted;
    assert.equal(await headers('Auto-Submitted: auto-replied'), true);
    assert.equal(await headers('Auto-Submitted: no'), false);
    assert.equal(await headers('Precedence: junk'), true);
    assert.equal(await headers('Precedence: first-class'), false);
    assert.equal(await headers(), false);
  });
});

describe('parseEmail: broken and unusual input', () => {
  test('mbox envelope line at the top and a raw latin-1 byte in the Subject', async () => {
    const parsed = await parseEmail(fixture('easy_ham-2451-8bit-subject.eml'));
    assert.equal(parsed.subject, "A-level student sues for £100,000 over 'grade fixing'");
    assert.deepEqual(parsed.from, { address: 'rssfeeds@example.com', name: 'guardian' });
    assert.deepEqual(parsed.warnings, ['The header section contains 8-bit bytes that are not UTF-8; decoded them as windows-1252']);
  });

  test('8-bit header bytes are decoded as the declared charset when there is one; UTF-8 is taken as is', async () => {
    const greek = await parseEmail(message(['From: a@example.com', 'Subject: \xe1\xe2\xe3', 'Content-Type: text/plain; charset=iso-8859-7', '', 'x']));
    assert.equal(greek.subject, 'αβγ');
    const utf8 = await parseEmail(Buffer.from('From: Zoë <zoe@example.com>\r\nSubject: Crème brûlée\r\n\r\nx'));
    assert.equal(utf8.subject, 'Crème brûlée');
    assert.equal(utf8.from?.name, 'Zoë');
    assert.ok(!hasWarning(utf8.warnings, /8-bit/));
  });

  test('an mbox envelope line misplaced among the header fields is removed', async () => {
    const parsed = await parseEmail(fixture('easy_ham-0316-misplaced-envelope.eml'));
    assert.ok(hasWarning(parsed.warnings, /envelope line found among the header fields/));
    assert.deepEqual(parsed.from, { address: 'rah@shipwright.com', name: 'R. A. Hettinga' });
    assert.deepEqual(parsed.sender, { address: 'fork-admin@xent.com', name: '' });
    assert.equal(parsed.listId, 'fork.xent.com');
    assert.equal(parsed.autoSubmitted, true); // Precedence: bulk
    assert.equal(parsed.date?.toISOString(), '2002-10-08T22:18:20.000Z');
  });

  test('multipart without its close delimiter', async () => {
    const parsed = await parseEmail(fixture('enmime-bad-final-boundary.raw'));
    assert.equal(parsed.text, 'A text section');
    assert.equal(parsed.attachments[0]?.filename, 'foo_9E5D72.zip');
    assert.deepEqual(parsed.warnings, ['The multipart/mixed message has no close delimiter; its last part may be truncated']);
  });

  test('multipart whose body never uses its boundary: the body is kept as text', async () => {
    const parsed = await parseEmail(fixture('cpython-msg_17-no-parts.txt'));
    assert.match(parsed.text, /^Hi there,\s+This is the dingus fish\./);
    assert.ok(hasWarning(parsed.warnings, /No part of the multipart\/mixed message starts with its boundary "BOUNDARY"/));
  });

  test('input without a header section is all body', async () => {
    const parsed = await parseEmail(fixture('enmime-erroneous.raw'));
    assert.equal(parsed.text, '// Not an RFC-822 Document');
    assert.equal(parsed.subject, '');
    assert.equal(parsed.messageId, null);
    assert.ok(hasWarning(parsed.warnings, /no header section/));
  });

  test('when MIME parsing fails, the header fields and the raw body are kept', async () => {
    const html = '<p>Hello <b>there</b>, this HTML is longer than the limit.</p>';
    const parsed = await parseEmail(message(['From: Ann <ann@example.com>', 'Subject: Big', 'Content-Type: text/html; charset=utf-8', '', html]), { maxHtmlLengthToParse: 20 });
    assert.ok(hasWarning(parsed.warnings, /^MIME parsing failed \(HTML too long/), parsed.warnings.join('\n'));
    assert.equal(parsed.subject, 'Big');
    assert.deepEqual(parsed.from, { address: 'ann@example.com', name: 'Ann' });
    assert.equal(parsed.text, html);
    assert.equal(parsed.html, null);
  });

  test('dates: obsolete forms, missing zone taken as UTC, garbage reported', async () => {
    const date = async (value: string) => parseEmail(message(['From: a@example.com', `Date: ${value}`, '', 'x']));
    assert.equal((await date('Thu, 5 Sep 02 15:42:38 PDT')).date?.toISOString(), '2002-09-05T22:42:38.000Z');
    assert.equal((await date('5 Sep 2002 15:42:38')).date?.toISOString(), '2002-09-05T15:42:38.000Z');
    assert.equal((await date('Sun, 23 Sep 2001 20:14:35 -0700 (PDT)')).date?.toISOString(), '2001-09-24T03:14:35.000Z');
    const garbage = await date('sometime last week');
    assert.equal(garbage.date, null);
    assert.ok(hasWarning(garbage.warnings, /Unparseable Date header field "sometime last week"/));
  });

  test('empty input is not a message', async () => {
    await assert.rejects(parseEmail(Buffer.alloc(0)), /Not an email message: the input is empty/);
    await assert.rejects(parseEmail(Buffer.from(' \r\n\r\n')), /Not an email message/);
  });
});

describe('parseEmail: quoted replies', () => {
  test('top-posted reply above a quoted Original Message', async () => {
    const parsed = await parseEmail(fixture('easy_ham-1775-top-posted-reply.eml'));
    assert.match(parsed.newText, /^You missed the part that said/);
    assert.match(parsed.newText, /David LeBlanc\nSeattle, WA USA$/);
    assert.match(parsed.quoted ?? '', /^> -----Original Message-----\n> From: spambayes-bounces/);
    assert.ok(parsed.text.includes('> FYI, I\'ll never trust such a scheme'));
  });

  test('Outlook Express "----- Original Message -----" block', async () => {
    const parsed = await parseEmail(fixture('easy_ham-0809-outlook-express-reply.eml'));
    assert.equal(parsed.newText, 'Of the three lying politicians, which liar would you take?');
    assert.match(parsed.quoted ?? '', /^----- Original Message ----- ?\nFrom: "John Hall" <johnhall@evergo.net>/);
  });
});
