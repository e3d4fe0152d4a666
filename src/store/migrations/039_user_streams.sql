-- Users' stream positions in a table of their own (issue 2, Done means 7: PostgreSQL's work
-- per append). Every append advances the position of each local participant (the stream
-- events of parley_write_rows, 034_write_rows_positional.sql); on `users` that wrote a new
-- version of the whole user row (address, names, password hash…) to the heap and the WAL
-- each time, and evaluated the row's two CHECK constraints — whose expressions PostgreSQL
-- rebuilds for every statement that updates the table. `user_streams` holds the position
-- alone: one narrow row per user, created with the user (the trigger below) and deleted
-- with it. Same locking as before: the statement locks the rows it advances in user-id
-- order (FOR NO KEY UPDATE), so concurrent transactions wait for each other's commit and
-- never deadlock, and a user's events are numbered in commit order without gaps.

create table user_streams (
  user_id bigint primary key references users on delete cascade,
  seq     bigint not null default 0            -- last sequence number of the user's stream
);
insert into user_streams (user_id, seq) select id, stream_seq from users;
alter table users drop column stream_seq;

create function parley_user_streams_of_new_users() returns trigger
language plpgsql as $$
begin
  insert into user_streams (user_id) select id from created;
  return null;
end $$;
create trigger users_create_stream after insert on users
  referencing new table as created for each statement execute function parley_user_streams_of_new_users();

-- 034's function, its `events` kind advancing user_streams; with 036's settings.
create or replace function parley_write_rows(batch jsonb) returns jsonb
language plpgsql set enable_seqscan = off set enable_hashjoin = off set enable_mergejoin = off as $$
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
           locked as (select s.user_id as id from user_streams s where s.user_id in (select inc.id from inc)
                       order by s.user_id for no key update),
           upd as (update user_streams s set seq = s.seq + inc.n
                     from inc join locked on locked.id = inc.id
                    where s.user_id = inc.id
                   returning s.user_id as id, s.seq as stream_seq, inc.n),
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
