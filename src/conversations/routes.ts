import type { FastifyInstance } from 'fastify';
import type { ActionInput, Perms } from '../core/actions.ts';
import type { FlagOp, Folder } from '../core/folders.ts';
import type { Deps } from '../context.ts';
import { requireUser } from '../http/server.ts';
import { applyActions } from './commands/apply-actions.ts';
import { createConversation } from './commands/create-conversation.ts';
import { publishDraft } from './commands/publish-draft.ts';
import { changeFlags } from './flags.ts';
import { createLabel, deleteLabel, listLabels, setConversationLabels, updateLabel } from './labels.ts';
import { actionsSince, folderCounts, getConversation, listConversations } from './queries.ts';
import { deliveryStatus } from '../delivery/status.ts';
import {
  ActionInputSchema,
  ActionSchema,
  CreateConversationBody,
  FlagsBody,
  KeyParams,
  ListQuery,
} from './schemas.ts';

const err = { $ref: 'Error#' };
const errors = { 400: err, 401: err, 403: err, 404: err, 409: err, 413: err };
const secured: { [k: string]: string[] }[] = [{ bearer: [] }, { cookie: [] }];

/** Client API routes of conversations, folders, flags and labels (issue 2, "Client API"). */
export async function conversationRoutes(app: FastifyInstance, deps: Deps): Promise<void> {
  const auth = requireUser(deps);
  const me = (req: { user: { id: number; address: string } | null }) => ({ id: req.user!.id, address: req.user!.address });

  app.get('/api/conversations', {
    preHandler: auth,
    schema: { tags: ['conversations'], summary: 'List conversations (by folder or label, newest activity first, cursor paging)', security: secured, querystring: ListQuery, response: { 400: err, 401: err } },
  }, async (req) => {
    const q = req.query as { folder?: Folder; label?: number; cursor?: string; limit: number; unseen?: boolean };
    return listConversations(deps, me(req), q);
  });

  app.get('/api/counts', {
    preHandler: auth,
    schema: { tags: ['conversations'], summary: 'Exact conversation counts per folder and label (total and unseen)', security: secured },
  }, async (req) => folderCounts(deps, me(req)));

  app.post('/api/conversations', {
    preHandler: auth,
    schema: { tags: ['conversations'], summary: 'Create a conversation: published at once (default) or a draft', security: secured, body: CreateConversationBody, response: { ...errors } },
  }, async (req, reply) => {
    const b = req.body as {
      subject: string;
      participants: (string | { address: string; perms?: Perms })[];
      messages: { body: string; format?: any; parent?: number; files?: any[] }[];
      publish: boolean;
      expiry?: string | null;
    };
    const r = await createConversation(deps, {
      creator: req.user!.address,
      subject: b.subject,
      participants: b.participants.map((p) => (typeof p === 'string' ? { address: p } : p)),
      messages: b.messages,
      publish: b.publish,
      expiry: b.expiry,
    });
    return reply.status(201).send(r);
  });

  app.get('/api/conversations/:key', {
    preHandler: auth,
    schema: {
      tags: ['conversations'],
      summary: 'Get a conversation: state (subject, participants, messages, flags) and optionally its actions',
      security: secured,
      params: KeyParams,
      querystring: { type: 'object', additionalProperties: false, properties: { actions: { type: 'boolean', default: false } } },
      response: { 404: err },
    },
  }, async (req) => getConversation(deps, me(req), (req.params as any).key, (req.query as any).actions));

  app.get('/api/conversations/:key/actions', {
    preHandler: auth,
    schema: {
      tags: ['conversations'],
      summary: 'Actions after id `since`, oldest first',
      security: secured,
      params: KeyParams,
      querystring: {
        type: 'object',
        additionalProperties: false,
        properties: { since: { type: 'integer', minimum: 0, default: 0 }, limit: { type: 'integer', minimum: 1, maximum: 1000, default: 500 } },
      },
      response: { 200: { type: 'object', properties: { actions: { type: 'array', items: ActionSchema }, last_action_id: { type: 'integer' } } }, 404: err },
    },
  }, async (req) => {
    const q = req.query as { since: number; limit: number };
    return actionsSince(deps, me(req), (req.params as any).key, q.since, q.limit);
  });

  app.post('/api/conversations/:key/actions', {
    preHandler: auth,
    schema: {
      tags: ['conversations'],
      summary: 'Act on a conversation: a batch of actions, all applied or none; returns them numbered',
      description:
        'Edits name the head of the component they change in `follows` (409 `follows_not_head` otherwise). ' +
        'Locks (message:lock, subject:lock) last 10 minutes unless released; edits by others meanwhile get 409 `locked`. ' +
        'A removed participant gets 403 `removed`.',
      security: secured,
      params: KeyParams,
      body: { type: 'object', additionalProperties: false, required: ['actions'], properties: { actions: { type: 'array', minItems: 1, maxItems: 100, items: ActionInputSchema } } },
      response: {
        200: { type: 'object', properties: { actions: { type: 'array', items: ActionSchema } } },
        202: {
          description:
            'The conversation is led by another platform that cannot be reached now: the actions wait in the proposals outbox, are retried, ' +
            'and are applied exactly once when the leader numbers them (ids may then differ). GET /api/conversations/{key} lists them under `pending`.',
          type: 'object',
          properties: {
            pending: { type: 'boolean', enum: [true] },
            proposal: { type: 'integer', description: 'id of the pending proposal' },
            reason: { type: 'string', description: 'why the leader could not number them now' },
            actions: { type: 'array', items: ActionSchema, description: 'the actions as proposed (provisional ids)' },
          },
        },
        ...errors,
      },
    },
  }, async (req, reply) => {
    const r = await applyActions(deps, me(req), (req.params as any).key, (req.body as { actions: ActionInput[] }).actions);
    if (r.pending) return reply.status(202).send({ pending: true, proposal: r.pending.proposal, reason: r.pending.reason, actions: r.actions });
    return { actions: r.actions };
  });

  app.post('/api/conversations/:key/publish', {
    preHandler: auth,
    schema: { tags: ['conversations'], summary: 'Publish a draft; returns the published key and log', security: secured, params: KeyParams, response: { ...errors } },
  }, async (req) => publishDraft(deps, me(req), (req.params as any).key));

  app.post('/api/conversations/:key/flags', {
    preHandler: auth,
    schema: { tags: ['folders'], summary: 'Folder operations: archive, inbox, delete, restore, spam, ham, mute, unmute, seen, unseen', security: secured, params: KeyParams, body: FlagsBody, response: { ...errors } },
  }, async (req) => ({ flags: await changeFlags(deps, me(req), (req.params as any).key, (req.body as { ops: FlagOp[] }).ops) }));

  app.post('/api/conversations/:key/labels', {
    preHandler: auth,
    schema: {
      tags: ['labels'],
      summary: 'Apply and remove labels on a conversation',
      security: secured,
      params: KeyParams,
      body: {
        type: 'object',
        additionalProperties: false,
        properties: { add: { type: 'array', items: { type: 'integer', minimum: 1 }, maxItems: 100, default: [] }, remove: { type: 'array', items: { type: 'integer', minimum: 1 }, maxItems: 100, default: [] } },
      },
      response: { ...errors },
    },
  }, async (req) => {
    const b = req.body as { add: number[]; remove: number[] };
    return { labels: await setConversationLabels(deps, me(req), (req.params as any).key, b.add, b.remove) };
  });

  app.get('/api/conversations/:key/deliveries', {
    preHandler: auth,
    schema: { tags: ['conversations'], summary: "Delivery status of the conversation's outbound emails, per recipient", security: secured, params: KeyParams, response: { 404: err } },
  }, async (req) => deliveryStatus(deps, me(req), (req.params as any).key));

  const LabelBody = {
    type: 'object',
    additionalProperties: false,
    properties: {
      name: { type: 'string', minLength: 1, maxLength: 100 },
      color: { type: 'string', pattern: '^#[0-9a-fA-F]{6}$' },
      ordering: { type: 'integer' },
      description: { type: 'string', maxLength: 1000 },
    },
  } as const;
  const IdParams = { type: 'object', additionalProperties: false, required: ['id'], properties: { id: { type: 'integer', minimum: 1 } } } as const;

  app.get('/api/labels', { preHandler: auth, schema: { tags: ['labels'], summary: "The caller's labels in order", security: secured } }, async (req) => ({ labels: await listLabels(deps, me(req)) }));
  app.post('/api/labels', { preHandler: auth, schema: { tags: ['labels'], summary: 'Create a label', security: secured, body: { ...LabelBody, required: ['name'] }, response: { ...errors } } }, async (req, reply) =>
    reply.status(201).send(await createLabel(deps, me(req), req.body as any)),
  );
  app.patch('/api/labels/:id', { preHandler: auth, schema: { tags: ['labels'], summary: 'Rename, recolour, reorder a label', security: secured, params: IdParams, body: LabelBody, response: { ...errors } } }, async (req) =>
    updateLabel(deps, me(req), (req.params as any).id, req.body as any),
  );
  app.delete('/api/labels/:id', { preHandler: auth, schema: { tags: ['labels'], summary: 'Delete a label', security: secured, params: IdParams, response: { ...errors } } }, async (req, reply) => {
    await deleteLabel(deps, me(req), (req.params as any).id);
    return reply.status(204).send();
  });
}
