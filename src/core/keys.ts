import { randomBytes } from 'node:crypto';
import { sha256Hex } from './canonical.ts';

/**
 * The key of a published conversation: the first 32 hex digits (128 bits) of
 * SHA-256("<creator>\n<published_at>\n<subject>"), where published_at is the UTC ISO 8601
 * time of publication with milliseconds (em2 seed 000, "Conversations: hash of conversation
 * basics"). Any platform can recompute it from the published log's first action.
 */
export function conversationKey(creator: string, publishedAt: string, subject: string): string {
  return sha256Hex(`${creator}\n${publishedAt}\n${subject}`).slice(0, 32);
}

/** A random key for a draft: `dft-` and 24 hex digits. Never leaves the platform. */
export function draftKey(): string {
  return `dft-${randomBytes(12).toString('hex')}`;
}

/** Published keys are 32 lowercase hex digits; draft keys are `dft-` + 24. */
export const CONVERSATION_KEY_PATTERN = '^([0-9a-f]{32}|dft-[0-9a-f]{24})$';
