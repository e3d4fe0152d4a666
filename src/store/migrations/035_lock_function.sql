-- parley_lock_conversations: the write path's lock read (src/conversations/commands/
-- apply-actions.ts lockConversationsForActors) as a function, so that group commit can send
-- it in the same round trip as its BEGIN — a simple-protocol query, `begin; select r from
-- parley_lock_conversations('{…}')`, values written in (src/store/db.ts
-- pipelinedTransaction) — while PostgreSQL still plans it once per connection: PL/pgSQL keeps
-- the plans of its statements, where a plain statement with its values written in would be
-- planned on every call (≈ 0.45 ms, more than running it). Same rows as the prepared
-- statement it replaces on that path: one json per conversation named by `keys` (published
-- or draft keys), locked FOR UPDATE in id order, with every participant and the id of the
-- active signing key. The keys are read through a sub-select so that every call is
-- estimated alike and one generic plan is kept.
create function parley_lock_conversations(keys text[]) returns setof json
language plpgsql as $$
begin
  return query
    select json_build_object(
             'c', json_build_object(
                    'id', c.id, 'key', c.key, 'draft_key', c.draft_key, 'creator', c.creator, 'leader', c.leader,
                    'published', c.published, 'published_at', c.published_at, 'created_at', c.created_at,
                    'subject', c.subject, 'subject_head', c.subject_head, 'subject_lock_by', c.subject_lock_by,
                    'subject_lock_at', c.subject_lock_at, 'subject_lock_id', c.subject_lock_id, 'expiry', c.expiry,
                    'expiry_head', c.expiry_head, 'last_id', c.last_id, 'last_hash', c.last_hash, 'last_ts', c.last_ts,
                    'message_count', c.message_count, 'org_id', c.org_id),
             'p', (select coalesce(json_agg(pa), '[]') from participants pa where pa.conv_id = c.id),
             'k', (select k.key_id from platform_keys k where k.retired_at is null limit 1))
      from conversations c
     where c.key = any((select keys)::text[]) or c.draft_key = any((select keys)::text[])
     order by c.id
       for update of c;
end $$;
