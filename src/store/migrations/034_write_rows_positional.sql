-- parley_write_rows, cheaper per append (issue 2, Done means 7: append CPU per action and the
-- serial phase of group commit, docs/benchmarks.md "Where the append's time goes"). Measured
-- on replayed batches of 5 appends (instructions of the PostgreSQL backend per append, in
-- millions, for 033's function 1.57):
--   * user_events lost its two foreign keys (0.18): each event inserted ran two referential
--     checks, each an SPI query locking the parent row (FOR KEY SHARE) — ~45,000 instructions
--     apiece, four per append — for rows the same statement has just locked and updated (the
--     user) or the writing transaction holds locked (the conversation: lockConversation /
--     the group's lock read, or a row it inserted). What the keys guaranteed is kept: an
--     event is inserted only for a user whose row the statement locked and advanced (an
--     unknown user raises, as the key did), and deleting users or conversations still
--     deletes their events (the triggers below, as ON DELETE CASCADE did).
--   * rows arrive as positional JSON arrays instead of objects (0.09): building the batch's
--     jsonb (sorting and storing every key of every row) was a sixth of the function;
--   * stream events carry their number within their user's events of the batch (`ord`,
--     computed by the writer, src/streams/store.ts), so no window function and sort number
--     them here.
--
-- Kinds and row layouts (arrays, in this order; src/conversations/store.ts, effects.ts and
-- src/streams/store.ts encode them):
--   actions        [conv_id, id, act, actor, ts, component, hash, body]
--   messages       [conv_id, id, author, body, format, parent, files, created_ts, updated_ts,
--                   deleted, head, lock_by, lock_at, lock_id, source] — upserted, with the
--                   search vector of 002_search.sql (file names taken from `files`)
--   attachments    [conv_id, message_id, ordinal, sha256, name, content_type, size,
--                   content_id, inline] — existing (message, ordinal, file) kept
--   participants   [conv_id, address, user_id, perms, added_id, head, removed_id, seen_id,
--                   last_event_ts] — upserted (flags are the `flags` kind's)
--   conversations  [id, key, creator, published, published_at, subject, subject_head,
--                   subject_lock_by, subject_lock_at, subject_lock_id, expiry, expiry_head,
--                   last_id, last_hash, last_ts, message_count, search_addresses] — header
--                   update; the search header is rebuilt when search_addresses is an array
--   flags          [conv_id, address, inbox, seen, last_event_ts] — null flags unchanged
--   snapshots      [conv_id, address, snapshot]
--   events         [user_id, ord, conv_id, kind, action_id, payload] — `ord` numbers a
--                  user's events of the batch 1, 2, …; locks the users in id order (FOR NO
--                  KEY UPDATE, see src/streams/store.ts), advances stream_seq by each
--                  user's count and inserts the events as stream_seq - count + ord
-- Returns {"events": [[user_id, last seq], …]} when events were written, else {}.

alter table user_events drop constraint if exists user_events_conv_id_fkey;
alter table user_events drop constraint if exists user_events_user_id_fkey;

-- ON DELETE CASCADE of the dropped keys, one statement per deleting statement.
create function parley_user_events_of_deleted_users() returns trigger
language plpgsql as $$
begin
  delete from user_events e using gone where e.user_id = gone.id;
  return null;
end $$;
create trigger users_delete_events after delete on users
  referencing old table as gone for each statement execute function parley_user_events_of_deleted_users();

create function parley_user_events_of_deleted_conversations() returns trigger
language plpgsql as $$
begin
  delete from user_events e using gone where e.conv_id = gone.id;
  return null;
end $$;
create trigger conversations_delete_events after delete on conversations
  referencing old table as gone for each statement execute function parley_user_events_of_deleted_conversations();

drop function parley_write_rows(jsonb);

create function parley_write_rows(batch jsonb) returns jsonb
language plpgsql as $$
declare
  v_item jsonb;
  v_kind text;
  v_rows jsonb;
  v_out jsonb := '{}';
  v_ev jsonb;
  v_given bigint;
  v_written bigint;
begin
  for v_item in select value from jsonb_array_elements(batch) loop
    v_kind := v_item->>0;
    v_rows := v_item->1;
    case v_kind
    when 'actions' then
      insert into actions (conv_id, id, act, actor, ts, component, hash, body)
      select (r->>0)::bigint, (r->>1)::integer, r->>2, r->>3, (r->>4)::timestamptz, r->>5, r->>6, r->7
        from jsonb_array_elements(v_rows) r;
    when 'messages' then
      insert into messages (conv_id, id, author, body, format, parent, files, created_ts, updated_ts, deleted, head, lock_by, lock_at, lock_id, source, search)
      select m.conv_id, m.id, m.author, m.body, m.format, m.parent, m.files, m.created_ts, m.updated_ts, m.deleted, m.head,
             m.lock_by, m.lock_at, m.lock_id, m.source,
             parley_message_search(m.author, left(m.body, 200000),
                                   case when m.files = '[]' then '{}'::text[]
                                        else array(select f->>'name' from jsonb_array_elements(m.files) f) end)
        from (select (r->>0)::bigint as conv_id, (r->>1)::integer as id, r->>2 as author, r->>3 as body, r->>4 as format,
                     (r->>5)::integer as parent, r->6 as files, (r->>7)::timestamptz as created_ts, (r->>8)::timestamptz as updated_ts,
                     (r->>9)::boolean as deleted, (r->>10)::integer as head, r->>11 as lock_by, (r->>12)::timestamptz as lock_at,
                     (r->>13)::integer as lock_id, nullif(r->14, 'null') as source
                from jsonb_array_elements(v_rows) r) m
      on conflict (conv_id, id) do update set
        body = excluded.body, format = excluded.format, files = excluded.files, updated_ts = excluded.updated_ts,
        deleted = excluded.deleted, head = excluded.head, lock_by = excluded.lock_by, lock_at = excluded.lock_at,
        lock_id = excluded.lock_id, search = excluded.search;
    when 'attachments' then
      insert into attachments (conv_id, message_id, ordinal, sha256, name, content_type, size, content_id, inline)
      select (r->>0)::bigint, (r->>1)::integer, (r->>2)::integer, r->>3, r->>4, r->>5, (r->>6)::bigint, r->>7, (r->>8)::boolean
        from jsonb_array_elements(v_rows) r
      on conflict (conv_id, message_id, ordinal, sha256) do nothing;
    when 'participants' then
      insert into participants (conv_id, address, user_id, perms, added_id, head, removed_id, seen_id, last_event_ts)
      select (r->>0)::bigint, r->>1, (r->>2)::bigint, r->>3, (r->>4)::integer, (r->>5)::integer, (r->>6)::integer,
             (r->>7)::integer, (r->>8)::timestamptz
        from jsonb_array_elements(v_rows) r
      on conflict (conv_id, address) do update set
        perms = excluded.perms, head = excluded.head, removed_id = excluded.removed_id, seen_id = excluded.seen_id;
    when 'conversations' then
      update conversations c set
        key = r->>1, creator = r->>2, published = (r->>3)::boolean, published_at = (r->>4)::timestamptz, subject = r->>5,
        subject_head = (r->>6)::integer, subject_lock_by = r->>7, subject_lock_at = (r->>8)::timestamptz,
        subject_lock_id = (r->>9)::integer, expiry = (r->>10)::timestamptz, expiry_head = (r->>11)::integer,
        last_id = (r->>12)::integer, last_hash = r->>13, last_ts = (r->>14)::timestamptz, message_count = (r->>15)::integer,
        search_header = case when jsonb_typeof(r->16) = 'array'
                             then parley_search_header(r->>5, array(select jsonb_array_elements_text(r->16)))
                             else c.search_header end
        from jsonb_array_elements(v_rows) r
       where c.id = (r->>0)::bigint;
    when 'flags' then
      update participants p set inbox = coalesce((r->>2)::boolean, p.inbox), seen = coalesce((r->>3)::boolean, p.seen),
                                last_event_ts = (r->>4)::timestamptz
        from jsonb_array_elements(v_rows) r
       where p.conv_id = (r->>0)::bigint and p.address = r->>1;
    when 'snapshots' then
      update participants p set snapshot = r->2
        from jsonb_array_elements(v_rows) r
       where p.conv_id = (r->>0)::bigint and p.address = r->>1;
    when 'events' then
      with ev as (select (r->>0)::bigint as user_id, (r->>1)::integer as ord, (r->>2)::bigint as conv_id, r->>3 as kind,
                         (r->>4)::integer as action_id, nullif(r->5, 'null') as payload
                    from jsonb_array_elements(v_rows) r),
           inc as (select ev.user_id as id, max(ev.ord) as n from ev group by ev.user_id),
           locked as (select u.id from users u where u.id in (select inc.id from inc) order by u.id for no key update),
           upd as (update users u set stream_seq = u.stream_seq + inc.n
                     from inc join locked on locked.id = inc.id
                    where u.id = inc.id
                   returning u.id, u.stream_seq, inc.n),
           ins as (insert into user_events (user_id, seq, conv_id, kind, action_id, payload)
                   select e.user_id, upd.stream_seq - upd.n + e.ord, e.conv_id, e.kind, e.action_id, e.payload
                     from ev e join upd on upd.id = e.user_id
                   returning 1)
      select coalesce(jsonb_agg(jsonb_build_array(upd.id, upd.stream_seq)), '[]'), (select count(*) from ins)
        into v_ev, v_written
        from upd;
      v_given := jsonb_array_length(v_rows);
      if v_written <> v_given then
        raise exception 'parley_write_rows: % of % stream events name no user', v_given - v_written, v_given
          using errcode = 'foreign_key_violation';
      end if;
      v_out := jsonb_set(v_out, '{events}', coalesce(v_out->'events', '[]') || v_ev);
    else
      raise exception 'parley_write_rows: unknown kind %', v_kind;
    end case;
  end loop;
  return v_out;
end $$;
