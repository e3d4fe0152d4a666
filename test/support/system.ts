import { execFileSync } from 'node:child_process';

/**
 * Whether this machine can put processes under SCHED_BATCH the way src/platform/scheduling.ts
 * does: Linux, with `chrt` (util-linux) on the PATH. Tests of that policy skip otherwise.
 */
export const canScheduleAsBatch: boolean = (() => {
  if (process.platform !== 'linux') return false;
  try {
    execFileSync('chrt', ['--version'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
})();
