-- Index plans for the write path whatever the size of the tables (issue 2, Done means 7).
--
-- The write path addresses rows by key: `parley_write_rows` updates participants by
-- (conv_id, address) and conversations by id, from rows that `jsonb_to_recordset` hands
-- out; the planner estimates every such function at 100 rows. Against a table of a few
-- thousand rows — a platform's first weeks, the bench's second thousand emails — a
-- sequential scan of the whole table with a hash join then costs less than 100 index probes
-- in its model, so every batch read all of `participants` and `conversations`: PostgreSQL's
-- instructions per received email grew with the tables (10.8 → 18.8 M per SMTP message
-- after 2,000 more emails; `tts_buffer_heap_getsomeattrs`, sequential scans and hash
-- joins in the profile; auto_explain showed the plans, 2026-11-22). Only above some tens of
-- thousands of rows did the index plan win again. The batch holds a handful of rows, never
-- 100, so these statements are told to probe the keys: no sequential scans, hash or merge
-- joins for the duration of the function (with sequential scans alone off, stale
-- statistics made the planner hash-join a full *index* scan of the table instead). The
-- planner still uses a disabled method where nothing else applies; nothing here needs one.
alter function parley_write_rows(jsonb) set enable_seqscan = off set enable_hashjoin = off set enable_mergejoin = off;
alter function parley_lock_conversations(text[]) set enable_seqscan = off set enable_hashjoin = off set enable_mergejoin = off;

-- parley_known_emails: every recorded email (email_messages) with one of the Message-IDs
-- `ids`, with each of `locals` who actively takes part in its conversation (one row each, or
-- one row with a null address) — the inbound ingest's duplicate and thread lookup
-- (src/mail/inbound/ingest-email.ts lookupKnown). A function for the same reason as above:
-- the planner guessed `message_id = any(ids)` from stale statistics of a growing table and
-- joined conversations and participants by sequential scans. PL/pgSQL, which keeps its
-- plan for the session (a SQL function with settings is planned at every call).
create function parley_known_emails(ids text[], locals text[])
returns table (conv_id bigint, message_id text, key text, published boolean, address text)
language plpgsql stable set enable_seqscan = off set enable_hashjoin = off set enable_mergejoin = off as $$
begin
  return query
    select em.conv_id, em.message_id, cv.key, cv.published, p.address
      from email_messages em
      join conversations cv on cv.id = em.conv_id
      left join participants p on p.conv_id = em.conv_id and p.address = any(locals) and p.removed_id is null
     where em.message_id = any(ids);
end $$;
