-- parley_lock_conversations_by_id: the inbound ingest's lock read (src/mail/inbound/
-- ingest-email.ts applyEmail) as a function, for the reason of 036_write_path_index_plans.sql:
-- the conversations named by `ids` (in id order, FOR UPDATE) with every column but
-- `search_header` and, as `p_all`, all their participants as a json array. As a prepared
-- statement it either guessed its rows (ids behind a sub-select: one generic plan, which
-- scanned a conversations table of a few thousand rows whole) or was planned at every call
-- (ids as a value). PL/pgSQL keeps one plan per session; no sequential scans, hash or merge
-- joins make it a primary-key probe per id whatever the size of the table.
create function parley_lock_conversations_by_id(ids bigint[])
returns table (id bigint, key text, draft_key text, creator text, leader text, published boolean,
               published_at timestamptz, created_at timestamptz, subject text, subject_head integer,
               subject_lock_by text, subject_lock_at timestamptz, subject_lock_id integer, expiry timestamptz,
               expiry_head integer, last_id integer, last_hash text, last_ts timestamptz, message_count integer,
               org_id bigint, p_all json)
language plpgsql set enable_seqscan = off set enable_hashjoin = off set enable_mergejoin = off as $$
#variable_conflict use_column
begin
  return query
    select c.id, c.key, c.draft_key, c.creator, c.leader, c.published, c.published_at, c.created_at, c.subject,
           c.subject_head, c.subject_lock_by, c.subject_lock_at, c.subject_lock_id, c.expiry, c.expiry_head, c.last_id,
           c.last_hash, c.last_ts, c.message_count, c.org_id,
           (select coalesce(json_agg(pa), '[]') from participants pa where pa.conv_id = c.id)
      from conversations c
     where c.id = any((select ids)::bigint[])
     order by c.id
       for update of c;
end $$;
