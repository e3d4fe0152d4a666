// Whether dist/parley.mjs (scripts/build-cli.mjs) is up to date with the sources: shared by
// bin/parley.js, the build script and the benchmarks. Kept free of dependencies: it runs at
// every start of `parley`.
import { createHash } from 'node:crypto';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

/** The repository root. */
export const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
/** The bundle's entry point and its stamp. */
export const BUNDLE = join(ROOT, 'dist', 'parley.mjs');
export const STAMP = join(ROOT, 'dist', 'parley.stamp.json');

/**
 * A fingerprint of every file under src/: the SHA-256 of their sorted paths, sizes and
 * modification times (about 2 ms for this tree). Any edit, new, removed or renamed file
 * changes it.
 */
export function sourceFingerprint() {
  const lines = [];
  const walk = (dir) => {
    for (const e of readdirSync(dir, { withFileTypes: true })) {
      const p = join(dir, e.name);
      if (e.isDirectory()) walk(p);
      else {
        const st = statSync(p);
        lines.push(`${p.slice(ROOT.length)}:${st.size}:${st.mtimeMs}`);
      }
    }
  };
  walk(join(ROOT, 'src'));
  return createHash('sha256').update(lines.sort().join('\n')).digest('hex');
}

/** True when the bundle was built from exactly the sources there are now (and PARLEY_NO_BUNDLE is not set). */
export function bundleIsCurrent() {
  if (process.env.PARLEY_NO_BUNDLE) return false;
  try {
    return JSON.parse(readFileSync(STAMP, 'utf8')).sources === sourceFingerprint();
  } catch {
    return false; // never built, or no stamp: not current
  }
}
