import type { FastifyInstance } from 'fastify';
import type { WebSocket } from 'ws';
import type { Deps } from '../context.ts';
import { requireUser, sessionToken } from '../http/server.ts';
import { resolveSession } from '../accounts/sessions.ts';
import type { Realtime } from './realtime.ts';
import { readEvents, streamHead } from './read.ts';

const PAGE = 500;

/**
 * The live stream of a user (PRODUCT.md §5):
 * - `GET /api/ws?cursor=N` (websocket): frames `{"type":"hello","cursor":H}` then
 *   `{"type":"event", seq, kind, conv, action?, payload?}` for every event after N (or
 *   after H when no cursor is given), in order, live. Reconnect with the last seq seen to
 *   get exactly what was missed.
 * - `GET /api/events?cursor=N&limit=L`: the same events as a page, for polling and sync.
 */
export function streamRoutes(realtime: Realtime) {
  return async (app: FastifyInstance, deps: Deps) => {
    app.get(
      '/api/events',
      {
        preHandler: requireUser(deps),
        schema: {
          tags: ['stream'],
          summary: "Events of the caller's stream after a cursor",
          querystring: {
            type: 'object',
            additionalProperties: false,
            properties: { cursor: { type: 'integer', minimum: 0, default: 0 }, limit: { type: 'integer', minimum: 1, maximum: 1000, default: 200 } },
          },
        },
      },
      async (req) => {
        const q = req.query as { cursor: number; limit: number };
        const events = await readEvents(deps.db.kysely, req.user!.id, q.cursor, q.limit);
        const head = await streamHead(deps.db.kysely, req.user!.id);
        return { events, cursor: events.length ? events[events.length - 1].seq : q.cursor, head };
      },
    );

    app.get(
      '/api/ws',
      {
        websocket: true,
        schema: {
          tags: ['stream'],
          summary: 'Websocket of live events (see description of /api/events for frames)',
          querystring: {
            type: 'object',
            additionalProperties: false,
            properties: { cursor: { type: 'integer', minimum: 0 }, access_token: { type: 'string' } },
          },
        },
      },
      async (socket: WebSocket, req) => {
        const q = req.query as { cursor?: number; access_token?: string };
        const token = sessionToken(req) ?? q.access_token ?? null;
        const user = token ? await resolveSession(deps, token) : null;
        if (!user) {
          socket.send(JSON.stringify({ type: 'error', error: { code: 'unauthorized', message: 'authentication required' } }));
          socket.close(4401, 'unauthorized');
          return;
        }
        let cursor = q.cursor ?? (await streamHead(deps.db.kysely, user.id));
        let pumping = false;
        let again = false;
        let closed = false;
        const pump = async () => {
          if (pumping) {
            again = true;
            return;
          }
          pumping = true;
          try {
            do {
              again = false;
              while (!closed) {
                const events = await readEvents(deps.db.kysely, user.id, cursor, PAGE);
                for (const e of events) socket.send(JSON.stringify({ type: 'event', ...e }));
                if (events.length) cursor = events[events.length - 1].seq;
                if (events.length < PAGE) break;
              }
            } while (again && !closed);
          } catch (err) {
            deps.log.warn({ err }, 'websocket pump failed');
          } finally {
            pumping = false;
          }
        };
        const unsubscribe = realtime.subscribe(user.id, (wake) => {
          if (closed) return;
          if (!pumping && wake.events) {
            // Events this process committed: sent as they are when they follow the cursor
            // exactly (no read of the stream); a gap or a reordering is left to the read.
            const fresh = wake.events.filter((e) => e.seq > cursor);
            if (fresh.length === 0) return;
            if (fresh[0].seq === cursor + 1) {
              for (const e of fresh) socket.send(JSON.stringify({ type: 'event', ...e }));
              cursor = fresh[fresh.length - 1].seq;
              return;
            }
          }
          // Already sent up to there (e.g. the notification of events delivered above).
          if (!pumping && wake.upTo !== undefined && wake.upTo <= cursor) return;
          void pump();
        });
        socket.on('close', () => {
          closed = true;
          unsubscribe();
        });
        socket.on('message', (data) => {
          // Clients may ping with {"type":"ping"}; anything else is ignored.
          try {
            const m = JSON.parse(String(data));
            if (m?.type === 'ping') socket.send(JSON.stringify({ type: 'pong', cursor }));
          } catch {
            /* not JSON: ignore */
          }
        });
        socket.send(JSON.stringify({ type: 'hello', cursor, user: user.address }));
        await pump();
      },
    );
  };
}
