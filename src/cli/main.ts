import { Command } from 'commander';
import { AppError } from '../platform/errors.ts';
import { registerStart } from './commands/start.ts';
import { registerUser } from './commands/user.ts';
import { registerImport } from './commands/import.ts';
import { registerDeliveries } from './commands/deliveries.ts';
import { registerFederation } from './commands/federation.ts';

/**
 * The `parley` command line (issue 2): start, migrate, user add|list, import.
 * Every command reads the same configuration as the server (docs/operations.md).
 */
const program = new Command('parley')
  .description('Parley — a federated conversation platform: email rebuilt around conversations')
  .option('-c, --config <file>', 'JSON config file (else PARLEY_CONFIG)')
  .showHelpAfterError();

registerStart(program);
registerUser(program);
registerImport(program);
registerDeliveries(program);
registerFederation(program);

try {
  await program.parseAsync(process.argv);
} catch (e) {
  // config.ts is loaded only by commands that read the configuration.
  const { ConfigError } = await import('../platform/config.ts');
  if (e instanceof ConfigError || e instanceof AppError) {
    console.error(`parley: ${e.message}`);
    process.exit(2);
  }
  console.error(`parley: ${(e as Error).stack ?? e}`);
  process.exit(1);
}
