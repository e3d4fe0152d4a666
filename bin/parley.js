#!/usr/bin/env node
// The `parley` command. `npm install` bundles the TypeScript sources into dist/parley.mjs
// (scripts/build-cli.mjs, the `prepare` script; `npm run build` by hand). The bundle runs
// only while it is up to date — every file under src/ has the path, size and modification
// time it had when the bundle was built (scripts/cli-bundle.mjs) — else the sources run
// through tsx, so stale code never runs. PARLEY_NO_BUNDLE=1 always runs the sources.
import { pathToFileURL } from 'node:url';
import { BUNDLE, bundleIsCurrent } from '../scripts/cli-bundle.mjs';

if (bundleIsCurrent()) {
  await import(pathToFileURL(BUNDLE).href);
} else {
  const { register } = await import('tsx/esm/api');
  register();
  await import('../src/cli/main.ts');
}
