import pino, { type Logger } from 'pino';

/**
 * Structured JSON logs (pino). The level comes from `PARLEY_LOG_LEVEL`
 * (trace|debug|info|warn|error|silent, default info).
 */
export function createLogger(name = 'parley', level = process.env.PARLEY_LOG_LEVEL ?? 'info'): Logger {
  return pino({ name, level, timestamp: pino.stdTimeFunctions.isoTime });
}

export type { Logger };
