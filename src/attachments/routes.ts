import type { FastifyInstance } from 'fastify';
import { sql } from 'kysely';
import type { Deps } from '../context.ts';
import { requireUser } from '../http/server.ts';
import { badRequest, notFound } from '../platform/errors.ts';

/**
 * Attachment upload and download (issue 2, "Client API"). Files are blobs in the
 * content-addressed store; messages refer to them by SHA-256.
 * - `POST /api/attachments` — the raw bytes as the body (any content type), at most
 *   PARLEY_MAX_ATTACHMENT_BYTES; answers `{sha256, size, content_type}`.
 * - `GET /api/attachments/{sha256}` — the bytes, if the caller uploaded them or they are
 *   attached to a message the caller may see.
 */
export async function attachmentRoutes(app: FastifyInstance, deps: Deps): Promise<void> {
  const auth = requireUser(deps);
  await app.register(async (scope) => {
    // Raw bodies of any type, streamed to disk (never buffered whole).
    scope.removeAllContentTypeParsers();
    scope.addContentTypeParser('*', (_req, payload, done) => done(null, payload));
    scope.post('/api/attachments', {
      preHandler: auth,
      bodyLimit: deps.config.maxAttachmentBytes,
      schema: {
        tags: ['attachments'],
        summary: 'Upload a file (raw body); returns its sha256 to use in message:add files',
        security: [{ bearer: [] }, { cookie: [] }],
        response: { 201: { type: 'object', properties: { sha256: { type: 'string' }, size: { type: 'integer' }, content_type: { type: 'string' } } }, 413: { $ref: 'Error#' } },
      },
    }, async (req, reply) => {
      const contentType = (req.headers['content-type'] ?? 'application/octet-stream').split(';')[0].trim().slice(0, 255) || 'application/octet-stream';
      const { sha256, size } = await deps.blobs.putStream(req.body as NodeJS.ReadableStream as any, deps.config.maxAttachmentBytes);
      await deps.db.kysely
        .insertInto('blobs')
        .values({ sha256, size, content_type: contentType, uploaded_by: req.user!.id })
        .onConflict((oc) => oc.column('sha256').doNothing())
        .execute();
      // Remember that this user uploaded it too (for download rights before it is attached).
      await sql`insert into blob_uploaders (sha256, user_id) values (${sha256}, ${req.user!.id}) on conflict do nothing`.execute(deps.db.kysely);
      return reply.status(201).send({ sha256, size, content_type: contentType });
    });
  });

  app.get('/api/attachments/:sha256', {
    preHandler: auth,
    schema: {
      tags: ['attachments'],
      summary: 'Download a file the caller may see',
      security: [{ bearer: [] }, { cookie: [] }],
      params: { type: 'object', additionalProperties: false, required: ['sha256'], properties: { sha256: { type: 'string', pattern: '^[0-9a-f]{64}$' } } },
      querystring: { type: 'object', additionalProperties: false, properties: { download: { type: 'boolean', default: false } } },
      response: { 404: { $ref: 'Error#' } },
    },
  }, async (req, reply) => {
    const { sha256 } = req.params as { sha256: string };
    const user = req.user!;
    const r = await sql<{ name: string; content_type: string; size: number }>`
      select a.name, a.content_type, a.size from attachments a
        join participants p on p.conv_id = a.conv_id and p.user_id = ${user.id}
        join conversations c on c.id = a.conv_id
       where a.sha256 = ${sha256}
         and (c.published or c.creator = ${user.address})
         and a.message_id >= 1 and (p.removed_id is null or a.message_id <= p.removed_id)
      union all
      select 'file' as name, b.content_type, b.size from blobs b join blob_uploaders u on u.sha256 = b.sha256
       where b.sha256 = ${sha256} and u.user_id = ${user.id}
      limit 1`.execute(deps.db.kysely);
    const f = r.rows[0];
    if (!f || !deps.blobs.has(sha256)) throw notFound('attachment');
    if (!/^[\w.+-]+\/[\w.+-]+$/.test(f.content_type)) throw badRequest('invalid_content_type', 'stored content type is invalid');
    const safeName = f.name.replace(/["\\\r\n]/g, '_');
    reply.header('content-type', f.content_type);
    reply.header('content-length', String(f.size));
    reply.header('x-content-type-options', 'nosniff');
    reply.header('content-disposition', `${(req.query as any).download ? 'attachment' : 'inline'}; filename="${safeName}"; filename*=UTF-8''${encodeURIComponent(f.name)}`);
    return reply.send(deps.blobs.read(sha256));
  });
}
