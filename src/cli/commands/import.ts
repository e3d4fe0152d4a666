import { writeFile } from 'node:fs/promises';
import { resolve } from 'node:path';
import { setFlagsFromString } from 'node:v8';
import type { Command } from 'commander';
import type { ImportProgress, ImportSummary } from '../../mail/inbound/import-archive.ts';
import { badRequest } from '../../platform/errors.ts';
import { scheduleAsBatch } from '../../platform/scheduling.ts';
import { withDeps } from '../context.ts';

/** Failures listed in the printed summary; `--report` has them all. */
const LISTED_FAILURES = 20;
/** Without a terminal, one progress line per this many ms. */
const PROGRESS_LINE_MS = 2000;

/**
 * V8's interrupt budget for this process (bytecodes run before a function is considered
 * for optimisation), 8× V8's default of 67,584. An import is a few seconds of work spread
 * over many libraries (mailparser, pg, kysely, the write path): with the default budget
 * TurboFan compiled functions that then ran only a little longer — compile threads took
 * ≈ 26 % of the import's CPU. With 8× only the truly hot functions are optimised: easy_ham
 * 11.0 → 8.8 M instructions per message (2026-11-22). Set only by `parley import`, whose
 * process does nothing else.
 */
const IMPORT_INTERRUPT_BUDGET = 8 * 67_584;

function counts(p: ImportProgress): string {
  return `imported ${p.imported}, threaded ${p.threaded}, duplicates ${p.duplicates}, failed ${p.failed}`;
}

/** The human-readable summary printed at the end. */
export function formatSummary(path: string, s: ImportSummary, report: string | null): string {
  const rate = s.seconds > 0 ? Math.round(s.processed / s.seconds) : s.processed;
  const lines = [
    `Imported ${path} (${s.kind}) for ${s.owner}: ${s.processed} of ${s.total} messages in ${s.seconds.toFixed(1)} s (${rate} msg/s)`,
    `  imported (new conversations):         ${s.imported}`,
    `  threaded (added to a conversation):   ${s.threaded}`,
    `  duplicates skipped (already there):   ${s.duplicates}`,
    `  failed (kept raw, not imported):      ${s.failed}`,
  ];
  for (const f of s.failures.slice(0, LISTED_FAILURES)) lines.push(`    ${f.source}: ${f.reason}`);
  if (s.failures.length > LISTED_FAILURES) {
    lines.push(`    … and ${s.failures.length - LISTED_FAILURES} more${report ? ` (all in ${report})` : ' (use --report <file> to list them all)'}`);
  } else if (report) lines.push(`  report written to ${report}`);
  return lines.join('\n');
}

/**
 * `parley import <path> --owner <address> [--report <file>] [--json] [--concurrency <n>] [--batch <n>]`
 * (issue 2 §6): imports an mbox file, a Maildir, a folder of .eml/.msg files or one message
 * file into conversations for the owner (an existing local user, added to every imported
 * conversation), threaded like SMTP mail (src/mail/inbound/import-archive.ts). Shows a
 * progress bar on a terminal (stderr), else a progress line every 2 s; prints a summary
 * (imported, threaded, duplicates, failed with the reason of each, the first 20 listed).
 * `--report` writes the summary with every failure as JSON. Importing twice adds nothing.
 * Exit status 0 when the archive was read (even with failed messages), 2 on a bad owner or
 * path (AppError).
 */
export function registerImport(program: Command): void {
  program
    .command('import <path>')
    .description('import an mbox file, a Maildir, a folder of .eml files or one message into conversations for --owner')
    .requiredOption('--owner <address>', 'the local user the mail is imported for (must exist)')
    .option('--report <file>', 'write the summary and every failure as JSON to this file')
    .option('--json', 'print the summary as JSON instead of text', false)
    .option('--concurrency <n>', 'batches of messages committed at once (default 4)')
    .option('--batch <n>', 'most messages committed per transaction (default 25; 1: one transaction per message)')
    .action(async (path: string, opts: { owner: string; report?: string; json: boolean; concurrency?: string; batch?: string }, cmd: Command) => {
      const concurrency = opts.concurrency === undefined ? undefined : Number(opts.concurrency);
      if (concurrency !== undefined && (!Number.isInteger(concurrency) || concurrency < 1 || concurrency > 64)) throw badRequest('invalid_option', '--concurrency must be an integer from 1 to 64');
      const batchSize = opts.batch === undefined ? undefined : Number(opts.batch);
      if (batchSize !== undefined && (!Number.isInteger(batchSize) || batchSize < 1 || batchSize > 1000)) throw badRequest('invalid_option', '--batch must be an integer from 1 to 1000');
      // Before the import's modules load, so their functions get the larger budget.
      setFlagsFromString(`--interrupt-budget=${IMPORT_INTERRUPT_BUDGET}`);
      // An import is throughput work: the process runs itself — every thread, and libuv's
      // thread pool created later — under SCHED_BATCH (src/platform/scheduling.ts), as the
      // embedded PostgreSQL does. Each message's blob writes ask the pool for an open, a
      // write, an fsync and a rename; under the default policy the woken pool thread
      // preempted the main thread on its core (≈ 0.6 s of a 6.8 s import profile "inside"
      // those calls). easy_ham, six alternated pairs (docs/benchmarks.md, session 11):
      // 398 → 432 msg/s on average, every pair faster, ≈ 6 % less CPU per message.
      await scheduleAsBatch([process.pid], { allTasks: true });
      // Loaded here: other commands need not load the mail parser and the write path.
      const [{ importArchive }, { default: cliProgress }] = await Promise.all([import('../../mail/inbound/import-archive.ts'), import('cli-progress')]);
      await withDeps(cmd, async (deps) => {
        const tty = process.stderr.isTTY === true;
        const bar = tty
          ? new cliProgress.SingleBar(
              { format: 'import [{bar}] {percentage}% | {value}/{total} | {counts} | eta {eta_formatted}', hideCursor: true, stream: process.stderr },
              cliProgress.Presets.shades_classic,
            )
          : null;
        let lastLine = Date.now();
        const summary = await importArchive(deps, path, opts.owner, {
          concurrency,
          batchSize,
          onStart(total, kind) {
            if (bar) bar.start(total, 0, { counts: '' });
            else process.stderr.write(`import: ${total} messages (${kind}) in ${path}\n`);
          },
          onProgress(p) {
            if (bar) bar.update(p.processed, { counts: counts(p) });
            else if (Date.now() - lastLine >= PROGRESS_LINE_MS) {
              lastLine = Date.now();
              process.stderr.write(`import: ${p.processed}/${p.total} (${Math.floor((100 * p.processed) / Math.max(1, p.total))}%) ${counts(p)}\n`);
            }
          },
        }).finally(() => bar?.stop());
        const report = opts.report ? resolve(opts.report) : null;
        if (report) await writeFile(report, JSON.stringify({ path: resolve(path), ...summary }, null, 2) + '\n');
        process.stdout.write(opts.json ? JSON.stringify({ path: resolve(path), ...summary }) + '\n' : formatSummary(path, summary, report) + '\n');
      });
    });
}
