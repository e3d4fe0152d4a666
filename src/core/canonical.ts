import { hash } from 'node:crypto';

/**
 * Canonical JSON, after RFC 8785 (JSON Canonicalization Scheme): object keys sorted by
 * UTF-16 code units, no whitespace, `undefined` members omitted, strings escaped as
 * JSON.stringify does, numbers in their ECMAScript shortest form (only safe integers and
 * finite numbers occur in actions). Two platforms that agree on an action's fields agree
 * on its bytes, hence on its hash (docs/federation.md).
 * @throws TypeError for non-finite numbers, bigints, functions or symbols
 */
export function canonicalJson(value: unknown): string {
  return encode(value, null);
}

/**
 * {@link canonicalJson} of the object `obj` without its top-level members named in `omit`
 * (an action without `hash` and `sig`: core/actions.ts hashAction) — the same bytes as
 * copying the object without them first, without the copy.
 * @throws TypeError as {@link canonicalJson}
 */
export function canonicalJsonOmitting(obj: Record<string, unknown>, omit: ReadonlySet<string>): string {
  return encode(obj, omit);
}

function encode(value: unknown, omit: ReadonlySet<string> | null): string {
  if (value === null) return 'null';
  switch (typeof value) {
    case 'string':
      return JSON.stringify(value);
    case 'boolean':
      return value ? 'true' : 'false';
    case 'number':
      if (!Number.isFinite(value)) throw new TypeError('canonical JSON cannot encode a non-finite number');
      return JSON.stringify(value);
    case 'object': {
      if (Array.isArray(value)) {
        let out = '[';
        for (let i = 0; i < value.length; i++) {
          const v: unknown = value[i];
          out += (i === 0 ? '' : ',') + (v === undefined ? 'null' : encode(v, null));
        }
        return out + ']';
      }
      // A loop rather than filter/map/join: actions are hashed on every append (hot path).
      const obj = value as Record<string, unknown>;
      const keys = Object.keys(obj).sort();
      let out = '{';
      for (const k of keys) {
        const v = obj[k];
        if (v === undefined || (omit !== null && omit.has(k))) continue;
        out += (out.length === 1 ? '' : ',') + JSON.stringify(k) + ':' + encode(v, null);
      }
      return out + '}';
    }
    default:
      throw new TypeError(`canonical JSON cannot encode a ${typeof value}`);
  }
}

/**
 * SHA-256 of a string (UTF-8) or bytes, lowercase hex. One-shot `crypto.hash`: for the
 * short inputs hashed here it costs about a quarter of createHash/update/digest.
 */
export function sha256Hex(data: string | Uint8Array): string {
  return hash('sha256', data, 'hex');
}
