-- parley_write_rows: every row the write path buffers, written in ONE call (issue 2, Done
-- means 7; src/store/group-commit.ts). A shared append transaction wrote one statement per
-- table (actions, messages, conversations, participant flags, stream events…), each a
-- round trip whose socket writes and wake-ups cost both processes more CPU than the rows
-- themselves on this machine (docs/benchmarks.md, append section). Now the buffered rows go
-- as one jsonb argument, `[[kind, rows], …]`, and are written here in that order — each
-- kind by the same set-based statement the write path used before, so later kinds see the
-- rows of earlier ones (a participant upserted, then its flags updated). Plans of the
-- statements are cached per session by PL/pgSQL.
--
-- Kinds (rows are objects with the named fields; src/conversations/store.ts, effects.ts,
-- src/streams/store.ts build them):
--   actions        insert into actions
--   messages       upsert messages, with their search vector (002_search.sql)
--   attachments    insert into attachments (existing (message, ordinal, file) kept)
--   participants   upsert participants (the log's fields; flags are `flags`)
--   conversations  update the conversation header (search header rebuilt when
--                  search_addresses is not null)
--   flags          update participant flags (null: unchanged) and last_event_ts
--   snapshots      update participant snapshots (what a removed participant sees)
--   events         append to users' streams: locks the users in id order (FOR NO KEY
--                  UPDATE, see src/streams/store.ts), advances stream_seq by each user's
--                  number of events and inserts the events with consecutive numbers in
--                  the order given
-- Returns {"events": [[user_id, last seq], …]} when events were written, else {}.
create function parley_write_rows(batch jsonb) returns jsonb
language plpgsql as $$
declare
  v_item jsonb;
  v_kind text;
  v_rows jsonb;
  v_out jsonb := '{}';
  v_ev jsonb;
begin
  for v_item in select value from jsonb_array_elements(batch) loop
    v_kind := v_item->>0;
    v_rows := v_item->1;
    case v_kind
    when 'actions' then
      insert into actions (conv_id, id, act, actor, ts, component, hash, body)
      select r.conv_id, r.id, r.act, r.actor, r.ts, r.component, r.hash, r.body
        from jsonb_to_recordset(v_rows)
          as r(conv_id bigint, id integer, act text, actor text, ts timestamptz, component text, hash text, body jsonb);
    when 'messages' then
      insert into messages (conv_id, id, author, body, format, parent, files, created_ts, updated_ts, deleted, head, lock_by, lock_at, lock_id, source, search)
      select r.conv_id, r.id, r.author, r.body, r.format, r.parent, r.files, r.created_ts, r.updated_ts, r.deleted, r.head,
             r.lock_by, r.lock_at, r.lock_id, r.source, parley_message_search(r.author, left(r.body, 200000), r.file_names)
        from jsonb_to_recordset(v_rows)
          as r(conv_id bigint, id integer, author text, body text, format text, parent integer, files jsonb, file_names text[],
               created_ts timestamptz, updated_ts timestamptz, deleted boolean, head integer, lock_by text, lock_at timestamptz,
               lock_id integer, source jsonb)
      on conflict (conv_id, id) do update set
        body = excluded.body, format = excluded.format, files = excluded.files, updated_ts = excluded.updated_ts,
        deleted = excluded.deleted, head = excluded.head, lock_by = excluded.lock_by, lock_at = excluded.lock_at,
        lock_id = excluded.lock_id, search = excluded.search;
    when 'attachments' then
      insert into attachments (conv_id, message_id, ordinal, sha256, name, content_type, size, content_id, inline)
      select r.conv_id, r.message_id, r.ordinal, r.sha256, r.name, r.content_type, r.size, r.content_id, r.inline
        from jsonb_to_recordset(v_rows)
          as r(conv_id bigint, message_id integer, ordinal integer, sha256 text, name text, content_type text, size bigint,
               content_id text, inline boolean)
      on conflict (conv_id, message_id, ordinal, sha256) do nothing;
    when 'participants' then
      insert into participants (conv_id, address, user_id, perms, added_id, head, removed_id, seen_id, last_event_ts)
      select r.conv_id, r.address, r.user_id, r.perms, r.added_id, r.head, r.removed_id, r.seen_id, r.last_event_ts
        from jsonb_to_recordset(v_rows)
          as r(conv_id bigint, address text, user_id bigint, perms text, added_id integer, head integer, removed_id integer,
               seen_id integer, last_event_ts timestamptz)
      on conflict (conv_id, address) do update set
        perms = excluded.perms, head = excluded.head, removed_id = excluded.removed_id, seen_id = excluded.seen_id;
    when 'conversations' then
      update conversations c set
        key = r.key, creator = r.creator, published = r.published, published_at = r.published_at, subject = r.subject,
        subject_head = r.subject_head, subject_lock_by = r.subject_lock_by, subject_lock_at = r.subject_lock_at,
        subject_lock_id = r.subject_lock_id, expiry = r.expiry, expiry_head = r.expiry_head, last_id = r.last_id,
        last_hash = r.last_hash, last_ts = r.last_ts, message_count = r.message_count,
        search_header = case when r.search_addresses is null then c.search_header
                             else parley_search_header(r.subject, r.search_addresses) end
        from jsonb_to_recordset(v_rows)
          as r(id bigint, key text, creator text, published boolean, published_at timestamptz, subject text, subject_head integer,
               subject_lock_by text, subject_lock_at timestamptz, subject_lock_id integer, expiry timestamptz,
               expiry_head integer, last_id integer, last_hash text, last_ts timestamptz, message_count integer,
               search_addresses text[])
       where c.id = r.id;
    when 'flags' then
      update participants p set inbox = coalesce(r.inbox, p.inbox), seen = coalesce(r.seen, p.seen), last_event_ts = r.last_event_ts
        from jsonb_to_recordset(v_rows) as r(conv_id bigint, address text, inbox boolean, seen boolean, last_event_ts timestamptz)
       where p.conv_id = r.conv_id and p.address = r.address;
    when 'snapshots' then
      update participants p set snapshot = r.snapshot
        from jsonb_to_recordset(v_rows) as r(conv_id bigint, address text, snapshot jsonb)
       where p.conv_id = r.conv_id and p.address = r.address;
    when 'events' then
      with ev0 as (select r.user_id, r.conv_id, r.kind, r.action_id, r.payload,
                          row_number() over (partition by r.user_id order by x.i) as ord
                     from jsonb_array_elements(v_rows) with ordinality as x(e, i)
                    cross join lateral jsonb_to_record(x.e)
                       as r(user_id bigint, conv_id bigint, kind text, action_id integer, payload jsonb)),
           inc as (select ev0.user_id as id, count(*)::int as n from ev0 group by ev0.user_id),
           locked as (select u.id from users u where u.id in (select inc.id from inc) order by u.id for no key update),
           upd as (update users u set stream_seq = u.stream_seq + inc.n
                     from inc join locked on locked.id = inc.id
                    where u.id = inc.id
                   returning u.id, u.stream_seq, inc.n),
           ins as (insert into user_events (user_id, seq, conv_id, kind, action_id, payload)
                   select e.user_id, upd.stream_seq - upd.n + e.ord, e.conv_id, e.kind, e.action_id, e.payload
                     from ev0 e join upd on upd.id = e.user_id
                   returning user_id, seq)
      select coalesce(jsonb_agg(jsonb_build_array(l.user_id, l.seq)), '[]') into v_ev
        from (select ins.user_id, max(ins.seq) as seq from ins group by ins.user_id) l;
      v_out := jsonb_set(v_out, '{events}', coalesce(v_out->'events', '[]') || v_ev);
    else
      raise exception 'parley_write_rows: unknown kind %', v_kind;
    end case;
  end loop;
  return v_out;
end $$;
