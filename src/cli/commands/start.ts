import type { Command } from 'commander';
import type { Role } from '../../app.ts';
import { badRequest } from '../../platform/errors.ts';
import { cliConfig, withDeps } from '../context.ts';

/** The roles (kept in step with src/app.ts ROLES). */
const ROLES = ['web', 'worker', 'smtp'] as const;

/** `parley start [--roles web,worker,smtp]` and `parley migrate`. */
export function registerStart(program: Command): void {
  program
    .command('start')
    .description('start the platform (all roles by default) on DATABASE_URL or the embedded PostgreSQL')
    .option('--roles <roles>', `comma-separated roles: ${ROLES.join(',')}`, ROLES.join(','))
    .action(async (opts: { roles: string }, cmd: Command) => {
      const roles = opts.roles.split(',').map((r) => r.trim()).filter(Boolean);
      const bad = roles.filter((r) => !(ROLES as readonly string[]).includes(r));
      if (bad.length) throw badRequest('invalid_option', `unknown role(s) ${bad.join(', ')}; roles are ${ROLES.join(', ')}`);
      const config = await cliConfig(cmd);
      // Loaded here, not at the top: other commands need not load the whole server.
      const [{ createLogger }, { startPlatform }] = await Promise.all([import('../../platform/logger.ts'), import('../../app.ts')]);
      const log = createLogger('parley', config.logLevel);
      const platform = await startPlatform(config, roles as Role[], { log });
      log.info({ roles, domains: config.domains, http: platform.httpPort, smtp: platform.smtpPort }, 'parley started');
      let stopping = false;
      const stop = async (signal: string) => {
        if (stopping) return;
        stopping = true;
        // First: a Ctrl-C reaches the embedded PostgreSQL as well, whose connections end now.
        platform.deps.db.stopping = true;
        log.info({ signal }, 'stopping');
        await platform.stop();
        process.exit(0);
      };
      process.on('SIGINT', () => void stop('SIGINT'));
      process.on('SIGTERM', () => void stop('SIGTERM'));
      // kill -HUP: read the configuration again (environment and config file) and apply what
      // may change while running; an invalid configuration changes nothing (docs/operations.md).
      process.on('SIGHUP', () => {
        void (async () => {
          const { applyReload } = await import('../../platform/config.ts');
          let fresh: typeof config;
          try {
            fresh = await cliConfig(cmd);
          } catch (e) {
            log.error({ err: (e as Error).message }, 'configuration not reloaded: it is invalid; the running one stays');
            return;
          }
          const { applied, needRestart } = applyReload(platform.deps.config, fresh);
          log.info({ applied }, 'configuration reloaded');
          if (needRestart.length > 0) log.warn({ settings: needRestart }, 'configuration reloaded: these changed settings apply only after a restart');
        })();
      });
    });

  program
    .command('migrate')
    .description('apply database migrations and exit')
    .action(async (_opts, cmd: Command) => {
      await withDeps(cmd, async () => {
        console.log('database is up to date');
      });
    });
}
