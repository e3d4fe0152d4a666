import type { Deps } from '../context.ts';

/** An organisation as delivery plugins see it: its id, slug and every plugin's config. */
export interface OrgPluginConfigs {
  id: number;
  slug: string;
  configs: Record<string, Record<string, unknown>>;
}

/**
 * Looks up an organisation by id (digits) or slug, with `organisations.plugin_config`.
 * @returns null when there is no such organisation
 */
export async function loadOrgConfigs(deps: Deps, ref: string | number): Promise<OrgPluginConfigs | null> {
  const s = String(ref).trim();
  if (!s || s.length > 100) return null;
  let q = deps.db.kysely.selectFrom('organisations').select(['id', 'slug', 'plugin_config']);
  q = /^\d{1,15}$/.test(s) ? q.where('id', '=', Number(s)) : q.where('slug', '=', s);
  const row = await q.executeTakeFirst();
  if (!row) return null;
  return { id: row.id, slug: row.slug, configs: (row.plugin_config ?? {}) as Record<string, Record<string, unknown>> };
}

/**
 * A short-lived cache of organisations' plugin configs for workers (one query per
 * organisation per `ttlMs`, not per delivery). A changed config is seen within `ttlMs`.
 */
export function orgConfigCache(deps: Deps, ttlMs = 5_000): (orgId: number | null, plugin: string) => Promise<Record<string, unknown>> {
  const cache = new Map<number, { at: number; value: Promise<OrgPluginConfigs | null> }>();
  return async (orgId, plugin) => {
    if (orgId === null) return {};
    const now = Date.now();
    let hit = cache.get(orgId);
    if (!hit || now - hit.at > ttlMs) {
      hit = { at: now, value: loadOrgConfigs(deps, orgId) };
      cache.set(orgId, hit);
      hit.value.catch(() => cache.delete(orgId));
    }
    const org = await hit.value;
    return org?.configs[plugin] ?? {};
  };
}
