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
import { type LogCheck, type OriginCheck, type OriginContext, type VerifyLogOptions, preverifySignatures, verifyLog } from './action-signatures.ts';
import type { ConversationState } from '../core/reducer.ts';

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

/** Do the platform names `a` and `b` name the same platform (equal, or the same discovered base URL)? */
async function sameRef(discovery: Discovery, a: string, b: string): Promise<boolean> {
  if (a === b) return true;
  const [ra, rb] = await Promise.all([discovery.discover(a).catch(() => null), discovery.discover(b).catch(() => null)]);
  return !!ra && !!rb && ra.url === rb.url;
}

/**
 * Is `platform` the platform of one of the conversation's **active** participants in `state`
 * (a participant whose domain is its name, or whose discovered platform is it)?
 */
async function hasActiveUserOn(discovery: Discovery, state: ConversationState, platform: string): Promise<boolean> {
  const domains = new Set<string>();
  for (const p of state.participants.values()) if (p.removed_id === null) domains.add(domainOf(p.address));
  if (domains.has(platform)) return true;
  const signer = await discovery.discover(platform).catch(() => null);
  for (const d of domains) {
    const ref = await discovery.discover(d).catch(() => null);
    if (ref && (ref.platform === platform || (signer && ref.url === signer.url))) return true;
  }
  return false;
}

/**
 * The origin rule for actions (docs/federation.md, "Who may sign an action"): the signing
 * platform must be the platform of the actor's domain — the same name, or a domain whose
 * discovered platform is the signer (same name in its well-known document, or the same base
 * URL as the signer). With `self`, an actor of one of this platform's own domains must have
 * been signed by it.
 *
 * An actor whose domain has no platform (an **email participant**, issue 3 §8) acts only
 * through the platform that received their email: the conversation's **leader** (`ctx.leader`:
 * replies to the mail it sends, and conversations started by an email it received), or a
 * platform with an **active participant** in the conversation just before the action (an
 * email reaches a platform only through one of its users, and is threaded only into a
 * conversation that user takes part in; that follower proposes it to the leader). Any other
 * signer is refused. Without `ctx` (a pre-check with no state) an email participant's action
 * is left to verifyLog's check.
 */
export function actorOriginCheck(discovery: Discovery, self?: { platform: string; domains: readonly string[] }): OriginCheck {
  return async (action: Action & ActionInput, platform: string, ctx?: OriginContext) => {
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
    if (!actorRef) {
      // An email participant: bridged by the leader or by a platform with a user in the conversation.
      if (!ctx) return null;
      if (ctx.leader !== null && (await sameRef(discovery, ctx.leader, platform))) return null;
      if (await hasActiveUserOn(discovery, ctx.state, platform)) return null;
      return `${action.actor} is an email participant; only the leader${ctx.leader ? ` (${ctx.leader})` : ''} or a platform with a user in the conversation bridges their email, not ${platform}`;
    }
    if (actorRef.platform === platform) return null;
    const signerRef = await discovery.discover(platform).catch(() => null);
    if (signerRef && signerRef.url === actorRef.url) return null;
    return `${action.actor} is not a user of ${platform}`;
  };
}

/**
 * {@link verifyLog} with this platform's key resolver and the actor origin rule. Give
 * `leader` (the conversation's recorded leader) with `from`, for the email participant rule.
 */
export function verifyReceivedLog(deps: Deps, actions: Action[], opts: Omit<VerifyLogOptions, 'origin'> = {}): Promise<LogCheck> {
  const fed = federationOf(deps);
  return verifyLog(actions, fed.resolveKey, {
    ...opts,
    origin: actorOriginCheck(fed.discovery, { platform: primaryDomain(deps), domains: deps.config.domains }),
  });
}

/**
 * Verifies the action signatures of a received batch ahead of {@link verifyReceivedLog}
 * (action-signatures.ts preverifySignatures): the Ed25519 work is done before the batch's
 * transaction, overlapping the storing of an earlier batch. Never throws.
 */
export function preverifyReceived(deps: Deps, actions: readonly Action[]): Promise<void> {
  return preverifySignatures(actions, federationOf(deps).resolveKey);
}
