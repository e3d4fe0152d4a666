-- Organisations' application API (issue 4 §5; docs/organisations.md): what 010 lacks.

-- An outbound message is "prepared" once its conversation action and its delivery exist.
-- A single message is prepared in the request's transaction; the messages of a blast are
-- inserted when the blast is created and prepared in the background in chunks (resumable:
-- a chunk claims unprepared rows with FOR UPDATE SKIP LOCKED and prepares each at most once).
alter table outbound_messages
  add column prepared_at timestamptz,           -- null: not prepared yet (blast messages only)
  add column error       text,                  -- why it could not be prepared (no delivery; counted failed)
  add column author      text not null default ''; -- who wrote it: the organisation's address, or a member replying
create index outbound_messages_org_created on outbound_messages (org_id, created_at);
create index outbound_messages_org_prepared on outbound_messages (org_id, prepared_at) where prepared_at is not null;
create index outbound_messages_unprepared on outbound_messages (blast_id, id) where prepared_at is null and error is null;
create index outbound_messages_contact on outbound_messages (contact_id, id);
create index outbound_messages_org_id on outbound_messages (org_id, id);

-- Blasts: the application's idempotency key, and when every message was prepared.
alter table blasts
  add column client_key  text,
  add column prepared_at timestamptz,
  add constraint blasts_org_client_key unique (org_id, client_key);
create index blasts_unprepared on blasts (id) where prepared_at is null;

create index contacts_conv on contacts (conv_id) where conv_id is not null;
create index contacts_org_id on contacts (org_id, id);
create index contact_group_members_contact on contact_group_members (contact_id);
create index organisation_members_user on organisation_members (user_id);
create index api_tokens_org on api_tokens (org_id);
create index conversations_org on conversations (org_id) where org_id is not null;
