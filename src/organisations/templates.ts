import { badRequest } from '../platform/errors.ts';

/**
 * Message templates of the application API (issue 4 §5: "messages to a contact or a group
 * with a body template and contact placeholders"; docs/organisations.md "Templates").
 *
 * A placeholder is `{{name}}`, `{{email}}`, `{{phone}}` or `{{fields.KEY}}` (KEY a custom
 * field of the contact, 1–64 of `A–Z a–z 0–9 _ - .`), with optional spaces inside the
 * braces. Rendering is plain string substitution: no expressions, no code, no HTML — the
 * result is a text body (format `plain`), so a value can never inject markup. A value the
 * contact does not have renders as the empty string. Anything else between `{{` and `}}`
 * is an unknown placeholder, refused at submit time (400 `unknown_placeholder` listing
 * them). A `{{` with no closing `}}` is literal text.
 */

/** The placeholder pattern: `{{ … }}` with no braces inside. */
const PLACEHOLDER = /\{\{([^{}]*)\}\}/g;
/** Names of the built-in placeholders. */
export const BUILTIN_PLACEHOLDERS = ['name', 'email', 'phone'] as const;
/** A custom field key (also the CSV import's column names for fields). */
export const FIELD_KEY = /^[A-Za-z0-9_.-]{1,64}$/;

/** What a template can read of a contact. */
export interface TemplateContact {
  name: string;
  email: string | null;
  phone: string | null;
  fields: Record<string, string>;
}

function known(name: string): boolean {
  if ((BUILTIN_PLACEHOLDERS as readonly string[]).includes(name)) return true;
  return name.startsWith('fields.') && FIELD_KEY.test(name.slice('fields.'.length));
}

/** The placeholders of `template` that are not known, in order of first appearance. */
export function unknownPlaceholders(template: string): string[] {
  const out: string[] = [];
  for (const m of template.matchAll(PLACEHOLDER)) {
    const name = m[1].trim();
    if (!known(name) && !out.includes(m[0])) out.push(m[0]);
  }
  return out;
}

/**
 * Checks templates before anything is created.
 * @param templates named texts, e.g. `{ body, subject }`
 * @throws AppError 400 `unknown_placeholder` with `details.placeholders` (as written) and `details.allowed`
 */
export function checkTemplates(templates: Record<string, string | undefined>): void {
  const bad: { in: string; placeholder: string }[] = [];
  for (const [where, t] of Object.entries(templates)) {
    if (t === undefined) continue;
    for (const p of unknownPlaceholders(t)) bad.push({ in: where, placeholder: p });
  }
  if (bad.length > 0)
    throw badRequest('unknown_placeholder', `unknown placeholder${bad.length > 1 ? 's' : ''}: ${bad.map((b) => b.placeholder).join(', ')}`, {
      placeholders: bad,
      allowed: ['{{name}}', '{{email}}', '{{phone}}', '{{fields.KEY}}'],
    });
}

/** Renders a checked template for one contact (missing values render empty). */
export function renderTemplate(template: string, c: TemplateContact): string {
  return template.replace(PLACEHOLDER, (whole, inner: string) => {
    const name = inner.trim();
    switch (name) {
      case 'name':
        return c.name ?? '';
      case 'email':
        return c.email ?? '';
      case 'phone':
        return c.phone ?? '';
      default:
        if (known(name)) {
          const v = c.fields?.[name.slice('fields.'.length)];
          return typeof v === 'string' ? v : v == null ? '' : String(v);
        }
        return whole; // unreachable after checkTemplates
    }
  });
}
