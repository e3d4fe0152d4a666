/**
 * The web role's port, open before the API is built (issue 3, Done means 5: a replica
 * restarting after an outage asks its leaders for what it missed at once, and a leader
 * verifies that request with this platform's public keys — fetched from
 * `GET /.well-known/parley/keys` here). Building the Fastify server loads and registers
 * every route module; until it is ready this server answers the two public, unauthenticated
 * well-known documents of docs/federation.md ("Key publication", "Discovery") itself —
 * the same bytes the API serves — and **holds every other request and websocket upgrade**
 * until the API takes them over ({@link EarlyServer.handOver}); nothing else is answered
 * early, so every API route is validated and authenticated as always.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { Duplex } from 'node:stream';
import type { Deps } from '../context.ts';
import { keysDocument, platformDocument } from '../federation/keys.ts';
import { listenError } from '../platform/config.ts';

/** Fastify's defaults for its own server (src/http/server.ts builds on this one). */
const KEEP_ALIVE_TIMEOUT_MS = 72_000;
/** How long closing waits for requests under way before cutting their connections, ms. */
const CLOSE_GRACE_MS = 10_000;

/** A listening node:http server whose requests go to the API once it is built. */
export interface EarlyServer {
  server: Server;
  /** The bound port. */
  port: number;
  /** Requests and upgrades held now. */
  held(): number;
  /** From now on every request goes to `handler`; the held ones first, in arrival order. */
  handOver(handler: (req: IncomingMessage, res: ServerResponse) => void): void;
  /** Answers the held requests 503 (the API could not be built) and closes the server. */
  abort(): Promise<void>;
  /** Closes the server and every connection (after the API closed). */
  close(): Promise<void>;
}

/**
 * Listens on `host`:`port` (0: any free port) at once, serving the keys and discovery
 * documents and holding everything else until {@link EarlyServer.handOver}.
 * @throws Error when the port cannot be bound
 */
export async function listenEarly(deps: Deps, host: string, port: number): Promise<EarlyServer> {
  const server = createServer();
  server.keepAliveTimeout = KEEP_ALIVE_TIMEOUT_MS;
  let handler: ((req: IncomingMessage, res: ServerResponse) => void) | null = null;
  const held: [IncomingMessage, ServerResponse][] = [];
  const heldUpgrades: [IncomingMessage, Duplex, Buffer][] = [];
  const json = (res: ServerResponse, status: number, body: unknown, cache: boolean) => {
    res.statusCode = status;
    res.setHeader('content-type', 'application/json; charset=utf-8');
    if (cache) res.setHeader('cache-control', 'public, max-age=300');
    res.end(JSON.stringify(body));
  };
  const onRequest = (req: IncomingMessage, res: ServerResponse) => {
    if (handler) return handler(req, res);
    if (req.method === 'GET' && req.url === '/.well-known/parley/keys') {
      keysDocument(deps).then(
        (doc) => json(res, 200, doc, true),
        (err) => {
          deps.log.error({ err }, 'keys document failed');
          json(res, 500, { error: { code: 'internal', message: 'internal error' } }, false);
        },
      );
      return;
    }
    if (req.method === 'GET' && req.url === '/.well-known/parley/platform') return json(res, 200, platformDocument(deps), true);
    held.push([req, res]);
  };
  server.on('request', onRequest);
  // Upgrades are held before any listener sees them: the API's websocket plugin listens to
  // 'upgrade' on this server from its registration on, before the API is ready.
  const emit = server.emit;
  server.emit = function (this: Server, event: string | symbol, ...args: any[]) {
    if (event === 'upgrade' && !handler) {
      heldUpgrades.push(args as [IncomingMessage, Duplex, Buffer]);
      return true;
    }
    return (emit as (...a: unknown[]) => boolean).call(this, event, ...args);
  } as typeof server.emit;
  await new Promise<void>((resolve, reject) => {
    const onError = (e: NodeJS.ErrnoException) => reject(listenError(e, 'PARLEY_HTTP_PORT', host, port));
    server.once('error', onError);
    server.listen({ host, port }, () => {
      server.off('error', onError);
      resolve();
    });
  });
  const addr = server.address();
  // As Fastify closes its own server: no new connections, idle ones closed, requests under
  // way finished (cut after CLOSE_GRACE_MS).
  const close = () =>
    new Promise<void>((resolve) => {
      server.close(() => resolve());
      server.closeIdleConnections();
      setTimeout(() => server.closeAllConnections(), CLOSE_GRACE_MS).unref();
    });
  return {
    server,
    port: typeof addr === 'object' && addr ? addr.port : port,
    held: () => held.length + heldUpgrades.length,
    handOver(h) {
      handler = h;
      server.emit = emit;
      for (const [req, res] of held.splice(0)) h(req, res);
      for (const [req, socket, head] of heldUpgrades.splice(0)) server.emit('upgrade', req, socket, head);
    },
    async abort() {
      for (const [, res] of held.splice(0)) json(res, 503, { error: { code: 'unavailable', message: 'the platform is not running' } }, false);
      for (const [, socket] of heldUpgrades.splice(0)) socket.destroy();
      await close();
    },
    close,
  };
}
