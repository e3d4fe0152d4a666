#!/usr/bin/env node
// Bundles the `parley` command (src/cli/main.ts and every source it imports) into
// dist/parley.mjs and its chunks (split at the CLI's dynamic imports) with esbuild, so that `parley` starts without compiling ~120 TypeScript
// files through tsx on every run (docs/benchmarks.md, "Where the time goes": 2–5 s of a
// `parley import`). Run by `npm install` / `npm ci` (the `prepare` script) and by
// `npm run build`. Packages stay external (resolved from node_modules at run time) but
// kysely and typebox (INLINED below); the
// SQL migrations are copied next to the bundle (src/store/migrate.ts reads them relative
// to its own module).
//
// bin/parley.js runs the bundle only while it is up to date — while every file under src/
// has the path, size and modification time it had when the bundle was built (the
// fingerprint in dist/parley.stamp.json) — and otherwise runs the sources through tsx, so
// stale code never runs.
//
// esbuild is tsx's own dependency (no new package). Without it this script says so and
// exits 0: `parley` then always runs through tsx.
import { cpSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ROOT as root, STAMP, sourceFingerprint as fingerprint } from './cli-bundle.mjs';

const dist = join(root, 'dist');

/**
 * Packages bundled rather than loaded from node_modules: their ESM builds are hundreds of
 * modules (kysely ~280, typebox ~270, which loadConfig uses), and resolving, reading and
 * compiling them one by one cost ≈ 0.8 G instructions (≈ 0.3 s here) of every `parley`
 * run: a one-message `parley import` 2.79 → 1.97 G (measured 2026-11-22). Pure JavaScript
 * without files of their own to read, so bundling them changes nothing else.
 */
const INLINED = new Set(['kysely', '@sinclair/typebox']);

/** `pkg` of `pkg/sub/path`, `@scope/pkg` of `@scope/pkg/sub/path`. */
const packageName = (specifier) => specifier.split('/').slice(0, specifier.startsWith('@') ? 2 : 1).join('/');

let esbuild;
try {
  esbuild = await import('esbuild');
} catch {
  console.warn('build-cli: esbuild is not installed; `parley` will run the sources through tsx');
  process.exit(0);
}

// Taken before reading any source, and compared after: a file changed during the build
// leaves the bundle unmarked.
const before = fingerprint();
// Earlier chunks stay: their names carry a content hash, and a long-running `parley start`
// of the previous build may still load one of them lazily.
rmSync(STAMP, { force: true });
mkdirSync(dist, { recursive: true });
try {
  await esbuild.build({
    entryPoints: { parley: join(root, 'src/cli/main.ts') },
    outdir: dist,
    outExtension: { '.js': '.mjs' },
    // Code split at the CLI's dynamic imports: a command loads only the chunks it uses.
    splitting: true,
    bundle: true,
    platform: 'node',
    format: 'esm',
    target: 'node20',
    // Packages stay external (resolved from node_modules at run time), except those in
    // INLINED, bundled into the chunks that use them.
    plugins: [
      {
        name: 'external-packages',
        setup(build) {
          build.onResolve({ filter: /^[^./]/ }, (args) => (INLINED.has(packageName(args.path)) ? undefined : { path: args.path, external: true }));
        },
      },
    ],
    sourcemap: 'linked',
    logLevel: 'warning',
  });
} catch (e) {
  // `npm install` must not fail because of the bundle: `parley` then runs the sources.
  console.warn(`build-cli: the bundle could not be built (${e.message}); \`parley\` will run the sources through tsx`);
  process.exit(0);
}
rmSync(join(dist, 'migrations'), { recursive: true, force: true });
cpSync(join(root, 'src/store/migrations'), join(dist, 'migrations'), { recursive: true });
if (fingerprint() !== before) {
  console.warn('build-cli: sources changed during the build; not marking the bundle up to date');
  process.exit(0);
}
writeFileSync(STAMP, JSON.stringify({ sources: before }) + '\n');
console.log('build-cli: dist/parley.mjs is up to date with src/');
