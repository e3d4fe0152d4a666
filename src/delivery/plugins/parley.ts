import { Type } from '@sinclair/typebox';
import { isLocalAddress } from '../../context.ts';
import { isValidAddress, normalizeAddress } from '../../mail/address.ts';
import { type DeliveryPlugin, type SendResult, configProblems } from '../plugin.ts';

/**
 * The `parley` plugin (issue 4 §1): to a user of this platform. The message is already in
 * the conversation (the organisation's message is an action of it, and the user is a
 * participant), so nothing more is written: the attempt is accepted at once, delivered, with
 * the local recipient as provider ref.
 * TODO(federation): a destination on another Parley platform is refused (`failed`, so the
 * chain moves on, e.g. to `smtp`) until federation exists; then it becomes a push to that
 * platform, accepted when the platform acknowledges it.
 */
export function parleyPlugin(): DeliveryPlugin {
  const plugin: DeliveryPlugin = {
    name: 'parley',
    configSchema: Type.Object({}, { additionalProperties: false }),
    needsConfig: false,
    capabilities: { receipts: true, read: false, replies: true, dedupe: 'local' },
    async validate(_deps, config) {
      if (config === undefined) return;
      const problems = configProblems(plugin, config);
      if (problems.length) throw new Error(problems.join('; '));
    },
    checkDestination(destination) {
      return isValidAddress(destination) ? null : `"${destination.slice(0, 80)}" is not an address`;
    },
    async send(d, deps): Promise<SendResult> {
      if (!isValidAddress(d.destination)) return { outcome: 'failed', error: `"${d.destination}" is not an address` };
      const address = normalizeAddress(d.destination);
      if (!isLocalAddress(deps, address)) return { outcome: 'failed', error: `${address} is not a user of this platform (delivery to other platforms needs federation)` };
      const u = await deps.db.kysely.selectFrom('users').select('id').where('address', '=', address).executeTakeFirst();
      if (!u) return { outcome: 'failed', error: `no user ${address} on this platform` };
      return { outcome: 'accepted', providerRef: address, delivered: true };
    },
  };
  return plugin;
}
