import { badRequest } from '../platform/errors.ts';

/**
 * Cursor pagination of the organisation API's lists: a page is `{items, next_cursor}`;
 * pass `next_cursor` back as `cursor` for the next page; `null` on the last page. Cursors
 * are opaque (base64url of the last key of the page) and stay valid while rows change.
 */
export interface Page<T> {
  items: T[];
  /** Opaque; null on the last page. */
  next_cursor: string | null;
}

/** Default and maximum page sizes. */
export const PAGE = { default: 100, max: 500 } as const;

/** The querystring schema of a paged list. */
export const pageQuery = {
  cursor: { type: 'string', maxLength: 200, description: 'Opaque: the `next_cursor` of the previous page' },
  limit: { type: 'integer', minimum: 1, maximum: PAGE.max, default: PAGE.default },
} as const;

/** Encodes the last key of a page. */
export function encodeCursor(v: string | number): string {
  return Buffer.from(JSON.stringify(v)).toString('base64url');
}

/**
 * Decodes a cursor of the expected kind; null when absent.
 * @throws AppError 400 `invalid_cursor`
 */
export function decodeCursor(cursor: string | undefined, kind: 'string' | 'number'): string | number | null {
  if (cursor === undefined || cursor === '') return null;
  try {
    const v = JSON.parse(Buffer.from(cursor, 'base64url').toString('utf8'));
    if (typeof v === kind) return v;
  } catch {
    /* fall through */
  }
  throw badRequest('invalid_cursor', 'cursor is not one this list gave');
}

/** Builds a page from rows fetched with `limit + 1`. */
export function pageOf<T>(rows: T[], limit: number, keyOf: (t: T) => string | number): Page<T> {
  const items = rows.slice(0, limit);
  return { items, next_cursor: rows.length > limit ? encodeCursor(keyOf(items[items.length - 1])) : null };
}
