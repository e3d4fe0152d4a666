/**
 * The per-process federation machinery of a platform: discovery (with its cache), the key
 * resolver (own keys from the database, other platforms' through discovery and their keys
 * document, cached) and the replay store. Built on first use from the platform's `Deps` and
 * kept for the life of its database handle, so every request of a process shares one cache.
 */
import { type Deps, primaryDomain } from '../context.ts';
import { createResolver } from '../mail/dns.ts';
import { type Action, type ActionInput } from '../core/actions.ts';
import { type Discovery, DiscoveryUnavailable, createDiscovery } from './discovery.ts';
import { type KeyResolver, type ReplayStore, parseKeyId } from './http-signatures.ts';
import { localKeyResolver } from './keys.ts';
import { createRemoteKeyResolver } from './remote-keys.ts';
import { isDomainAllowed } from './abuse.ts';
import { pgReplayStore } from './replay.ts';
import { type LogCheck, type OriginCheck, type VerifyLogOptions, verifyLog } from './action-signatures.ts';

/** What federation code of one platform process shares. */
export interface FederationRuntime {
  discovery: Discovery;
  /** Own keys from the database, other platforms' keys over HTTP (cached); null for a platform the allow/deny lists exclude (never fetched). */
  resolveKey: KeyResolver;
  replay: ReplayStore;
}

const runtimes = new WeakMap<object, FederationRuntime>();

/**
 * The federation runtime of the platform `deps` belongs to (one per database handle, i.e.
 * per platform process). Discovery reads `config.federationRoutes` at every lookup; with
 * PARLEY_DNS_OFFLINE it uses the static routes only (no DNS, no well-known fetch).
 */
export function federationOf(deps: Deps): FederationRuntime {
  let r = runtimes.get(deps.db);
  if (r) return r;
  const offline = deps.config.dnsOffline;
  const discovery = createDiscovery({
    routes: () => deps.config.federationRoutes ?? {},
    resolver: offline ? null : createResolver({ timeoutMs: deps.config.dnsTimeoutMs, cacheTtlMs: 0 }),
    wellKnown: !offline,
    now: () => deps.clock.now(),
  });
  const local = localKeyResolver(deps);
  const remote = createRemoteKeyResolver({ discovery, now: () => deps.clock.now() });
  r = {
    discovery,
    resolveKey: (keyId) => {
      const platform = parseKeyId(keyId)?.platform;
      if (platform === primaryDomain(deps)) return local(keyId);
      // The keys of a platform the allow/deny lists exclude are never fetched: its signatures are `unknown_key`.
      if (platform !== undefined && !isDomainAllowed(deps.config, platform)) return Promise.resolve(null);
      return remote(keyId);
    },
    replay: pgReplayStore(deps.db, () => deps.clock.now()),
  };
  runtimes.set(deps.db, r);
  return r;
}

/** `discoverPlatform(domain)` of this platform: a static route, DNS, or the well-known document (see discovery.ts). */
export function discoverPlatform(deps: Deps, domain: string) {
  return federationOf(deps).discovery.discover(domain);
}

const domainOf = (address: string) => address.slice(address.lastIndexOf('@') + 1).toLowerCase();

/**
 * The origin rule for actions: the signing platform must be the platform of the actor's
 * domain — the same name, or a domain whose discovered platform is the signer (same name in
 * its well-known document, or the same base URL as the signer). An actor whose domain has no
 * platform (an email participant) may be bridged by any platform for now; leader
 * sequencing will restrict that to the platform that received the email (docs/federation.md).
 * With `self`, an actor of one of this platform's own domains must have been signed by it.
 */
export function actorOriginCheck(discovery: Discovery, self?: { platform: string; domains: readonly string[] }): OriginCheck {
  return async (action: Action & ActionInput, platform: string) => {
    const domain = domainOf(action.actor);
    if (domain === platform) return null;
    // Our own users act only through us.
    if (self && self.domains.includes(domain)) return platform === self.platform ? null : `${action.actor} is a user of ${self.platform}, not of ${platform}`;
    let actorRef;
    try {
      actorRef = await discovery.discover(domain);
    } catch (e) {
      if (e instanceof DiscoveryUnavailable) return `cannot tell which platform serves ${domain} now`;
      throw e;
    }
    if (!actorRef) return null; // an email participant, bridged
    if (actorRef.platform === platform) return null;
    const signerRef = await discovery.discover(platform).catch(() => null);
    if (signerRef && signerRef.url === actorRef.url) return null;
    return `${action.actor} is not a user of ${platform}`;
  };
}

/** {@link verifyLog} with this platform's key resolver and the actor origin rule. */
export function verifyReceivedLog(deps: Deps, actions: Action[], opts: Omit<VerifyLogOptions, 'origin'> = {}): Promise<LogCheck> {
  const fed = federationOf(deps);
  return verifyLog(actions, fed.resolveKey, {
    ...opts,
    origin: actorOriginCheck(fed.discovery, { platform: primaryDomain(deps), domains: deps.config.domains }),
  });
}
