/**
 * Benchmark: live delivery — the time from a writer sending an action over HTTP to its frame
 * arriving on the other participant's websocket, under a steady load (docs/benchmarks.md).
 */
import WebSocket from 'ws';
import { expectStatus, messageBody, percentile, progress, round, type ConversationPair } from './support.ts';

/** Figures of the websocket benchmark (keys of bench/results/latest.json). */
export interface WebsocketFigures {
  /** HTTP request sent → the action's `event` frame received by the reader, ms. */
  ws_delivery_p50_ms: number;
  ws_delivery_p99_ms: number;
  ws_delivery_max_ms: number;
  /**
   * The part after the write: the `200` response received → the frame received, ms (negative
   * when the frame came first). What remains of `ws_delivery_*` is the HTTP append itself.
   */
  ws_after_response_p50_ms: number;
  ws_after_response_p99_ms: number;
  /** Frames measured. */
  ws_samples: number;
  /** Actions whose frame did not arrive within 10 s of the end (must be 0). */
  ws_missing: number;
  /** The steady load offered during the measurement, actions per second (all writers). */
  ws_load_actions_per_s: number;
  /** Open websockets (one per reader). */
  ws_connections: number;
}

/** Opens `client`'s websocket and resolves after its `hello` frame. */
function openSocket(base: string, token: string, onFrame: (f: any) => void): Promise<WebSocket> {
  const ws = new WebSocket(`${base.replace(/^http/, 'ws')}/api/ws`, { headers: { authorization: `Bearer ${token}` } });
  return new Promise((res, rej) => {
    const timer = setTimeout(() => rej(new Error('websocket: no hello frame within 10 s')), 10_000);
    ws.on('message', (data) => {
      const f = JSON.parse(String(data));
      if (f.type === 'hello') {
        clearTimeout(timer);
        res(ws);
      } else onFrame(f);
    });
    ws.once('error', (e) => (clearTimeout(timer), rej(e)));
  });
}

/**
 * Every reader holds a websocket open; every writer sends `message:add` actions at
 * `ratePerClient` per second on a fixed schedule (starts staggered across writers; a late
 * answer delays only that writer's next send) for `seconds`. Each action's body carries a
 * probe tag, and the latency is taken when the frame with that tag arrives.
 * @returns the figures, and `close()` to close the websockets (after the RSS reading)
 * @throws Error on an HTTP answer other than 200
 */
export async function benchWebsocket(
  base: string,
  pairs: ConversationPair[],
  opts: { ratePerClient?: number; seconds?: number } = {},
): Promise<{ figures: WebsocketFigures; close(): void }> {
  // 10 writers × 5 actions/s = 50 actions/s: a steady load well under the append
  // benchmark's saturation point (a quarter of it here), so the figure is delivery latency,
  // not queueing.
  const ratePerClient = opts.ratePerClient ?? 5;
  const seconds = opts.seconds ?? 20;
  const sentAt = new Map<string, number>();
  const answeredAt = new Map<string, number>();
  const frameAt = new Map<string, number>();
  const latencies: number[] = [];
  const onFrame = (f: any) => {
    if (f.type !== 'event' || typeof f.action?.body !== 'string') return;
    const tag = /^ws:(\S+)/.exec(f.action.body)?.[1];
    const t = tag === undefined ? undefined : sentAt.get(tag);
    if (t === undefined) return;
    const now = performance.now();
    latencies.push(now - t);
    frameAt.set(tag!, now);
    sentAt.delete(tag!);
  };
  const sockets = await Promise.all(pairs.map((p) => openSocket(base, p.reader.token!, onFrame)));
  const close = () => sockets.forEach((s) => s.close());
  try {
    const intervalMs = 1000 / ratePerClient;
    const perClient = Math.round(seconds * ratePerClient);
    progress(`websocket: ${pairs.length} writers × ${ratePerClient} actions/s for ${seconds} s, ${sockets.length} readers on websockets`);
    const t0 = performance.now();
    await Promise.all(
      pairs.map(async (p, c) => {
        const start = t0 + (c * intervalMs) / pairs.length;
        for (let n = 0; n < perClient; n++) {
          const due = start + n * intervalMs;
          const wait = due - performance.now();
          if (wait > 0) await new Promise((r) => setTimeout(r, wait));
          const tag = `${c}:${n}`;
          sentAt.set(tag, performance.now());
          const r = await p.writer.request('POST', `/api/conversations/${p.key}/actions`, {
            actions: [{ act: 'message:add', body: messageBody(`ws:${tag}`) }],
          });
          answeredAt.set(tag, performance.now());
          expectStatus(r, 200, 'append (websocket load)');
        }
      }),
    );
    const sendSeconds = (performance.now() - t0) / 1000;
    const sent = perClient * pairs.length;
    // Wait (bounded) for the frames still in flight.
    const deadline = performance.now() + 10_000;
    while (sentAt.size > 0 && performance.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    latencies.sort((a, b) => a - b);
    const afterResponse = [...frameAt.entries()]
      .filter(([tag]) => answeredAt.has(tag))
      .map(([tag, at]) => at - answeredAt.get(tag)!)
      .sort((a, b) => a - b);
    const figures: WebsocketFigures = {
      ws_delivery_p50_ms: round(percentile(latencies, 50)),
      ws_delivery_p99_ms: round(percentile(latencies, 99)),
      ws_delivery_max_ms: round(latencies[latencies.length - 1] ?? NaN),
      ws_after_response_p50_ms: round(percentile(afterResponse, 50)),
      ws_after_response_p99_ms: round(percentile(afterResponse, 99)),
      ws_samples: latencies.length,
      ws_missing: sentAt.size,
      ws_load_actions_per_s: round(sent / sendSeconds, 1),
      ws_connections: sockets.length,
    };
    progress(`websocket: p50 ${figures.ws_delivery_p50_ms} ms, p99 ${figures.ws_delivery_p99_ms} ms over ${latencies.length} frames (${sentAt.size} missing)`);
    return { figures, close };
  } catch (e) {
    close();
    throw e;
  }
}
