-- Full-text search (issue 2, "Search"; src/search/). The tsvector columns
-- conversations.search_header and messages.search are built by the functions below, both
-- when the write path stores a row (src/conversations/store.ts persistState) and when a
-- search rebuilds what a removed participant saw. Tokens:
--   * text (subject, body): to_tsvector('english') — stemmed, with positions, for phrases
--     and stemmed matches — plus the unstemmed 'simple' lexemes without positions, so a
--     prefix of the word as typed matches too ('organiz' → 'organization');
--   * addresses: the whole address, the local part, its pieces split at . + _ -, the
--     domain and its parent domains ('bob.smith@mail.example.com' → 'bob.smith@…',
--     'bob.smith', 'bob', 'smith', 'mail.example.com', 'example.com');
--   * file names: the whole name, its pieces split at anything but letters and digits,
--     and their English stems ('Q3-Report.pdf' → 'q3-report.pdf', 'q3', 'report', 'pdf').
-- Weights (for ranking only): subject A, everything else unweighted (D).
-- No new index: a search tests the caller's own conversations one by one (src/search/
-- search.ts), which measured faster than a GIN scan of the whole table for common words.

-- The functions are PL/pgSQL: they run for every message and conversation written, and
-- plain SQL functions with sub-selects are neither inlined nor cheap to call.

-- Lexemes of an email address (lowercased), see above. Empty pieces are dropped.
create function parley_address_lexemes(addr text) returns text[]
language plpgsql immutable strict parallel safe as $$
declare
  a text := lower(addr);
  at_pos integer := position('@' in a);
  local_part text := a;
  domain text := '';
  labels text[];
  out text[];
  i integer;
begin
  if at_pos > 0 then
    at_pos := length(a) - position('@' in reverse(a)) + 1;   -- the last '@'
    local_part := left(a, at_pos - 1);
    domain := substr(a, at_pos + 1);
  end if;
  out := array[a, local_part, domain] || regexp_split_to_array(local_part, '[.+_-]+');
  labels := string_to_array(domain, '.');
  -- parent domains with at least two labels: mail.example.com → example.com
  for i in 2 .. coalesce(array_length(labels, 1), 0) - 1 loop
    out := out || array_to_string(labels[i:], '.');
  end loop;
  return array_remove(array_remove(out, ''), null);
end $$;

-- True when some lexeme of `addr` starts with `prefix` (already lowercased): `from:bob`,
-- `to:example.com`, `includes:bob@ex` all match bob@example.com.
create function parley_address_matches(addr text, prefix text) returns boolean
language plpgsql immutable strict parallel safe as $$
declare
  l text;
begin
  foreach l in array parley_address_lexemes(addr) loop
    if starts_with(l, prefix) then return true; end if;
  end loop;
  return false;
end $$;

-- Lexemes of a file name, see above.
create function parley_file_name_lexemes(name text) returns text[]
language plpgsql immutable strict parallel safe as $$
begin
  return array_remove(lower(name) || regexp_split_to_array(lower(name), '[^[:alnum:]]+'), '');
end $$;

-- Lexemes as a tsvector without positions; pieces longer than a lexeme may be are dropped.
create function parley_lexeme_vector(lexemes text[]) returns tsvector
language plpgsql immutable parallel safe as $$
declare
  l text;
  keep text[] := '{}';
begin
  foreach l in array coalesce(lexemes, '{}') loop
    if l is not null and l <> '' and octet_length(l) < 2048 then keep := keep || l; end if;
  end loop;
  return array_to_tsvector(keep);
end $$;

-- Searchable text: English stems with positions plus unstemmed words without positions.
create function parley_text_vector(t text) returns tsvector
language sql immutable strict parallel safe as $$
  select to_tsvector('english', t) || strip(to_tsvector('simple', t))
$$;

-- conversations.search_header: the subject (weight A) and every participant address.
create function parley_search_header(subject text, participants text[]) returns tsvector
language plpgsql immutable parallel safe as $$
declare
  p text;
  lexemes text[] := '{}';
begin
  foreach p in array coalesce(participants, '{}') loop
    lexemes := lexemes || parley_address_lexemes(p);
  end loop;
  return setweight(parley_text_vector(coalesce(subject, '')), 'A') || parley_lexeme_vector(lexemes);
end $$;

-- messages.search: the body, the author's address and the names of the attached files.
create function parley_message_search(author text, body text, file_names text[]) returns tsvector
language plpgsql immutable parallel safe as $$
declare
  f text;
  lexemes text[] := coalesce(parley_address_lexemes(author), '{}');
  v tsvector := parley_text_vector(coalesce(body, ''));
begin
  if cardinality(file_names) > 0 then
    foreach f in array file_names loop
      lexemes := lexemes || coalesce(parley_file_name_lexemes(f), '{}');
    end loop;
    v := v || strip(to_tsvector('english', regexp_replace(array_to_string(file_names, ' '), '[^[:alnum:]]+', ' ', 'g')));
  end if;
  return v || parley_lexeme_vector(lexemes);
end $$;

-- A message as it was just after action `upto` (from the log): body, format, files and
-- whether it was deleted then. Used for removed participants, who see the conversation as
-- at their removal, for messages changed after it.
create function parley_message_at(p_conv bigint, p_msg integer, p_upto integer)
returns table (body text, format text, files jsonb, deleted boolean)
language sql stable parallel safe as $$
  select (select a.body->>'body' from actions a
           where a.conv_id = p_conv and a.component = 'msg:' || p_msg and a.id <= p_upto
             and a.act in ('message:add', 'message:modify') and a.body ? 'body'
           order by a.id desc limit 1),
         coalesce((select a.body->>'format' from actions a
                    where a.conv_id = p_conv and a.component = 'msg:' || p_msg and a.id <= p_upto
                      and a.act in ('message:add', 'message:modify') and a.body ? 'format'
                    order by a.id desc limit 1), 'plain'),
         coalesce((select a.body->'files' from actions a
                    where a.conv_id = p_conv and a.component = 'msg:' || p_msg and a.id <= p_upto
                      and a.act in ('message:add', 'message:modify') and jsonb_typeof(a.body->'files') = 'array'
                    order by a.id desc limit 1), '[]'::jsonb),
         coalesce((select a.act = 'message:delete' from actions a
                    where a.conv_id = p_conv and a.component = 'msg:' || p_msg and a.id <= p_upto
                      and a.act in ('message:delete', 'message:recover')
                    order by a.id desc limit 1), false)
$$;

-- The messages of a conversation a participant may search: every message not deleted for an
-- active participant (p_upto null); for one removed at action p_upto, the messages added up
-- to it, each as it was then (deleted ones left out). PL/pgSQL so that it is planned once
-- per session, not inlined into every search.
create function parley_visible_messages(p_conv bigint, p_upto integer)
returns table (id integer, author text, body text, format text, files jsonb, search tsvector)
language plpgsql stable parallel safe as $$
begin
  return query
    select m.id, m.author, m.body, m.format, m.files, m.search
      from messages m
     where m.conv_id = p_conv and not m.deleted and (p_upto is null or m.head <= p_upto);
  if p_upto is not null then
    return query
      select m.id, m.author, h.body, h.format, h.files,
             parley_message_search(m.author, left(h.body, 200000),
                                   array(select f->>'name' from jsonb_array_elements(h.files) f))
        from messages m cross join lateral parley_message_at(p_conv, m.id, p_upto) h
       where m.conv_id = p_conv and m.id <= p_upto and m.head > p_upto
         and not h.deleted and h.body is not null;
  end if;
end $$;

-- Rebuild the vectors of rows written before this migration with the tokens above.
update conversations c
   set search_header = parley_search_header(c.subject, array(select p.address from participants p where p.conv_id = c.id));
update messages m
   set search = parley_message_search(m.author, left(m.body, 200000),
                                      array(select f->>'name' from jsonb_array_elements(m.files) f));
