import type { Config } from './platform/config.ts';
import type { Logger } from './platform/logger.ts';
import type { Clock } from './platform/clock.ts';
import type { BlobStore } from './platform/blobs.ts';
import type { Db } from './store/db.ts';

/**
 * The dependencies every command receives (ARCHITECTURE.md: "commands get their
 * dependencies passed in"), so a command runs in a test against a real database without HTTP.
 */
export interface Deps {
  db: Db;
  config: Config;
  log: Logger;
  clock: Clock;
  blobs: BlobStore;
}

/** Is `address` served by this platform (its domain is one of PARLEY_DOMAINS)? */
export function isLocalAddress(deps: Pick<Deps, 'config'>, address: string): boolean {
  const at = address.lastIndexOf('@');
  return at > 0 && deps.config.domains.includes(address.slice(at + 1).toLowerCase());
}

/** The platform's primary domain: leader name of the conversations it creates, Message-ID domain. */
export function primaryDomain(deps: Pick<Deps, 'config'>): string {
  return deps.config.domains[0];
}
