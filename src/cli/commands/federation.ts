import type { Command } from 'commander';
import { badRequest } from '../../platform/errors.ts';
import type { PlatformKey } from '../../federation/keys.ts';
import { withDeps } from '../context.ts';

/** The implementation, loaded when a command runs (src/cli/context.ts). */
const keyStore = () => import('../../federation/keys.ts');

const DAY_MS = 24 * 3600 * 1000;

function line(k: PlatformKey): string {
  const state = k.retiredAt === null ? 'active' : `retired ${k.retiredAt.toISOString()}`;
  return `${k.keyId}  ${state}  created ${k.createdAt.toISOString()}  valid until ${k.notAfter.toISOString()}  ${k.publicKey}`;
}

/**
 * `parley federation rotate-key [--old-valid-for <days>]` and `parley federation keys` —
 * the platform identity (issue 3 §1; docs/federation.md, "Key publication and rotation").
 * rotate-key makes a new active signing key; the old one verifies until its stated expiry,
 * or for only `--old-valid-for` more days (0 for a compromised key). Invalid options are
 * AppErrors: main.ts prints them and exits 2.
 */
export function registerFederation(program: Command): void {
  const cmd = program.command('federation').description("the platform's federation identity: signing keys");

  cmd
    .command('rotate-key')
    .description('create a new active signing key; the old one stays valid for verification until its expiry')
    .option('--old-valid-for <days>', 'shorten the old key\'s validity to this many days from now (0 if it was compromised)')
    .action(async (opts: { oldValidFor?: string }, c: Command) => {
      let oldValidForMs: number | undefined;
      if (opts.oldValidFor !== undefined) {
        const days = Number(opts.oldValidFor);
        if (opts.oldValidFor.trim() === '' || !Number.isFinite(days) || days < 0) throw badRequest('invalid_days', '--old-valid-for is a number of days ≥ 0');
        oldValidForMs = days * DAY_MS;
      }
      const r = await withDeps(c, async (deps) => (await keyStore()).rotateKey(deps, { oldValidForMs }));
      console.log(`active key ${r.active.keyId} (valid until ${r.active.notAfter.toISOString()})`);
      if (r.retired) console.log(`retired key ${r.retired.keyId} verifies until ${r.retired.notAfter.toISOString()}`);
    });

  cmd
    .command('keys')
    .description("list the platform's signing keys, newest first")
    .action(async (_opts: unknown, c: Command) => {
      const keys = await withDeps(c, async (deps) => (await keyStore()).listKeys(deps));
      if (keys.length === 0) console.log('no keys yet: one is created at first start');
      for (const k of keys) console.log(line(k));
    });
}
