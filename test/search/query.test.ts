import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { AppError } from '../../src/platform/errors.ts';
import { parseSearchQuery, queryFingerprint, searchWords } from '../../src/search/query.ts';

const empty = { words: [], phrases: [], subjectWords: [], subjectPhrases: [], from: [], to: [], includes: [], hasAttachment: false, ignored: [] };

/** Asserts that parsing `q` fails with 400 invalid_query and the given reason. */
function rejects(q: string, reason: string) {
  assert.throws(
    () => parseSearchQuery(q),
    (e: unknown) => e instanceof AppError && e.status === 400 && e.code === 'invalid_query' && e.details?.reason === reason && e.message.length > 10,
    `expected ${reason} for ${JSON.stringify(q)}`,
  );
}

describe('parseSearchQuery', () => {
  it('free words are lowercased, deduplicated, split at punctuation, stopwords set aside', () => {
    assert.deepEqual(parseSearchQuery('Meeting   the AGENDA meeting re:Budget, (draft)'), {
      ...empty,
      words: ['meeting', 'agenda', 're', 'budget', 'draft'],
      ignored: ['the'],
    });
  });

  it('keeps addresses, domains and file names whole as words', () => {
    assert.deepEqual(parseSearchQuery('bob@example.com report.pdf q3-plan ...x...').words, ['bob@example.com', 'report.pdf', 'q3-plan', 'x']);
  });

  it('parses every filter, case-insensitive names, quoted values', () => {
    assert.deepEqual(
      parseSearchQuery('From:Bob TO:@Example.com includes:<carol@x.test> subject:weekly subject:"Status Report" has:attachment lunch "quarterly numbers"'),
      {
        ...empty,
        words: ['lunch'],
        phrases: ['quarterly numbers'],
        subjectWords: ['weekly'],
        subjectPhrases: ['status report'],
        from: ['bob'],
        to: ['example.com'],
        includes: ['carol@x.test'],
        hasAttachment: true,
      },
    );
  });

  it('accepts has:attachments and has:files, and repeats of an address filter', () => {
    const q = parseSearchQuery('has:Files from:"alice bob" from:alice');
    assert.equal(q.hasAttachment, true);
    assert.deepEqual(q.from, ['alice', 'bob']);
    assert.equal(parseSearchQuery('has:attachments').hasAttachment, true);
  });

  it('a word with an unknown filter name is plain text', () => {
    assert.deepEqual(parseSearchQuery('cc:dave 10:30').words, ['cc', 'dave', '10', '30']);
  });

  it('phrases: an unclosed quote runs to the end; all-stopword phrases are ignored', () => {
    assert.deepEqual(parseSearchQuery('"to be or not" "big   Plans'), { ...empty, phrases: ['big plans'], ignored: ['to be or not'] });
  });

  it('operators of tsquery never survive in a word', () => {
    const q = parseSearchQuery(`a&b|c !d (e) f:* <g> 'h' \\k`);
    for (const w of q.words) assert.match(w, /^[\p{L}\p{N}._@+\-/]+$/u);
    assert.deepEqual(q.words, ['b', 'c', 'd', 'e', 'f', 'g', 'h', 'k']);
    assert.deepEqual(q.ignored, ['a']);
  });

  it('rejects empty, stopword-only, too long, bad filters and too many terms', () => {
    rejects('', 'empty');
    rejects('   ', 'empty');
    rejects('!!! ???', 'empty');
    rejects('the and of', 'only_stopwords');
    rejects('subject:the', 'only_stopwords');
    rejects('x'.repeat(501), 'too_long');
    rejects('from:', 'empty_filter');
    rejects('to:"" lunch', 'empty_filter');
    rejects('from:@ lunch', 'empty_filter');
    rejects('has:pictures', 'unknown_has');
    rejects(Array.from({ length: 21 }, (_, i) => `w${i}`).join(' '), 'too_many_terms');
    assert.equal(parseSearchQuery('x'.repeat(500)).words[0]!.length, 100, 'a long word is cut to a 100-character prefix');
  });

  it('searchWords normalises compatibility characters (NFKC) and drops symbol-only tokens', () => {
    assert.deepEqual(searchWords('ﬁle Ｒｅｐｏｒｔ -- ++'), ['file', 'report']);
  });

  it('the fingerprint depends on the terms, not on spacing, case or stopwords', () => {
    assert.equal(queryFingerprint(parseSearchQuery('Lunch  the FROM:bob')), queryFingerprint(parseSearchQuery('lunch from:Bob')));
    assert.notEqual(queryFingerprint(parseSearchQuery('lunch')), queryFingerprint(parseSearchQuery('subject:lunch')));
  });
});
