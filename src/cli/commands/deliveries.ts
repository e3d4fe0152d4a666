import type { Command } from 'commander';
import type { DeliveryInfo, RetryFrom } from '../../delivery/dead-letters.ts';
import { badRequest, notFound } from '../../platform/errors.ts';
import type { Deps } from '../../context.ts';
import { withDeps } from '../context.ts';

/** The implementation, loaded when a command runs (src/cli/context.ts). */
const deadLetters = () => import('../../delivery/dead-letters.ts');

async function orgIdOf(deps: Deps, slug: string | undefined): Promise<number | null> {
  if (!slug) return null;
  const o = await deps.db.kysely.selectFrom('organisations').select('id').where('slug', '=', slug).executeTakeFirst();
  if (!o) throw notFound(`organisation ${slug}`);
  return o.id;
}

function line(d: DeliveryInfo): string {
  const chain = d.chain ? `[${d.chain.map((p, i) => (i === d.chain_index ? `*${p}` : p)).join(',')}]` : d.plugin;
  return [d.id, d.state, chain, d.destination || '-', d.updated_at, d.last_error ?? ''].join('  ');
}

/**
 * `parley deliveries failed [--org <slug>] [--limit <n>] [--json]`, `parley deliveries retry <id>
 * [--first-step] [--org <slug>]`, `parley deliveries cancel <id> [--org <slug>]` — the dead
 * letters (issue 4 §3), as the operator sees them: same rules as the API (docs/delivery.md).
 * Errors (unknown delivery, not failed, not cancellable) are AppErrors: main.ts prints them and exits 2.
 */
export function registerDeliveries(program: Command): void {
  const cmd = program.command('deliveries').description('dead letters of the delivery engine: list, retry, cancel');

  cmd
    .command('failed')
    .description('list deliveries that failed at the last step of their servicechain, newest first')
    .option('--org <slug>', 'only this organisation')
    .option('--limit <n>', 'at most this many (1-10000)', '100')
    .option('--json', 'print JSON lines (one delivery per line)', false)
    .action(async (opts: { org?: string; limit: string; json: boolean }, c: Command) => {
      const limit = Number(opts.limit);
      if (!Number.isInteger(limit) || limit < 1 || limit > 10_000) throw badRequest('invalid_limit', '--limit is a whole number from 1 to 10000');
      const items = await withDeps(c, async (deps) => {
        const orgId = await orgIdOf(deps, opts.org);
        const all: DeliveryInfo[] = [];
        let cursor: string | undefined;
        while (all.length < limit) {
          const page = await (await deadLetters()).listFailed(deps, { orgId, cursor, limit: Math.min(500, limit - all.length) });
          all.push(...page.items);
          if (!page.next_cursor) break;
          cursor = page.next_cursor;
        }
        return all;
      });
      if (opts.json) for (const d of items) console.log(JSON.stringify(d));
      else if (items.length === 0) console.log('no failed deliveries');
      else {
        console.log('id  state  chain (*current)  destination  failed at  last error');
        for (const d of items) console.log(line(d));
      }
    });

  cmd
    .command('retry <id>')
    .description('put a failed delivery back to pending: at the step that failed last, or with --first-step at the first step of its chain')
    .option('--first-step', 'start again at the first step of the servicechain', false)
    .option('--org <slug>', 'the delivery must belong to this organisation')
    .action(async (id: string, opts: { firstStep: boolean; org?: string }, c: Command) => {
      const from: RetryFrom = opts.firstStep ? 'first_step' : 'failed_step';
      const d = await withDeps(c, async (deps) => (await deadLetters()).retryDelivery(deps, id, { orgId: await orgIdOf(deps, opts.org), from, by: 'cli' }));
      console.log(`delivery ${d.id} is pending again at ${d.plugin} (step ${d.chain_index + 1}${d.chain ? ` of ${d.chain.length}` : ''})`);
    });

  cmd
    .command('cancel <id>')
    .description('cancel a pending, in-flight or failed delivery')
    .option('--org <slug>', 'the delivery must belong to this organisation')
    .action(async (id: string, opts: { org?: string }, c: Command) => {
      const d = await withDeps(c, async (deps) => (await deadLetters()).cancelDelivery(deps, id, { orgId: await orgIdOf(deps, opts.org), by: 'cli' }));
      console.log(`delivery ${d.id} cancelled`);
    });
}
