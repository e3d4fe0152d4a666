/** A source of time, replaceable in tests. `now()` returns milliseconds since the epoch. */
export interface Clock {
  now(): number;
}

/** The wall clock. */
export const systemClock: Clock = { now: () => Date.now() };

/** UTC ISO 8601 with milliseconds, the wire format of every time (ARCHITECTURE.md). */
export function isoTime(ms: number): string {
  return new Date(ms).toISOString();
}
