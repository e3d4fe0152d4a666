/**
 * Linux CPU scheduling policy for Parley's batch work. `SCHED_BATCH` (sched(7)) gives a
 * process the same share of the CPU as the default policy, but a thread it wakes up — a
 * PostgreSQL backend answering a query, a libuv thread-pool thread asked to fsync — no
 * longer preempts the thread that is running. On a machine with fewer cores than busy
 * threads that saves a context switch per wake-up, at the cost of the woken thread's
 * latency: right for throughput work, wrong for a server's request path.
 *
 * Used for the embedded PostgreSQL (src/store/embedded.ts) and for `parley import`
 * (src/cli/commands/import.ts). Measurements: docs/benchmarks.md, sessions 10 and 11.
 */
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';

const run = promisify(execFile);

/**
 * Puts processes under `SCHED_BATCH` with `chrt` (util-linux). Threads and processes they
 * create later inherit the policy.
 * @param pids the processes to change
 * @param opts.allTasks every thread of each process (`chrt --all-tasks`), not only its main thread
 * @returns how many of `pids` were changed; never throws — not Linux, no `chrt`, a process
 *   gone or not allowed: that process keeps its policy
 */
export async function scheduleAsBatch(pids: number[], opts: { allTasks?: boolean } = {}): Promise<number> {
  if (process.platform !== 'linux') return 0;
  const changed = await Promise.all(
    pids.map((pid) =>
      run('chrt', [...(opts.allTasks ? ['--all-tasks'] : []), '--batch', '--pid', '0', String(pid)]).then(
        () => true,
        () => false,
      ),
    ),
  );
  return changed.filter(Boolean).length;
}
