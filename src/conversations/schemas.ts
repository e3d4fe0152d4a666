import { ACTION_TYPES, FORMATS, PERMS } from '../core/actions.ts';
import { FLAG_OPS, FOLDERS } from '../core/folders.ts';
import { CONVERSATION_KEY_PATTERN } from '../core/keys.ts';

/** JSON schemas of the conversation endpoints (they also make the OpenAPI document). */

export const ADDRESS = { type: 'string', pattern: '^[^\\s@<>]+@[^\\s@<>]+$', maxLength: 320 } as const;

export const FileRefSchema = {
  type: 'object',
  additionalProperties: false,
  required: ['sha256', 'name'],
  properties: {
    sha256: { type: 'string', pattern: '^[0-9a-f]{64}$' },
    name: { type: 'string', minLength: 1, maxLength: 255 },
    content_type: { type: 'string', maxLength: 255, default: 'application/octet-stream' },
    size: { type: 'integer', minimum: 0, default: 0, description: 'bytes; the stored size wins' },
    content_id: { type: 'string', maxLength: 255 },
    inline: { type: 'boolean' },
  },
} as const;

export const ActionInputSchema = {
  type: 'object',
  additionalProperties: false,
  required: ['act'],
  properties: {
    act: { type: 'string', enum: ACTION_TYPES },
    follows: { type: 'integer', minimum: 1, description: 'id of the head action of the component changed' },
    parent: { type: 'integer', minimum: 1, description: 'message:add — id of the parent message' },
    participant: ADDRESS,
    perms: { type: 'string', enum: PERMS },
    body: { type: 'string' },
    format: { type: 'string', enum: FORMATS },
    files: { type: 'array', items: FileRefSchema, maxItems: 100 },
    expiry: { type: ['string', 'null'], format: 'date-time' },
  },
} as const;

export const ActionSchema = {
  type: 'object',
  additionalProperties: true,
  description: 'A numbered, hash-chained action of the log (see docs/federation.md for the hash).',
  properties: {
    conv: { type: 'string' },
    id: { type: 'integer' },
    act: { type: 'string', enum: ACTION_TYPES },
    actor: { type: 'string' },
    ts: { type: 'string', format: 'date-time' },
    prev: { type: ['string', 'null'] },
    hash: { type: 'string' },
  },
} as const;

export const KeyParams = {
  type: 'object',
  additionalProperties: false,
  required: ['key'],
  properties: { key: { type: 'string', pattern: CONVERSATION_KEY_PATTERN } },
} as const;

export const CreateConversationBody = {
  type: 'object',
  additionalProperties: false,
  required: ['subject'],
  properties: {
    subject: { type: 'string', maxLength: 998 },
    participants: {
      type: 'array',
      maxItems: 1000,
      default: [],
      items: {
        anyOf: [
          ADDRESS,
          { type: 'object', additionalProperties: false, required: ['address'], properties: { address: ADDRESS, perms: { type: 'string', enum: PERMS } } },
        ],
      },
    },
    messages: {
      type: 'array',
      maxItems: 100,
      default: [],
      items: {
        type: 'object',
        additionalProperties: false,
        required: ['body'],
        properties: {
          body: { type: 'string' },
          format: { type: 'string', enum: FORMATS },
          parent: { type: 'integer', minimum: 0, description: 'index of an earlier message in this list' },
          files: { type: 'array', items: FileRefSchema, maxItems: 100 },
        },
      },
    },
    publish: { type: 'boolean', default: true },
    expiry: { type: ['string', 'null'], format: 'date-time' },
  },
} as const;

export const ListQuery = {
  type: 'object',
  additionalProperties: false,
  properties: {
    folder: { type: 'string', enum: FOLDERS },
    label: { type: 'integer', minimum: 1 },
    unseen: { type: 'boolean' },
    cursor: { type: 'string', maxLength: 200 },
    limit: { type: 'integer', minimum: 1, maximum: 200, default: 50 },
  },
} as const;

export const FlagsBody = {
  type: 'object',
  additionalProperties: false,
  required: ['ops'],
  properties: { ops: { type: 'array', minItems: 1, maxItems: 10, items: { type: 'string', enum: FLAG_OPS } } },
} as const;
