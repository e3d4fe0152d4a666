-- The log's rows without per-row referential checks (issue 2, Done means 7: PostgreSQL's
-- instructions per appended action; docs/benchmarks.md, session 8).
--
-- Every inserted `actions` and `messages` row ran its foreign key's check on
-- `conversations` — an SPI query locking the conversation row FOR KEY SHARE, ≈ 45,000
-- instructions apiece (pg_stat_statements: `SELECT 1 FROM ONLY "public"."conversations" x …
-- FOR KEY SHARE OF x`, two per append) — for a row the writing transaction already holds
-- locked FOR UPDATE: every writer of the log locks its conversation first (the group
-- commit's lock read, parley_lock_conversations; the inbound ingest's lock,
-- parley_lock_conversations_by_id; a replica's lock of a pushed conversation) or has just
-- inserted it. Migration 034 made the same trade for user_events.
--
-- What the keys guaranteed is kept: no writer inserts log rows for a conversation it has not
-- locked or created (the write path above), and deleting conversations still deletes their
-- log (the statement triggers below, as ON DELETE CASCADE did; Parley itself never deletes a
-- conversation — this is for an operator's manual clean-up).
alter table actions drop constraint if exists actions_conv_id_fkey;
alter table messages drop constraint if exists messages_conv_id_fkey;

create function parley_log_of_deleted_conversations() returns trigger
language plpgsql as $$
begin
  delete from messages m using gone where m.conv_id = gone.id;
  delete from actions a using gone where a.conv_id = gone.id;
  return null;
end $$;
create trigger conversations_delete_log after delete on conversations
  referencing old table as gone for each statement execute function parley_log_of_deleted_conversations();
