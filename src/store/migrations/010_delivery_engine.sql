-- Delivery engine and organisations (issue 4; PRODUCT.md §4; Voluble seed 002).

-- Organisations (tenants) that send to contacts.
create table organisations (
  id              bigserial primary key,
  slug            text not null unique,                 -- URL-safe name, e.g. "acme"
  name            text not null,
  user_id         bigint not null references users,     -- the organisation's own address (a local user of type 'shared' or 'bot')
  default_chain   text[] not null default '{smtp}',     -- servicechain: plugin names in order
  fallback        jsonb not null default '{}',          -- {"not_delivered_s": n, "not_read_s": n}: fall back when not delivered/read in time
  plugin_config   jsonb not null default '{}',          -- per plugin: {"webhook": {"url", "secret"}, "sms": {"base_url", "account", "token", "from"}}
  quota_per_day   integer not null default 100000,      -- messages per UTC day
  rate_per_minute integer not null default 6000,        -- messages per minute
  created_at      timestamptz not null default now()
);

create table organisation_members (
  org_id  bigint not null references organisations on delete cascade,
  user_id bigint not null references users on delete cascade,
  role    text not null check (role in ('owner','admin','member')),
  primary key (org_id, user_id)
);

-- API tokens of applications, scoped to one organisation.
create table api_tokens (
  id           text primary key,                 -- public id
  org_id       bigint not null references organisations on delete cascade,
  name         text not null default '',
  token_hash   text not null unique,             -- SHA-256 of the secret, hex
  scopes       text[] not null,                  -- e.g. {contacts:read, contacts:write, messages:send, blasts:send, deliveries:read, deliveries:write}
  created_by   bigint references users on delete set null,
  created_at   timestamptz not null default now(),
  last_used_at timestamptz,
  revoked_at   timestamptz
);

create table contacts (
  id              bigserial primary key,
  org_id          bigint not null references organisations on delete cascade,
  name            text not null default '',
  email           text,                           -- normalised address
  phone           text check (phone is null or phone ~ '^\+[1-9][0-9]{1,14}$'),  -- E.164
  preferred_chain text[],                         -- overrides the organisation's chain
  fields          jsonb not null default '{}',     -- template placeholders
  conv_id         bigint references conversations on delete set null,  -- the conversation with this contact
  created_at      timestamptz not null default now(),
  unique (org_id, email),
  unique (org_id, phone)
);

create table contact_groups (
  id     bigserial primary key,
  org_id bigint not null references organisations on delete cascade,
  name   text not null,
  unique (org_id, name)
);

create table contact_group_members (
  group_id   bigint not null references contact_groups on delete cascade,
  contact_id bigint not null references contacts on delete cascade,
  primary key (group_id, contact_id)
);

-- One message to a group, tracked as a whole.
create table blasts (
  id         bigserial primary key,
  org_id     bigint not null references organisations on delete cascade,
  group_id   bigint references contact_groups on delete set null,
  subject    text not null default '',
  template   text not null,
  chain      text[],
  total      integer not null default 0,
  created_by text not null default '',
  created_at timestamptz not null default now()
);

-- One message to one contact: a message:add in the conversation between the organisation and the contact.
create table outbound_messages (
  id              bigserial primary key,
  org_id          bigint not null references organisations on delete cascade,
  contact_id      bigint not null references contacts on delete cascade,
  blast_id        bigint references blasts on delete cascade,
  conv_id         bigint references conversations on delete set null,
  action_id       integer,
  subject         text not null default '',
  body            text not null,
  chain           text[] not null,
  client_key      text,                           -- the application's idempotency key
  created_at      timestamptz not null default now(),
  unique (org_id, client_key)
);
create index outbound_messages_blast on outbound_messages (blast_id);

alter table conversations add column org_id bigint references organisations on delete set null;

-- Servicechain state on each delivery (one row per recipient, moving down its chain).
alter table deliveries
  add column org_id              bigint references organisations on delete cascade,
  add column outbound_message_id bigint references outbound_messages on delete cascade,
  add column contact_id          bigint references contacts on delete set null,
  add column blast_id            bigint references blasts on delete cascade,
  add column chain               text[],            -- null → just `plugin`
  add column chain_index         integer not null default 0,
  add column destinations        jsonb,             -- plugin → destination (phone, email, url, address)
  add column fallback_at         timestamptz,       -- fall back down the chain if not delivered/read by then
  add column sent_at             timestamptz,
  add column delivered_at        timestamptz,
  add column read_at             timestamptz,
  add column replied_at          timestamptz;
create index deliveries_blast on deliveries (blast_id, state) where blast_id is not null;
create index deliveries_message on deliveries (outbound_message_id);
create index deliveries_provider_ref on deliveries (plugin, provider_ref) where provider_ref is not null;
create index deliveries_fallback on deliveries (fallback_at) where fallback_at is not null and state in ('sent','delivered');
create index deliveries_failed on deliveries (org_id, updated_at) where state = 'failed';

-- Receipts and replies reported by plugins' inbound handlers (delivered, read, replied, failed).
create table delivery_events (
  id           bigserial primary key,
  delivery_id  bigint not null references deliveries on delete cascade,
  at           timestamptz not null default now(),
  plugin       text not null,
  kind         text not null check (kind in ('delivered','read','replied','failed')),
  provider_ref text,
  detail       jsonb
);
create index delivery_events_delivery on delivery_events (delivery_id);
