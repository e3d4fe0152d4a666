import type { Command } from 'commander';
import type { UserInfo } from '../../accounts/users.ts';
import { badRequest } from '../../platform/errors.ts';
import { withDeps } from '../context.ts';

/**
 * Reads one line from stdin (up to the first newline or the end of input) and strips the line
 * ending (`\n` or `\r\n`). Used by `--password-stdin`, so a password never appears in the
 * process list or the shell history.
 * @throws AppError 400 `no_password` when stdin is empty
 */
export async function readLineFromStdin(stdin: NodeJS.ReadStream = process.stdin): Promise<string> {
  if (stdin.isTTY) process.stderr.write('password (one line; it is shown as you type): ');
  const line = await new Promise<string>((resolve, reject) => {
    const chunks: Buffer[] = [];
    const done = () => {
      stdin.off('data', onData).off('end', done).off('error', reject);
      stdin.pause();
      if (!stdin.isTTY) stdin.destroy();
      const text = Buffer.concat(chunks).toString('utf8');
      const nl = text.indexOf('\n');
      resolve(nl === -1 ? text : text.slice(0, nl));
    };
    const onData = (c: Buffer) => {
      chunks.push(c);
      if (c.includes(10)) done();
    };
    stdin.on('data', onData).once('end', done).once('error', reject);
    stdin.resume();
  });
  const password = line.endsWith('\r') ? line.slice(0, -1) : line;
  if (password === '') throw badRequest('no_password', '--password-stdin: no password on standard input (give it as one line)');
  return password;
}

/** A plain-text table: a header row, then one row per item, columns padded to their widest cell. */
function table(head: string[], rows: string[][]): string {
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (cells: string[]) => cells.map((c, i) => (i === cells.length - 1 ? c : c.padEnd(widths[i]))).join('  ');
  return [line(head), ...rows.map(line)].join('\n');
}

/**
 * `parley user add <address> [--name <name>] [--admin] [--password-stdin]`,
 * `parley user password <address> [--remove]` and `parley user list [--json]` (issue 2 §1
 * and §3: users are created by the CLI and the admin API; there is no public sign-up; an
 * operator at the machine can always reset a password — the only admin's too). Errors
 * (invalid address, foreign domain, weak password, existing user, no such user) are
 * AppErrors: main.ts prints them and exits 2.
 */
export function registerUser(program: Command): void {
  const user = program.command('user').description('manage the users of this platform');

  user
    .command('add <address>')
    .description(
      'add a user of one of PARLEY_DOMAINS. With --password-stdin the password is read from standard input ' +
        '(one line, the line ending stripped); without it the user has no password and cannot log in until an admin sets one',
    )
    .option('--name <name>', 'full name')
    .option('--admin', 'make the user an administrator (may use the admin API)', false)
    .option('--password-stdin', 'read the password from standard input', false)
    .action(async (address: string, opts: { name?: string; admin: boolean; passwordStdin: boolean }, cmd: Command) => {
      const password = opts.passwordStdin ? await readLineFromStdin() : null;
      const { createUser } = await import('../../accounts/users.ts');
      const u = await withDeps(cmd, (deps) => createUser(deps, { address, name: opts.name, password, isAdmin: opts.admin }));
      console.log(`added ${u.address}${u.is_admin ? ' (admin)' : ''}`);
      if (!u.has_password)
        console.log(
          `${u.address} has no password and cannot log in until one is set: ` +
            `\`parley user password ${u.address}\` (the password on standard input), or an admin's PATCH /api/admin/users/${u.address} with {"password": "…"}`,
        );
    });

  user
    .command('password <address>')
    .description(
      'set (or reset) the password of a user, read from standard input (one line, the line ending stripped); ' +
        'every session of the user ends. With --remove the user has no password and cannot log in',
    )
    .option('--remove', 'remove the password instead of setting one', false)
    .action(async (address: string, opts: { remove: boolean }, cmd: Command) => {
      const password = opts.remove ? null : await readLineFromStdin();
      const { updateUser } = await import('../../accounts/users.ts');
      const u = await withDeps(cmd, (deps) => updateUser(deps, null, address, { password }));
      console.log(`${u.address}: password ${opts.remove ? 'removed' : 'set'}; every session of the user has ended`);
    });

  user
    .command('list')
    .description('list the users in address order')
    .option('--json', 'print a JSON array instead of a table', false)
    .action(async (opts: { json: boolean }, cmd: Command) => {
      const { listUsers } = await import('../../accounts/users.ts');
      const users = await withDeps(cmd, async (deps) => {
        const all: UserInfo[] = [];
        for (let after: string | undefined; ; ) {
          const page = await listUsers(deps, { after, limit: 1000 });
          all.push(...page);
          if (page.length < 1000) return all;
          after = page[page.length - 1].address;
        }
      });
      if (opts.json) {
        console.log(JSON.stringify(users, null, 2));
        return;
      }
      if (users.length === 0) {
        console.log('no users yet: add one with `parley user add <address> --admin --password-stdin`');
        return;
      }
      console.log(
        table(
          ['ADDRESS', 'NAME', 'ADMIN', 'STATUS', 'PASSWORD', 'CREATED'],
          users.map((u) => [u.address, u.name || '-', u.is_admin ? 'yes' : 'no', u.status, u.has_password ? 'set' : 'none', u.created_at]),
        ),
      );
    });
}
