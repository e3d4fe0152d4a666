import type { FastifyInstance } from 'fastify';
import type { Deps } from '../context.ts';

/** Search routes (to be completed: GET /api/search). */
export async function searchRoutes(_app: FastifyInstance, _deps: Deps): Promise<void> {}
