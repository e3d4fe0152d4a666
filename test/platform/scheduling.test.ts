import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { readdirSync, readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { scheduleAsBatch } from '../../src/platform/scheduling.ts';
import { canScheduleAsBatch } from '../support/system.ts';

/** /proc/<pid>/task/<tid>/sched: "policy : 3" is SCHED_BATCH (0 is SCHED_OTHER, the default). */
function policies(pid: number): Map<number, number> {
  const out = new Map<number, number>();
  for (const tid of readdirSync(`/proc/${pid}/task`)) {
    const m = /^policy\s*:\s*(\d+)/m.exec(readFileSync(`/proc/${pid}/task/${tid}/sched`, 'utf8'));
    out.set(Number(tid), Number(m?.[1]));
  }
  return out;
}

/** scheduleAsBatch (src/platform/scheduling.ts), as `parley import` and the embedded PostgreSQL use it. */
describe('scheduleAsBatch', { skip: !canScheduleAsBatch && 'Linux with chrt (util-linux) only' }, () => {
  it('with allTasks puts every thread of a running process under SCHED_BATCH, and threads it starts later inherit it', async () => {
    // A real Node process with a worker thread running; on a line of input it starts another.
    const child = spawn(
      process.execPath,
      [
        '-e',
        `const { Worker } = require('node:worker_threads');
         const start = () => new Promise((r) => { const w = new Worker('setInterval(() => {}, 1000); require("node:worker_threads").parentPort.postMessage(1)', { eval: true }); w.once('message', r); });
         start().then(() => console.log('ready'));
         process.stdin.on('data', () => start().then(() => console.log('started')));`,
      ],
      { stdio: ['pipe', 'pipe', 'inherit'] },
    );
    try {
      const lines = createInterface({ input: child.stdout! })[Symbol.asyncIterator]();
      assert.equal((await lines.next()).value, 'ready');
      const before = policies(child.pid!);
      assert.ok([...before.values()].every((p) => p === 0), 'a new process starts with the default policy');

      assert.equal(await scheduleAsBatch([child.pid!], { allTasks: true }), 1);
      const after = policies(child.pid!);
      for (const [tid, policy] of after) assert.equal(policy, 3, `thread ${tid}`);

      child.stdin!.write('\n');
      assert.equal((await lines.next()).value, 'started');
      const later = [...policies(child.pid!)].filter(([tid]) => !after.has(tid));
      assert.ok(later.length > 0, 'the new worker thread is there');
      for (const [tid, policy] of later) assert.equal(policy, 3, `thread ${tid}, started afterwards`);
      assert.equal(policies(process.pid).get(process.pid), 0, 'the caller keeps its own policy');
    } finally {
      child.kill('SIGKILL');
      await once(child, 'exit');
    }
  });

  it('changes nothing and does not throw for a process that is gone', async () => {
    const child = spawn(process.execPath, ['-e', '0']);
    await once(child, 'exit');
    assert.equal(await scheduleAsBatch([child.pid!], { allTasks: true }), 0);
  });
});
