import { existsSync, readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { Type, type Static } from '@sinclair/typebox';
import { Value } from '@sinclair/typebox/value';

/**
 * Platform configuration: environment variables override an optional JSON config file
 * (`PARLEY_CONFIG` or `--config`), which overrides the defaults below. Validated at start;
 * an invalid value stops the process with a message naming the variable.
 * Documented in docs/operations.md.
 */
export const ConfigSchema = Type.Object(
  {
    /** Mail domains this platform serves (PARLEY_DOMAINS, comma-separated). */
    domains: Type.Array(Type.String({ pattern: '^[a-z0-9.-]+$' }), { minItems: 1 }),
    /** HTTP listen host and port (PARLEY_HTTP_HOST, PARLEY_HTTP_PORT). */
    httpHost: Type.String(),
    httpPort: Type.Integer({ minimum: 0, maximum: 65535 }),
    /** Inbound SMTP listen host and port (PARLEY_SMTP_HOST, PARLEY_SMTP_PORT). */
    smtpHost: Type.String(),
    smtpPort: Type.Integer({ minimum: 0, maximum: 65535 }),
    /** PostgreSQL connection URI (DATABASE_URL; `postgres://` or `postgresql://`); empty → the embedded PostgreSQL under dataDir/pg. */
    databaseUrl: Type.String({ pattern: '^(|postgres(ql)?://.*)$' }),
    /** Port of the embedded PostgreSQL (PARLEY_EMBEDDED_PG_PORT). */
    embeddedPgPort: Type.Integer({ minimum: 1, maximum: 65535 }),
    /** Data directory: blobs, raw mail, embedded database (PARLEY_DATA_DIR). */
    dataDir: Type.String({ minLength: 1 }),
    /** Outbound SMTP relay URL (PARLEY_RELAY_URL), e.g. smtp://127.0.0.1:25; empty → mail waits. */
    relayUrl: Type.String(),
    /** Public base URL of the platform (PARLEY_BASE_URL). */
    baseUrl: Type.String({ pattern: '^https?://' }),
    /** Largest inbound email in bytes (PARLEY_MAX_MESSAGE_BYTES). */
    maxMessageBytes: Type.Integer({ minimum: 1024 }),
    /** Largest attachment upload in bytes (PARLEY_MAX_ATTACHMENT_BYTES). */
    maxAttachmentBytes: Type.Integer({ minimum: 1024 }),
    /** Largest JSON request body in bytes (PARLEY_MAX_BODY_BYTES). */
    maxBodyBytes: Type.Integer({ minimum: 1024 }),
    /** How long an outbound email is retried before it fails, in hours (PARLEY_DELIVERY_MAX_AGE_HOURS). */
    deliveryMaxAgeHours: Type.Number({ minimum: 0.001 }),
    /** Lease of a claimed delivery in ms (PARLEY_DELIVERY_LEASE_MS): a worker killed mid-attempt frees its claims after this. */
    deliveryLeaseMs: Type.Integer({ minimum: 100 }),
    /** Most deliveries a worker claims, and records, in one statement (PARLEY_DELIVERY_BATCH; default 200, docs/delivery.md "Workers"). */
    deliveryBatch: Type.Optional(Type.Integer({ minimum: 1, maximum: 5000 })),
    /** Delivery attempts a worker keeps in flight (PARLEY_DELIVERY_CONCURRENCY; default 64). */
    deliveryConcurrency: Type.Optional(Type.Integer({ minimum: 1, maximum: 5000 })),
    /** DNS timeout for SPF/DKIM/DMARC lookups in ms (PARLEY_DNS_TIMEOUT_MS). */
    dnsTimeoutMs: Type.Integer({ minimum: 50 }),
    /** Skip DNS entirely (PARLEY_DNS_OFFLINE=1): mail authentication results become "none". */
    dnsOffline: Type.Boolean(),
    /** Session lifetime in days (PARLEY_SESSION_DAYS). */
    sessionDays: Type.Number({ minimum: 0.01 }),
    /** Trust X-Forwarded-For from a reverse proxy (PARLEY_TRUST_PROXY): only behind one. */
    trustProxy: Type.Boolean(),
    /**
     * Static federation routes, mail domain → platform base URL (PARLEY_FEDERATION_ROUTES as
     * `domain=https://host:port,domain2=…`, or a JSON object in the config file). They win over
     * DNS and the well-known document (docs/federation.md, "Discovery").
     */
    federationRoutes: Type.Record(Type.String({ pattern: '^[a-z0-9.-]+$' }), Type.String({ pattern: '^https?://[^\\s]+$' })),
    /**
     * Abuse controls (issue 3 §9; src/federation/abuse.ts): platforms allowed to call this one
     * (PARLEY_FEDERATION_ALLOW, comma-separated domains, `*.example.com` for subdomains; empty →
     * every platform not denied) and refused (PARLEY_FEDERATION_DENY; wins over allow).
     */
    federationAllow: Type.Array(Type.String({ pattern: '^(\\*\\.)?[a-z0-9.-]+$' })),
    federationDeny: Type.Array(Type.String({ pattern: '^(\\*\\.)?[a-z0-9.-]+$' })),
    /** Signed requests per second each remote platform may send (PARLEY_FEDERATION_RATE); 0 → no limit. */
    federationRatePerS: Type.Number({ minimum: 0 }),
    /** Requests a remote platform may send at once above that rate (PARLEY_FEDERATION_BURST). */
    federationBurst: Type.Integer({ minimum: 1 }),
    /** Largest federation request body in bytes (PARLEY_FEDERATION_MAX_BODY_BYTES; 413 beyond). */
    federationMaxBodyBytes: Type.Integer({ minimum: 1024 }),
    /** Log level (PARLEY_LOG_LEVEL). */
    logLevel: Type.Union(['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent'].map((l) => Type.Literal(l))),
  },
  { additionalProperties: false },
);

export type Config = Static<typeof ConfigSchema>;

/** Defaults that work on a laptop. */
export const DEFAULT_CONFIG: Config = {
  domains: ['parley.localhost'],
  httpHost: '127.0.0.1',
  httpPort: 8080,
  smtpHost: '127.0.0.1',
  smtpPort: 2525,
  databaseUrl: '',
  embeddedPgPort: 54329,
  dataDir: './data',
  relayUrl: '',
  baseUrl: 'http://localhost:8080',
  maxMessageBytes: 25 * 1024 * 1024,
  maxAttachmentBytes: 25 * 1024 * 1024,
  maxBodyBytes: 1024 * 1024,
  deliveryMaxAgeHours: 120,
  deliveryLeaseMs: 120_000,
  deliveryBatch: 200,
  deliveryConcurrency: 64,
  dnsTimeoutMs: 1500,
  dnsOffline: false,
  sessionDays: 30,
  trustProxy: false,
  federationRoutes: Object.freeze({}) as Record<string, string>,
  federationAllow: [],
  federationDeny: [],
  federationRatePerS: 200,
  federationBurst: 400,
  federationMaxBodyBytes: 10 * 1024 * 1024,
  logLevel: 'info',
};

const ENV: Record<string, keyof Config> = {
  PARLEY_DOMAINS: 'domains',
  PARLEY_HTTP_HOST: 'httpHost',
  PARLEY_HTTP_PORT: 'httpPort',
  PARLEY_SMTP_HOST: 'smtpHost',
  PARLEY_SMTP_PORT: 'smtpPort',
  DATABASE_URL: 'databaseUrl',
  PARLEY_EMBEDDED_PG_PORT: 'embeddedPgPort',
  PARLEY_DATA_DIR: 'dataDir',
  PARLEY_RELAY_URL: 'relayUrl',
  PARLEY_BASE_URL: 'baseUrl',
  PARLEY_MAX_MESSAGE_BYTES: 'maxMessageBytes',
  PARLEY_MAX_ATTACHMENT_BYTES: 'maxAttachmentBytes',
  PARLEY_MAX_BODY_BYTES: 'maxBodyBytes',
  PARLEY_DELIVERY_MAX_AGE_HOURS: 'deliveryMaxAgeHours',
  PARLEY_DELIVERY_LEASE_MS: 'deliveryLeaseMs',
  PARLEY_DELIVERY_BATCH: 'deliveryBatch',
  PARLEY_DELIVERY_CONCURRENCY: 'deliveryConcurrency',
  PARLEY_DNS_TIMEOUT_MS: 'dnsTimeoutMs',
  PARLEY_DNS_OFFLINE: 'dnsOffline',
  PARLEY_SESSION_DAYS: 'sessionDays',
  PARLEY_TRUST_PROXY: 'trustProxy',
  PARLEY_FEDERATION_ROUTES: 'federationRoutes',
  PARLEY_FEDERATION_ALLOW: 'federationAllow',
  PARLEY_FEDERATION_DENY: 'federationDeny',
  PARLEY_FEDERATION_RATE: 'federationRatePerS',
  PARLEY_FEDERATION_BURST: 'federationBurst',
  PARLEY_FEDERATION_MAX_BODY_BYTES: 'federationMaxBodyBytes',
  PARLEY_LOG_LEVEL: 'logLevel',
};

/** Thrown when the configuration is invalid; the message names every bad setting. */
export class ConfigError extends Error {}

/**
 * What to throw when a configured address cannot be listened on: a port another process
 * holds (EADDRINUSE), one this user may not bind (EACCES: below 1024 without the
 * capability) or a host that is not this machine's (EADDRNOTAVAIL) is a configuration
 * problem — a {@link ConfigError} naming the setting, which `parley` prints as one line (exit
 * status 2). Any other error is returned as it is.
 * @param e the listen error
 * @param setting the environment variable of the port, e.g. `PARLEY_HTTP_PORT`
 */
export function listenError(e: NodeJS.ErrnoException, setting: string, host: string, port: number): Error {
  const at = `${host}:${port}`;
  if (e.code === 'EADDRINUSE') return new ConfigError(`${at} is already in use by another process: stop it, or choose another port with ${setting}`);
  if (e.code === 'EACCES') return new ConfigError(`not allowed to listen on ${at} (ports below 1024 need root or CAP_NET_BIND_SERVICE): choose another port with ${setting}`);
  if (e.code === 'EADDRNOTAVAIL') return new ConfigError(`cannot listen on ${at}: ${host} is not an address of this machine (${setting.replace(/_PORT$/, '_HOST')})`);
  return e;
}

/**
 * Parses PARLEY_FEDERATION_ROUTES: `domain=url` pairs separated by commas, or a JSON object.
 * Domains are lowercased. A malformed pair is kept as-is so validation names it.
 */
export function parseFederationRoutes(raw: string): unknown {
  const text = raw.trim();
  if (text.startsWith('{')) {
    try {
      return JSON.parse(text);
    } catch {
      return text;
    }
  }
  const out: Record<string, string> = {};
  for (const pair of text.split(',').map((p) => p.trim()).filter(Boolean)) {
    const eq = pair.indexOf('=');
    if (eq <= 0) return text;
    out[pair.slice(0, eq).trim().toLowerCase()] = pair.slice(eq + 1).trim();
  }
  return out;
}

/** What a setting must look like, said instead of its schema's regular expression. */
const PATTERN_HINTS: Partial<Record<string, string>> = {
  databaseUrl: 'must be a PostgreSQL URL such as postgres://user:password@127.0.0.1:5432/parley (or unset, for the embedded PostgreSQL)',
};

function coerce(key: keyof Config, raw: string): unknown {
  if (key === 'federationRoutes') return parseFederationRoutes(raw);
  const def = DEFAULT_CONFIG[key];
  if (Array.isArray(def)) return raw.split(',').map((s) => s.trim().toLowerCase()).filter(Boolean);
  if (typeof def === 'number') return raw.trim() === '' ? NaN : Number(raw);
  if (typeof def === 'boolean') return ['1', 'true', 'yes', 'on'].includes(raw.trim().toLowerCase());
  return raw;
}

/**
 * Builds the configuration from defaults, an optional JSON file and the environment.
 * @param env the environment (process.env by default)
 * @param file path of a JSON config file whose keys are Config's keys; PARLEY_CONFIG if omitted
 * @param overrides values that win over everything (tests, CLI flags)
 * @throws ConfigError naming each invalid setting and its source
 */
export function loadConfig(
  env: NodeJS.ProcessEnv = process.env,
  file: string | undefined = env.PARLEY_CONFIG,
  overrides: Partial<Config> = {},
): Config {
  let fromFile: Record<string, unknown> = {};
  if (file) {
    const path = resolve(file);
    if (!existsSync(path)) throw new ConfigError(`config file ${path} does not exist`);
    try {
      fromFile = JSON.parse(readFileSync(path, 'utf8'));
    } catch (e) {
      throw new ConfigError(`config file ${path} is not valid JSON: ${(e as Error).message}`);
    }
  }
  const merged: Record<string, unknown> = { ...DEFAULT_CONFIG, ...fromFile };
  const sourceOf: Record<string, string> = {};
  /** The environment's text of each setting taken from it, for error messages ("abc" rather than NaN's null). */
  const rawOf: Record<string, string> = {};
  for (const k of Object.keys(fromFile)) sourceOf[k] = `config file key "${k}"`;
  for (const [name, key] of Object.entries(ENV)) {
    const raw = env[name];
    if (raw !== undefined && raw !== '') {
      merged[key] = coerce(key, raw);
      sourceOf[key] = `environment variable ${name}`;
      rawOf[key] = raw;
    }
  }
  Object.assign(merged, overrides);
  if (!env.PARLEY_BASE_URL && !fromFile.baseUrl && !overrides.baseUrl) {
    merged.baseUrl = `http://localhost:${merged.httpPort}`;
  }
  const errors = [...Value.Errors(ConfigSchema, merged)];
  if (errors.length > 0) {
    const lines = errors.map((e) => {
      const key = e.path.split('/')[1] ?? e.path;
      const hint = PATTERN_HINTS[key];
      if (hint && typeof e.value === 'string') return `- ${sourceOf[key] ?? `setting "${key}"`}: ${hint} (got ${JSON.stringify(rawOf[key] ?? e.value)})`;
      const got = typeof e.value === 'number' && Number.isNaN(e.value) && rawOf[key] !== undefined ? rawOf[key] : e.value;
      return `- ${sourceOf[key] ?? `setting "${key}"`}: ${e.message} (got ${JSON.stringify(got)})`;
    });
    throw new ConfigError(`invalid configuration:\n${lines.join('\n')}`);
  }
  return merged as Config;
}

/**
 * Settings a running process takes from a new reading of its configuration — `kill -HUP`
 * of a `parley start` process (src/cli/commands/start.ts; docs/operations.md, Configuration,
 * "Reloading"): the federation allow and deny lists and the rate limit per remote
 * platform (issue 3 §9), which an operator changes to shut out or let in a platform without
 * a restart. Every other setting is read at start (ports, database, roles' resources).
 */
export const RELOADABLE_KEYS = ['federationAllow', 'federationDeny', 'federationRatePerS', 'federationBurst'] as const;

/**
 * Copies the {@link RELOADABLE_KEYS} of `fresh` (a configuration just loaded and validated by
 * {@link loadConfig}) into `current`, the object the running process reads them from.
 * @returns the reloadable keys whose value changed (now applied), and the other keys whose
 *   value differs from the running one (not applied: they need a restart)
 */
export function applyReload(current: Config, fresh: Config): { applied: string[]; needRestart: string[] } {
  const same = (a: unknown, b: unknown) => JSON.stringify(a) === JSON.stringify(b);
  const reloadable = new Set<string>(RELOADABLE_KEYS);
  const applied: string[] = [];
  const needRestart: string[] = [];
  const target = current as Record<string, unknown>;
  const source = fresh as Record<string, unknown>;
  for (const key of new Set([...Object.keys(target), ...Object.keys(source)])) {
    if (same(target[key], source[key])) continue;
    if (reloadable.has(key)) {
      target[key] = source[key];
      applied.push(key);
    } else needRestart.push(key);
  }
  return { applied, needRestart };
}
