/**
 * The subset of Structured Field Values for HTTP (RFC 8941) that the federation headers
 * use: dictionaries (`Signature-Input`, `Signature`, `Content-Digest`) whose members are
 * items or inner lists, with parameters; bare items that are integers, decimals, strings,
 * tokens, byte sequences and booleans. Parsing is strict (RFC 8941 §4.2): anything not
 * allowed by the grammar throws {@link StructuredFieldError}.
 */

/** A bare item (RFC 8941 §3.3). Byte sequences are Buffers; tokens are {@link Token}s. */
export type BareItem = number | string | boolean | Buffer | Token;
/** Parameters of an item or inner list, in order (RFC 8941 §3.1.2). */
export type Params = Map<string, BareItem>;
/** An item with its parameters. */
export interface Item {
  value: BareItem;
  params: Params;
}
/** An inner list with its parameters (RFC 8941 §3.1.1). */
export interface InnerList {
  items: Item[];
  params: Params;
}
/** A dictionary (RFC 8941 §3.2): member values are items or inner lists, in order. */
export type Dictionary = Map<string, Item | InnerList>;

/** A token (RFC 8941 §3.3.4), kept distinct from a string. */
export class Token {
  constructor(readonly value: string) {}
}

/** A header value that does not follow the RFC 8941 grammar. */
export class StructuredFieldError extends Error {}

/** Is `m` an inner list (as opposed to an item)? */
export function isInnerList(m: Item | InnerList): m is InnerList {
  return (m as InnerList).items !== undefined;
}

class Parser {
  i = 0;
  constructor(readonly s: string) {}
  fail(what: string): never {
    throw new StructuredFieldError(`${what} at character ${this.i} of ${JSON.stringify(this.s)}`);
  }
  peek(): string {
    return this.s[this.i] ?? '';
  }
  skipSp(): void {
    while (this.peek() === ' ') this.i++;
  }
  skipOws(): void {
    while (this.peek() === ' ' || this.peek() === '\t') this.i++;
  }
  key(): string {
    const c = this.peek();
    if (!/[a-z*]/.test(c)) this.fail('expected a key');
    const start = this.i;
    while (/[a-z0-9_\-.*]/.test(this.peek())) this.i++;
    return this.s.slice(start, this.i);
  }
  bareItem(): BareItem {
    const c = this.peek();
    if (c === '-' || /[0-9]/.test(c)) return this.number();
    if (c === '"') return this.string();
    if (c === ':') return this.bytes();
    if (c === '?') return this.boolean();
    if (/[A-Za-z*]/.test(c)) return this.token();
    return this.fail('expected a bare item');
  }
  number(): number {
    const m = /^-?[0-9]{1,15}(\.[0-9]{1,3})?/.exec(this.s.slice(this.i));
    if (!m) this.fail('expected a number');
    const text = m[0];
    if (m[1] === undefined && text.replace('-', '').length > 15) this.fail('integer too long');
    if (m[1] !== undefined && text.replace('-', '').split('.')[0].length > 12) this.fail('decimal too long');
    this.i += text.length;
    return Number(text);
  }
  string(): string {
    this.i++; // opening quote
    let out = '';
    for (;;) {
      const c = this.s[this.i++];
      if (c === undefined) this.fail('unterminated string');
      if (c === '\\') {
        const n = this.s[this.i++];
        if (n !== '"' && n !== '\\') this.fail('bad escape in string');
        out += n;
      } else if (c === '"') return out;
      else if (c < ' ' || c > '~') this.fail('character not allowed in a string');
      else out += c;
    }
  }
  token(): Token {
    const start = this.i;
    this.i++;
    while (/[!#$%&'*+\-.^_`|~0-9A-Za-z:/]/.test(this.peek())) this.i++;
    return new Token(this.s.slice(start, this.i));
  }
  bytes(): Buffer {
    this.i++;
    const end = this.s.indexOf(':', this.i);
    if (end < 0) this.fail('unterminated byte sequence');
    const b64 = this.s.slice(this.i, end);
    if (!/^[A-Za-z0-9+/]*={0,2}$/.test(b64)) this.fail('byte sequence is not base64');
    this.i = end + 1;
    return Buffer.from(b64, 'base64');
  }
  boolean(): boolean {
    this.i++;
    const c = this.s[this.i++];
    if (c === '1') return true;
    if (c === '0') return false;
    return this.fail('expected ?0 or ?1');
  }
  params(): Params {
    const p: Params = new Map();
    while (this.peek() === ';') {
      this.i++;
      this.skipSp();
      const k = this.key();
      let v: BareItem = true;
      if (this.peek() === '=') {
        this.i++;
        v = this.bareItem();
      }
      p.set(k, v);
    }
    return p;
  }
  itemOrInnerList(): Item | InnerList {
    if (this.peek() === '(') {
      this.i++;
      const items: Item[] = [];
      for (;;) {
        this.skipSp();
        if (this.peek() === ')') {
          this.i++;
          return { items, params: this.params() };
        }
        const value = this.bareItem();
        items.push({ value, params: this.params() });
        const c = this.peek();
        if (c !== ' ' && c !== ')') this.fail('expected a space or ) in an inner list');
      }
    }
    const value = this.bareItem();
    return { value, params: this.params() };
  }
}

/**
 * Parses a dictionary field value (RFC 8941 §4.2.2). Several field lines must be joined
 * with ", " first (Node does this for unknown headers). Later duplicate keys win.
 * @throws StructuredFieldError when the value is not a valid dictionary
 */
export function parseDictionary(value: string): Dictionary {
  const p = new Parser(value.trim());
  const out: Dictionary = new Map();
  if (p.s === '') return out;
  for (;;) {
    const k = p.key();
    let member: Item | InnerList;
    if (p.peek() === '=') {
      p.i++;
      member = p.itemOrInnerList();
    } else member = { value: true, params: p.params() };
    out.set(k, member);
    p.skipOws();
    if (p.i >= p.s.length) return out;
    if (p.peek() !== ',') p.fail('expected a comma');
    p.i++;
    p.skipOws();
    if (p.i >= p.s.length) p.fail('trailing comma');
  }
}

/** Serialises a bare item (RFC 8941 §4.1.3). @throws StructuredFieldError for values that cannot be serialised */
export function serializeBareItem(v: BareItem): string {
  if (v instanceof Token) return v.value;
  if (Buffer.isBuffer(v)) return `:${v.toString('base64')}:`;
  if (typeof v === 'boolean') return v ? '?1' : '?0';
  if (typeof v === 'number') {
    if (!Number.isFinite(v)) throw new StructuredFieldError('not a finite number');
    return Number.isInteger(v) ? String(v) : String(Math.round(v * 1000) / 1000);
  }
  if (/[^\x20-\x7e]/.test(v)) throw new StructuredFieldError('strings are printable ASCII only');
  return `"${v.replace(/[\\"]/g, (c) => `\\${c}`)}"`;
}

/** Serialises parameters (RFC 8941 §4.1.1.2): `;key=value`, or `;key` for true. */
export function serializeParams(p: Params): string {
  let out = '';
  for (const [k, v] of p) out += v === true ? `;${k}` : `;${k}=${serializeBareItem(v)}`;
  return out;
}

/** Serialises an inner list with its parameters (RFC 8941 §4.1.1.1), e.g. `("a" "b");x=1`. */
export function serializeInnerList(l: InnerList): string {
  return `(${l.items.map((i) => serializeBareItem(i.value) + serializeParams(i.params)).join(' ')})${serializeParams(l.params)}`;
}

/** Serialises a dictionary (RFC 8941 §4.1.2). */
export function serializeDictionary(d: Dictionary): string {
  return [...d]
    .map(([k, m]) => {
      if (isInnerList(m)) return `${k}=${serializeInnerList(m)}`;
      if (m.value === true) return `${k}${serializeParams(m.params)}`;
      return `${k}=${serializeBareItem(m.value)}${serializeParams(m.params)}`;
    })
    .join(', ');
}
