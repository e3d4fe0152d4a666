import { type Action, type ActionInput, type ActionSource, type FileRef, type MessageFormat, type Perms, sealAction } from './actions.ts';
import { conversationKey } from './keys.ts';
import type { ConversationState } from './reducer.ts';

/** What a published conversation starts with. */
export interface PublishSpec {
  creator: string;
  subject: string;
  /** UTC ISO 8601 with ms; part of the key. */
  publishedAt: string;
  /** Participants other than the creator. */
  participants: { address: string; perms?: Perms }[];
  messages: {
    /** Id in the draft, if any: lets children name their parent. */
    draftId?: number;
    author?: string;
    body: string;
    format?: MessageFormat;
    /** Draft id of the parent message. */
    parent?: number | null;
    files?: FileRef[];
    source?: ActionSource;
  }[];
  expiry?: string | null;
}

/**
 * Builds the log of a newly published conversation (em2 seed 000, "Changes to publishing"):
 * 1 `conv:create` (body = subject), a `participant:add` per participant, a `message:add`
 * per message (parents renumbered), `expiry:modify` if set, then `conv:publish` — every
 * action at `publishedAt`, hash-chained, under the key derived by `conversationKey`.
 * Deleted draft messages are not part of the spec, so publishing never resurrects them.
 */
export function publishedLog(spec: PublishSpec): Action[] {
  const key = conversationKey(spec.creator, spec.publishedAt, spec.subject);
  const inputs: (ActionInput & { actor: string })[] = [
    { act: 'conv:create', actor: spec.creator, body: spec.subject },
  ];
  for (const p of spec.participants) {
    if (p.address === spec.creator) continue;
    inputs.push({ act: 'participant:add', actor: spec.creator, participant: p.address, perms: p.perms ?? 'write' });
  }
  const newIdOf = new Map<number, number>();
  for (const m of spec.messages) {
    const id = inputs.length + 1;
    if (m.draftId !== undefined) newIdOf.set(m.draftId, id);
    const parent = m.parent != null ? newIdOf.get(m.parent) : undefined;
    inputs.push({
      act: 'message:add',
      actor: m.author ?? spec.creator,
      body: m.body,
      ...(m.format && m.format !== 'plain' ? { format: m.format } : {}),
      ...(parent !== undefined ? { parent } : {}),
      ...(m.files && m.files.length ? { files: m.files } : {}),
      ...(m.source ? { source: m.source } : {}),
    });
  }
  if (spec.expiry) inputs.push({ act: 'expiry:modify', actor: spec.creator, follows: 1, expiry: spec.expiry });
  inputs.push({ act: 'conv:publish', actor: spec.creator });

  const log: Action[] = [];
  let prev: string | null = null;
  for (const [i, input] of inputs.entries()) {
    const a = sealAction({ ...input, conv: key, id: i + 1, ts: spec.publishedAt, prev });
    log.push(a);
    prev = a.hash;
  }
  return log;
}

/** The publish spec of a draft: its live participants and non-deleted messages, in order. */
export function specFromDraft(s: ConversationState, publishedAt: string): PublishSpec {
  const h = s.header!;
  const alive = [...s.messages.values()].filter((m) => !m.deleted).sort((a, b) => a.id - b.id);
  const aliveIds = new Set(alive.map((m) => m.id));
  return {
    creator: h.creator,
    subject: h.subject,
    publishedAt,
    participants: [...s.participants.values()]
      .filter((p) => p.removed_id === null && p.address !== h.creator)
      .sort((a, b) => a.added_id - b.added_id)
      .map((p) => ({ address: p.address, perms: p.perms })),
    messages: alive.map((m) => ({
      draftId: m.id,
      author: m.author,
      body: m.body,
      format: m.format,
      parent: m.parent !== null && aliveIds.has(m.parent) ? m.parent : null,
      files: m.files,
      ...(m.source ? { source: m.source } : {}),
    })),
    expiry: h.expiry,
  };
}
