import type { Deps } from '../context.ts';
import { checkChain as engineCheckChain } from '../delivery/engine.ts';
import { knownPlugins } from '../delivery/registry.ts';
import { badRequest } from '../platform/errors.ts';

/**
 * Servicechains of the application API (issue 4 §2, §5): which chain a message takes and
 * where each plugin of it sends (docs/organisations.md "Chains and destinations").
 */

/**
 * Most plugins in one chain: the engine's ENQUEUE_LIMITS.maxChain (a literal here, since this
 * module is loaded while the engine's module may still be initialising — an import cycle
 * through the email bridge's hook).
 */
export const MAX_CHAIN = 8;

/** JSON schema of a chain in request bodies (names are checked against the engine's plugins). */
export const chainSchema = {
  type: 'array',
  minItems: 1,
  maxItems: MAX_CHAIN,
  items: { type: 'string', minLength: 1, maxLength: 40 },
  description: 'Servicechain: plugin names in the order tried (built in: parley, smtp, webhook, sms); each at most once',
} as const;

/**
 * Checks a servicechain with the engine's rules (1–8 known plugins, each once).
 * @throws AppError 400 `invalid_chain` / `unknown_plugin`
 */
export function checkChain(chain: string[]): string[] {
  return engineCheckChain(chain);
}

/**
 * Checks one plugin's configuration for an organisation with the plugin's own `validate`.
 * @throws AppError 400 `unknown_plugin`, `invalid_plugin_config` (with the plugin's reason)
 */
export async function checkPluginConfig(deps: Deps, plugin: string, config: Record<string, unknown>): Promise<void> {
  const p = knownPlugins().get(plugin);
  if (!p) throw badRequest('unknown_plugin', `unknown delivery plugin ${JSON.stringify(plugin)}`, { plugin, plugins: [...knownPlugins().keys()] });
  try {
    await p.validate(deps, config);
  } catch (e) {
    throw badRequest('invalid_plugin_config', `${plugin}: ${(e as Error).message}`, { plugin });
  }
}

/** What chains and destinations read of a contact and its organisation. */
export interface ChainContact {
  id: number;
  name?: string;
  email: string | null;
  phone: string | null;
  preferred_chain: string[] | null;
  fields: Record<string, string>;
}

/**
 * The chain of one message: the message's own chain, else the contact's preferred chain,
 * else the organisation's default chain.
 */
export function chainFor(override: string[] | null | undefined, contact: ChainContact, orgDefault: string[]): string[] {
  if (override && override.length) return override;
  if (contact.preferred_chain && contact.preferred_chain.length) return contact.preferred_chain;
  return orgDefault;
}

/**
 * Where each plugin reaches a contact: `smtp` → the email address, `parley` → the email
 * address (a Parley user here or, with federation, elsewhere), `sms` → the E.164 phone,
 * `webhook` → the contact as the organisation's application knows it: its custom field
 * `webhook_id` if set, else the contact's id (the webhook's URL and secret are the
 * organisation's `plugin_config.webhook`). Plugins with no destination are absent.
 */
export function destinationsFor(contact: ChainContact): Record<string, string> {
  const d: Record<string, string> = {};
  if (contact.email) {
    d.smtp = contact.email;
    d.parley = contact.email;
  }
  if (contact.phone) d.sms = contact.phone;
  d.webhook = (contact.fields?.webhook_id || String(contact.id)).slice(0, 500);
  return d;
}

/**
 * The chain actually used: the plugins of `chain` that have a destination for the contact,
 * in order (a contact without a phone skips `sms`). Empty when none can reach the contact.
 */
export function reachableChain(chain: string[], destinations: Record<string, string>): string[] {
  return chain.filter((p) => destinations[p] !== undefined);
}
