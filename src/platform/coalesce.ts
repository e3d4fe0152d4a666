/**
 * A background job that many triggers may ask to run: `kick()` starts a run unless one is
 * in progress, in which case exactly one more run follows it (kicks during a run coalesce).
 * Used by the delivery worker and the blast preparer, woken by NOTIFY and timers.
 */
export interface CoalescingRunner {
  /** Asks for a run (now, or right after the current one). */
  kick(): void;
  /** Resolves when no run is in progress or pending. */
  idle(): Promise<void>;
  /** Stops further runs and waits for the current one. */
  stop(): Promise<void>;
}

/**
 * @param run the job; its failures go to `onError` and do not stop later runs
 */
export function coalescingRunner(run: () => Promise<unknown>, onError: (e: unknown) => void): CoalescingRunner {
  let running: Promise<void> | null = null;
  let again = false;
  let stopped = false;
  const kick = () => {
    if (stopped) return;
    if (running) {
      again = true;
      return;
    }
    running = (async () => {
      do {
        again = false;
        try {
          await run();
        } catch (e) {
          onError(e);
        }
      } while (again && !stopped);
    })().finally(() => {
      running = null;
    });
  };
  return {
    kick,
    idle: async () => {
      while (running) await running;
    },
    stop: async () => {
      stopped = true;
      await running;
    },
  };
}
