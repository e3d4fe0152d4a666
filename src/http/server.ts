import { createRequire } from 'node:module';
import type { Server } from 'node:http';
import Fastify, { type FastifyInstance, type FastifyReply, type FastifyRequest, type FastifyServerOptions } from 'fastify';
import cookie from '@fastify/cookie';
import swagger from '@fastify/swagger';
import websocket from '@fastify/websocket';
import { AppError, unauthorized } from '../platform/errors.ts';
import type { Deps } from '../context.ts';
import { type AuthUser, SESSION_COOKIE, resolveSession } from '../accounts/sessions.ts';

declare module 'fastify' {
  interface FastifyRequest {
    /** Set by `requireUser`; null on unauthenticated routes. */
    user: AuthUser | null;
  }
}

/** A route module: registers its routes on the app, given the platform's dependencies. */
export type RouteModule = (app: FastifyInstance, deps: Deps) => Promise<void> | void;

/** The session token of a request: `Authorization: Bearer <token>` or the session cookie. */
export function sessionToken(req: FastifyRequest): string | null {
  const h = req.headers.authorization;
  if (h?.startsWith('Bearer ')) return h.slice(7).trim();
  return req.cookies?.[SESSION_COOKIE] ?? null;
}

/**
 * A preHandler that authenticates the caller (bearer token or session cookie) and sets
 * `req.user`. @throws AppError 401 without a valid, unexpired, unrevoked session
 */
export function requireUser(deps: Deps) {
  return async (req: FastifyRequest) => {
    const token = sessionToken(req);
    const user = token ? await resolveSession(deps, token) : null;
    if (!user) throw unauthorized();
    req.user = user;
  };
}

/** The standard error body schema, referenced by every route's 4xx responses in OpenAPI. */
export const ErrorSchema = {
  $id: 'Error',
  type: 'object',
  properties: {
    error: {
      type: 'object',
      properties: {
        code: { type: 'string' },
        message: { type: 'string' },
        details: { type: 'object', additionalProperties: true },
      },
      required: ['code', 'message'],
    },
  },
  required: ['error'],
} as const;

function errorReply(reply: FastifyReply, e: AppError) {
  if (e.status === 429 && typeof e.details?.retry_after_s === 'number') reply.header('retry-after', String(e.details.retry_after_s));
  return reply.status(e.status).type('application/json').send(e.toJSON());
}

/** A compiled validator or serializer, as Fastify calls it (an ajv validator also carries `errors`). */
type Compiled = ((this: unknown, data: unknown) => unknown) & { errors?: unknown };
/** A Fastify compiler: the route's schema definition → its compiled function. */
type Compiler = (route: unknown) => Compiled;
/** A Fastify compiler builder (`schemaController.compilersFactory`): the shared schemas and options → a compiler. */
type CompilerBuilder = (externalSchemas: unknown, options: unknown) => Compiler;

/**
 * Wraps a Fastify compiler builder so that each route's validator or serializer is compiled
 * when it is first called instead of when the server is built: building compiles every
 * route's schemas with ajv and fast-json-stringify (≈ 0.5 s of a platform's start on the
 * project machine — issue 3, Done means 5: a replica's catch-up counts its start). The
 * compiled function is the one the builder makes, with the same schemas and options: the
 * validation is as strict as before, only later (a schema that cannot compile fails its
 * route's first request with a 500, logged; the route tests catch it).
 */
function lazily(build: CompilerBuilder): CompilerBuilder {
  return (externalSchemas, options) => {
    const compiler = build(externalSchemas, options);
    return (route) => {
      let fn: Compiled | null = null;
      const compile = () => (fn ??= compiler(route));
      const lazy: Compiled = function (this: unknown, data: unknown) {
        const f = compile();
        const out = f.call(this, data);
        // Fastify reads an ajv validator's errors from the function it called.
        lazy.errors = f.errors;
        return out;
      };
      return lazy;
    };
  };
}

// The compilers Fastify uses by default, resolved through fastify's own dependencies.
const fastifyRequire = createRequire(createRequire(import.meta.url).resolve('fastify'));

/**
 * Builds the HTTP surface: JSON client API under /api with its OpenAPI document at
 * /api/openapi.json, strict request validation (unknown fields are errors, not dropped),
 * body limits, and one error mapping: AppError → its status; validation → 400; bad JSON
 * → 400; too large → 413; anything else → 500 with no internals (logged).
 *
 * Route schemas are compiled on first use, not while building. With `opts.server` (a
 * node:http server, possibly already listening:
 * src/app.ts listens before the API is built) Fastify serves through it: the caller passes
 * the requests on with the handler `opts.onHandler` receives, and closes it.
 */
export async function buildServer(deps: Deps, modules: RouteModule[], opts: { server?: Server; onHandler?: (handler: (req: any, res: any) => void) => void } = {}): Promise<FastifyInstance> {
  const { AjvCompiler } = fastifyRequire('@fastify/ajv-compiler') as { AjvCompiler: () => CompilerBuilder };
  const { SerializerSelector } = fastifyRequire('@fastify/fast-json-stringify-compiler') as { SerializerSelector: () => CompilerBuilder };
  const options: FastifyServerOptions = {
    logger: false,
    bodyLimit: deps.config.maxBodyBytes,
    trustProxy: deps.config.trustProxy,
    ajv: { customOptions: { removeAdditional: false, coerceTypes: 'array', useDefaults: true, allErrors: false } },
    schemaController: { compilersFactory: { buildValidator: lazily(AjvCompiler()) as any, buildSerializer: lazily(SerializerSelector()) as any } },
  };
  if (opts.server) {
    const server = opts.server;
    (options as any).serverFactory = (handler: (req: any, res: any) => void) => {
      opts.onHandler?.(handler);
      return server;
    };
  }
  const app = Fastify(options);
  app.decorateRequest('user', null);
  app.addSchema(ErrorSchema);
  await app.register(cookie);
  await app.register(websocket, { options: { maxPayload: deps.config.maxBodyBytes } });
  await app.register(swagger, {
    openapi: {
      openapi: '3.0.3',
      info: {
        title: 'Parley client API',
        version: '1',
        description:
          'JSON over HTTP. Authenticate with POST /api/login, then send `Authorization: Bearer <token>` or the `parley_session` cookie. ' +
          'Errors are `{"error": {"code", "message", "details"}}` with a 4xx status. Times are UTC ISO 8601 with milliseconds.',
      },
      components: { securitySchemes: { bearer: { type: 'http', scheme: 'bearer' }, cookie: { type: 'apiKey', in: 'cookie', name: SESSION_COOKIE } } },
    },
    refResolver: { buildLocalReference: (json, _base, _frag, i) => (json.$id as string) ?? `def-${i}` },
  });

  app.setErrorHandler((err: any, req, reply) => {
    if (err instanceof AppError) return errorReply(reply, err);
    if (err.validation) {
      return errorReply(
        reply,
        new AppError(400, 'invalid_request', `${err.validationContext ?? 'request'} ${err.validation[0]?.instancePath ?? ''} ${err.validation[0]?.message ?? 'is invalid'}`.replace(/\s+/g, ' ').trim(), {
          errors: err.validation.map((v: any) => ({ path: v.instancePath, message: v.message, params: v.params })),
        }),
      );
    }
    if (err.code === 'FST_ERR_CTP_INVALID_JSON_BODY' || err instanceof SyntaxError || err.code === 'FST_ERR_CTP_EMPTY_JSON_BODY')
      return errorReply(reply, new AppError(400, 'invalid_json', `the body is not valid JSON: ${err.message}`));
    if (err.code === 'FST_ERR_CTP_BODY_TOO_LARGE') {
      // The route's own limit when it has one (federation routes: src/federation/routes.ts).
      const max = req.routeOptions.bodyLimit ?? deps.config.maxBodyBytes;
      return errorReply(reply, new AppError(413, 'too_large', `the body is larger than ${max} bytes`, { max_bytes: max }));
    }
    if (err.code === 'FST_ERR_CTP_INVALID_MEDIA_TYPE')
      return errorReply(reply, new AppError(415, 'unsupported_media_type', err.message));
    if (typeof err.statusCode === 'number' && err.statusCode >= 400 && err.statusCode < 500)
      return errorReply(reply, new AppError(err.statusCode, 'bad_request', err.message));
    deps.log.error({ err, url: req.url, method: req.method }, 'request failed');
    return errorReply(reply, new AppError(500, 'internal', 'internal error'));
  });
  app.setNotFoundHandler((req, reply) =>
    errorReply(reply, new AppError(404, 'not_found', `no route ${req.method} ${req.url.split('?')[0]}`)),
  );

  for (const m of modules) await m(app, deps);

  app.get('/api/openapi.json', { schema: { hide: true } }, async () => app.swagger());
  app.get('/health', { schema: { hide: true } }, async () => {
    await deps.db.pool.query('select 1');
    return { ok: true };
  });
  return app;
}
