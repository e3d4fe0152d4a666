import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { splitQuotedReply } from '../../src/mail/quote.ts';

describe('splitQuotedReply', () => {
  test('Gmail-style attribution wrapped over two lines, then a quote', () => {
    const text = [
      'Sounds good, see you there.',
      '',
      'On Mon, Jan 1, 2024 at 10:00 AM Ann Example <',
      'ann@example.com> wrote:',
      '',
      '> Lunch at noon?',
      '> Ann',
    ].join('\n');
    assert.deepEqual(splitQuotedReply(text), {
      newText: 'Sounds good, see you there.',
      quoted: 'On Mon, Jan 1, 2024 at 10:00 AM Ann Example <\nann@example.com> wrote:\n\n> Lunch at noon?\n> Ann',
    });
  });

  test('localised attributions', () => {
    const cases = [
      'Le lun. 1 janv. 2024 à 10:00, Ann <ann@example.com> a écrit :',
      'Am 01.01.2024 um 10:00 schrieb Ann Example <ann@example.com>:',
      'El lun, 1 ene 2024 a las 10:00, Ann (<ann@example.com>) escribió:',
      'Il giorno lun 1 gen 2024 alle ore 10:00 Ann <ann@example.com> ha scritto:',
      'Op ma 1 jan. 2024 om 10:00 schreef Ann <ann@example.com>:',
      'Em seg., 1 de jan. de 2024 às 10:00, Ann <ann@example.com> escreveu:',
      'W dniu 01.01.2024 o 10:00, Ann Example pisze:',
      'pon., 1 sty 2024 o 10:00 Ann <ann@example.com> napisał(a):',
      'Ann Example wrote:',
      '* Ann Example <ann@example.com> [2002-10-07 14:32 +0200]:',
    ];
    for (const attribution of cases) {
      const result = splitQuotedReply(`Merci !\n\n${attribution}\n> Bonjour\n> à demain`);
      assert.equal(result.newText, 'Merci !', attribution);
      assert.equal(result.quoted, `${attribution}\n> Bonjour\n> à demain`, attribution);
    }
  });

  test('"-----Original Message-----" and everything after it', () => {
    const text = 'Yes, approved.\r\n\r\n-----Original Message-----\r\nFrom: Ann\r\nSent: Monday\r\nTo: Bob\r\nSubject: budget\r\n\r\nCan you approve?';
    assert.deepEqual(splitQuotedReply(text), {
      newText: 'Yes, approved.',
      quoted: '-----Original Message-----\nFrom: Ann\nSent: Monday\nTo: Bob\nSubject: budget\n\nCan you approve?',
    });
  });

  test('Outlook header block after a rule, in French', () => {
    const text = [
      "C'est noté.",
      '',
      '________________________________',
      'De : Ann Example <ann@example.com>',
      'Envoyé : lundi 1 janvier 2024 10:00',
      'À : Bob <bob@example.com>',
      'Objet : Réunion',
      '',
      'On se voit demain ?',
    ].join('\n');
    const result = splitQuotedReply(text);
    assert.equal(result.newText, "C'est noté.");
    assert.equal(result.quoted?.split('\n')[0], '________________________________');
    assert.ok(result.quoted?.endsWith('On se voit demain ?'));
  });

  test('a forwarded header block is content, not quoted history', () => {
    const text = 'FYI\n\n---------- Forwarded message ---------\nFrom: Ann <ann@example.com>\nDate: Mon, Jan 1, 2024\nSubject: Plans\nTo: Bob <bob@example.com>\n\nThe plans.';
    assert.deepEqual(splitQuotedReply(text), { newText: text, quoted: null });
  });

  test('forwarded messages, with their quotes, are content', () => {
    const apple = 'FYI\n\nBegin forwarded message:\n\n> From: Ann <ann@example.com>\n> Date: Mon, Jan 1, 2024\n> Subject: Plans\n>\n> The plans.';
    assert.deepEqual(splitQuotedReply(apple), { newText: apple, quoted: null });
    const eudora = '--- begin forwarded text\n\nTo: rah@example.com\nFrom: hacker@example.net\nDate: Thu, 03 Oct 2002\nSubject: Re: x\n\nBody\n\nAnn wrote:\n> earlier';
    assert.deepEqual(splitQuotedReply(eudora), { newText: eudora, quoted: null });
  });

  test('a bare trailing quote block without attribution', () => {
    assert.deepEqual(splitQuotedReply('Thanks!\n\n> original text\n> more\n'), { newText: 'Thanks!', quoted: '> original text\n> more' });
  });

  test('interleaved quoting keeps everything in newText', () => {
    const text = 'Ann wrote:\n> Lunch at noon?\nYes.\n\n> And dinner?\nNo, sorry.\n> Bye\n';
    assert.deepEqual(splitQuotedReply(text), { newText: text, quoted: null });
  });

  test('quote first, answer below (bottom-posting) keeps everything', () => {
    const text = 'Ann wrote:\n> Lunch at noon?\n\nYes, see you.';
    assert.deepEqual(splitQuotedReply(text), { newText: text, quoted: null });
  });

  test('unrecognised text and text that is only a quote come back unchanged', () => {
    for (const text of ['Just a note.\nNo quotes here.', '> only\n> quoted', 'On Monday I wrote:\n> x', '', '-----Original Message-----\nFrom: x']) {
      assert.deepEqual(splitQuotedReply(text), { newText: text, quoted: null }, JSON.stringify(text));
    }
  });

  test('a sentence starting with "On" before a short attribution does not swallow the new text', () => {
    const text = "On second thought, let's meet at one.\nAnn wrote:\n> Lunch at noon?";
    assert.deepEqual(splitQuotedReply(text), { newText: "On second thought, let's meet at one.", quoted: 'Ann wrote:\n> Lunch at noon?' });
  });
});
