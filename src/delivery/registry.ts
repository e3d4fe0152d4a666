import { smtpPlugin } from '../mail/outbound/smtp-plugin.ts';
import { PLUGIN_NAME, type DeliveryPlugin } from './plugin.ts';
import { parleyPlugin } from './plugins/parley.ts';
import { smsPlugin } from './plugins/sms.ts';
import { webhookPlugin } from './plugins/webhook.ts';

const extra = new Map<string, DeliveryPlugin>();

/** The built-in plugins by name (issue 4 §1): `parley`, `smtp`, `webhook`, `sms`. A fresh map (of the same stateless plugin objects) each call. */
export function builtinPlugins(): Map<string, DeliveryPlugin> {
  builtins ??= [parleyPlugin(), smtpPlugin, webhookPlugin(), smsPlugin()];
  return new Map(builtins.map((p) => [p.name, p]));
}

let builtins: DeliveryPlugin[] | null = null;

/**
 * Adds a plugin to this process's set (beside the built-in ones), for servicechains and
 * workers started afterwards. Returns a function that removes it again.
 * @throws Error when the name is invalid or taken
 */
export function registerPlugin(plugin: DeliveryPlugin): () => void {
  if (!PLUGIN_NAME.test(plugin.name)) throw new Error(`invalid plugin name "${plugin.name}" (${PLUGIN_NAME})`);
  if (extra.has(plugin.name) || builtinPlugins().has(plugin.name)) throw new Error(`a plugin named ${plugin.name} exists`);
  extra.set(plugin.name, plugin);
  return () => {
    if (extra.get(plugin.name) === plugin) extra.delete(plugin.name);
  };
}

/** Every plugin this process knows: the built-in ones and those registered. A fresh map each call. */
export function knownPlugins(): Map<string, DeliveryPlugin> {
  const m = builtinPlugins();
  for (const [k, p] of extra) m.set(k, p);
  return m;
}
