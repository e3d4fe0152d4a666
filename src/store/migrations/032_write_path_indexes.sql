-- Indexes every append maintained and no query uses (issue 2, Done means 7: append CPU per
-- action; docs/benchmarks.md, append section). pg_stat_user_indexes over an append run
-- showed each with no scan of its own:
--   * messages_search (GIN on messages.search): search tests the caller's own conversations
--     one by one (src/search/search.ts: `vm.conv_id = c.id … and vm.search @@ q`, through
--     the primary key), never a scan of the whole table by lexeme; a GIN insert was the
--     largest part of storing a message.
--   * messages_head, participants_head ((conv_id, head)): every lookup by conversation uses
--     the primary keys (conv_id, id) and (conv_id, address), whose first column is the same;
--     `head` is only ever a filter after conv_id (parley_visible_messages). A participant's
--     flags change on every action it sees, so participants_head took a new entry each time.
drop index if exists messages_search;
drop index if exists messages_head;
drop index if exists participants_head;
