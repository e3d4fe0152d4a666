/**
 * The federation HTTP surface (issue 3 §1–2; docs/federation.md):
 *
 * - `GET /.well-known/parley/keys` — the platform's public keys with their validity;
 * - `GET /.well-known/parley/platform` — the discovery document `{platform, url, keys_url}`;
 * - `/federation/v1/*` — platform-to-platform endpoints (replication: replication-routes.ts). Every one requires a signed request
 *   (`requirePlatform`), verified against the raw body bytes before the body is parsed:
 *   in this scope `application/json` bodies arrive as Buffers and handlers read them with
 *   `verifiedJson`. `GET /federation/v1/ping` answers who the caller was verified to be.
 */
import type { FastifyInstance, FastifyRequest } from 'fastify';
import { type Deps, primaryDomain } from '../context.ts';
import { badRequest } from '../platform/errors.ts';
import { type VerifiedPeer, verifyRequest } from './http-signatures.ts';
import { keysDocument, platformDocument } from './keys.ts';
import { federationOf } from './runtime.ts';
import { replicationRoutes } from './replication-routes.ts';
import { federationAbuseHooks } from './abuse.ts';
import { blobRoutes } from './blobs.ts';

declare module 'fastify' {
  interface FastifyRequest {
    /** Set by `requirePlatform` on federation routes: the verified calling platform. */
    peer: VerifiedPeer | null;
  }
}

const err = { $ref: 'Error#' };
const rejections = {
  401: {
    ...err,
    description:
      'The request signature was refused; error.code is missing_signature, bad_signature_input, clock_skew, digest_mismatch, unknown_key, bad_signature or replayed (docs/federation.md).',
  },
};

/**
 * The `@target-uri` of a request as this platform received it: `<scheme>://<Host><path?query>`.
 * The scheme is https when the connection is TLS, when a trusted proxy says so
 * (PARLEY_TRUST_PROXY and X-Forwarded-Proto), or when the platform's public base URL
 * (PARLEY_BASE_URL) is https — a TLS-terminating proxy in front of it; else http.
 */
export function targetUri(req: FastifyRequest, deps: Deps): string {
  const scheme = req.protocol === 'https' || deps.config.baseUrl.startsWith('https://') ? 'https' : 'http';
  return `${scheme}://${req.host}${req.url}`;
}

/**
 * A preHandler for federation routes: verifies the request signature (federation/
 * http-signatures.ts verifyRequest, against the raw body) and sets `req.peer`.
 * @throws AppError 401 with the reason's code
 */
export function requirePlatform(deps: Deps) {
  return async (req: FastifyRequest) => {
    const fed = federationOf(deps);
    const body = Buffer.isBuffer(req.body) ? req.body : Buffer.alloc(0);
    req.peer = await verifyRequest({ method: req.method, url: targetUri(req, deps), headers: req.headers, body }, fed.resolveKey, deps.clock.now(), fed.replay);
  };
}

/**
 * The JSON body of a verified federation request (after `requirePlatform`).
 * @throws AppError 400 invalid_json when the bytes are not JSON
 */
export function verifiedJson<T = unknown>(req: FastifyRequest): T {
  const raw = Buffer.isBuffer(req.body) ? req.body : Buffer.alloc(0);
  try {
    return JSON.parse(raw.toString('utf8')) as T;
  } catch (e) {
    throw badRequest('invalid_json', `the body is not valid JSON: ${(e as Error).message}`);
  }
}

const KeysResponse = {
  type: 'object',
  properties: {
    platform: { type: 'string' },
    keys: {
      type: 'array',
      items: {
        type: 'object',
        properties: {
          key_id: { type: 'string', description: '<platform>#<key id>' },
          alg: { type: 'string', enum: ['ed25519'] },
          public_key: { type: 'string', description: 'raw 32-byte Ed25519 public key, base64url without padding' },
          created_at: { type: 'string', format: 'date-time' },
          not_after: { type: 'string', format: 'date-time' },
          active: { type: 'boolean' },
        },
        required: ['key_id', 'alg', 'public_key', 'created_at', 'not_after', 'active'],
      },
    },
  },
  required: ['platform', 'keys'],
} as const;

/** Federation routes (registered by src/http/routes.ts). */
export async function federationRoutes(app: FastifyInstance, deps: Deps): Promise<void> {
  app.get('/.well-known/parley/keys', {
    schema: {
      tags: ['federation'],
      summary: "The platform's Ed25519 public keys with their validity (every key it ever had; the active one signs now)",
      response: { 200: KeysResponse },
    },
  }, async (_req, reply) => {
    reply.header('cache-control', 'public, max-age=300');
    return keysDocument(deps);
  });

  app.get('/.well-known/parley/platform', {
    schema: {
      tags: ['federation'],
      summary: 'Discovery document: the platform name (primary domain), its base URL and keys URL',
      response: {
        200: {
          type: 'object',
          properties: { platform: { type: 'string' }, url: { type: 'string' }, keys_url: { type: 'string' } },
          required: ['platform', 'url', 'keys_url'],
        },
      },
    },
  }, async (_req, reply) => {
    reply.header('cache-control', 'public, max-age=300');
    return platformDocument(deps);
  });

  await app.register(async (scope) => {
    scope.decorateRequest('peer', null);
    // Verify before parsing: JSON bodies stay raw bytes until the signature checks out.
    scope.removeContentTypeParser('application/json');
    scope.addContentTypeParser('application/json', { parseAs: 'buffer' }, (_req, body, done) => done(null, body));
    // Federation bodies may be larger than the client API's: every route of this scope gets
    // its own body limit, which the server's 413 quotes (req.routeOptions.bodyLimit).
    scope.addHook('onRoute', (route) => {
      route.bodyLimit ??= deps.config.federationMaxBodyBytes;
    });
    federationAbuseHooks(scope, deps); // allow/deny lists, rate limit per platform, body size (abuse.ts)
    const auth = requirePlatform(deps);
    await blobRoutes(scope, deps, auth); // GET /federation/v1/blobs/{sha256} (blobs.ts)

    scope.get('/ping', {
      preHandler: auth,
      schema: {
        tags: ['federation'],
        summary: 'Signed-request check: answers this platform and the verified calling platform',
        response: {
          200: { type: 'object', properties: { platform: { type: 'string' }, peer: { type: 'string' }, keyid: { type: 'string' } }, required: ['platform', 'peer', 'keyid'] },
          ...rejections,
        },
      },
    }, async (req) => ({ platform: primaryDomain(deps), peer: req.peer!.platform, keyid: req.peer!.keyId }));

    scope.post('/ping', {
      preHandler: auth,
      schema: {
        tags: ['federation'],
        summary: 'Signed-request check with a JSON body: echoes the body, verified against its Content-Digest',
        response: { 200: { type: 'object', additionalProperties: true }, 400: err, ...rejections },
      },
    }, async (req) => ({ platform: primaryDomain(deps), peer: req.peer!.platform, keyid: req.peer!.keyId, body: verifiedJson(req) }));

    await replicationRoutes(scope, deps, auth);
  }, { prefix: '/federation/v1' });
}
