import type { RouteModule } from './server.ts';
import type { Realtime } from '../streams/realtime.ts';
import { accountRoutes } from '../accounts/routes.ts';
import { conversationRoutes } from '../conversations/routes.ts';
import { attachmentRoutes } from '../attachments/routes.ts';
import { searchRoutes } from '../search/routes.ts';
import { streamRoutes } from '../streams/routes.ts';
import { deliveryRoutes } from '../delivery/routes.ts';
import { organisationRoutes } from '../organisations/routes.ts';
import { federationRoutes } from '../federation/routes.ts';

/** Every route module of the web role, in registration order. */
export function routeModules(realtime: Realtime): RouteModule[] {
  return [accountRoutes, conversationRoutes, attachmentRoutes, searchRoutes, streamRoutes(realtime), deliveryRoutes, organisationRoutes, federationRoutes];
}
