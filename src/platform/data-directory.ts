/**
 * The data directory (PARLEY_DATA_DIR: blobs, raw mail, the embedded PostgreSQL) made ready at
 * start, with a clear error when it cannot be (src/app.ts, src/store/embedded.ts).
 */
import { mkdirSync, statSync, type Stats } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { ConfigError } from './config.ts';

/**
 * The nearest ancestor of `dir` (or `dir` itself) that exists.
 * @throws ConfigError when it is not a directory (a file in the way of PARLEY_DATA_DIR)
 */
export function nearestExistingDirectory(dir: string): string {
  let at = resolve(dir);
  for (;;) {
    let info: Stats | undefined;
    try {
      info = statSync(at);
    } catch {
      /* missing: go up */
    }
    if (info && !info.isDirectory()) throw new ConfigError(`the data directory ${dir} cannot be created: ${at} is not a directory (PARLEY_DATA_DIR)`);
    if (info || dirname(at) === at) return at;
    at = dirname(at);
  }
}

/**
 * Creates directory `dir` and its missing parents (the data directory, PARLEY_DATA_DIR, and
 * those under it), one level at a time: Node's `mkdirSync(…, {recursive: true})` loops for
 * ever on a path under a filesystem that refuses new entries with ENOENT (e.g. `/proc/x`).
 * @throws ConfigError naming the directory and the reason when it cannot be created
 */
export function ensureDirectory(dir: string): void {
  const target = resolve(dir);
  const missing: string[] = [];
  for (let at = target, top = nearestExistingDirectory(target); at !== top; at = dirname(at)) missing.unshift(at);
  for (const at of missing) {
    try {
      mkdirSync(at);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'EEXIST' && statSync(at).isDirectory()) continue; // created meanwhile
      throw new ConfigError(`the data directory ${dir} cannot be created: ${(e as Error).message} (PARLEY_DATA_DIR)`);
    }
  }
}
