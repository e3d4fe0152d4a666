-- Parley core schema: accounts, conversations (the action log and its materialised state),
-- per-user flags and labels, per-user event streams, blobs, email threading, deliveries.
-- See docs/architecture.md for how the tables serve the write path.

create table users (
  id            bigserial primary key,
  address       text not null unique,            -- local@domain, lowercased
  name          text not null default '',        -- full name
  common_name   text not null default '',
  type          text not null default 'user' check (type in ('user','alias','bot','shared')),
  status        text not null default 'active' check (status in ('active','away','dormant','suspended')),
  timezone      text not null default 'UTC',
  password_hash text,
  is_admin      boolean not null default false,
  stream_seq    bigint not null default 0,         -- last sequence number of the user's stream
  created_at    timestamptz not null default now()
);

create table sessions (
  id           text primary key,                  -- public id (listing, revoking)
  token_hash   text not null unique,              -- SHA-256 of the secret token, hex
  user_id      bigint not null references users on delete cascade,
  kind         text not null check (kind in ('cookie','bearer')),
  device       text not null default '',
  ip           text not null default '',
  created_at   timestamptz not null default now(),
  last_seen_at timestamptz not null default now(),
  expires_at   timestamptz not null,
  revoked_at   timestamptz
);
create index sessions_user on sessions (user_id);

create table login_failures (
  id         bigserial primary key,
  address    text not null,
  ip         text not null,
  at         timestamptz not null default now()
);
create index login_failures_address on login_failures (address, at);
create index login_failures_ip on login_failures (ip, at);

create table conversations (
  id               bigserial primary key,
  key              text not null unique,           -- published key, or the draft key before publish
  draft_key        text unique,                    -- the key the conversation had as a draft
  creator          text not null,
  leader           text not null,                  -- domain of the platform that numbers actions
  published        boolean not null default false,
  published_at     timestamptz,
  created_at       timestamptz not null,
  subject          text not null default '',
  subject_head     integer not null default 1,
  subject_lock_by  text,
  subject_lock_at  timestamptz,
  subject_lock_id  integer,
  expiry           timestamptz,
  expiry_head      integer not null default 1,
  last_id          integer not null default 0,
  last_hash        text,
  last_ts          timestamptz,
  message_count    integer not null default 0,
  search_header    tsvector                        -- subject + participants
);

-- The log. `body` is the complete wire form of the action (canonical JSON source of `hash`).
create table actions (
  conv_id    bigint not null references conversations on delete cascade,
  id         integer not null,
  act        text not null,
  actor      text not null,
  ts         timestamptz not null,
  component  text,                                   -- 'subject' | 'expiry' | 'msg:<id>' | 'prt:<address>'
  hash       text not null,
  body       jsonb not null,
  primary key (conv_id, id)
);

create table messages (
  conv_id     bigint not null references conversations on delete cascade,
  id          integer not null,                      -- id of its message:add action
  author      text not null,
  body        text not null,
  format      text not null default 'plain',
  parent      integer,
  files       jsonb not null default '[]',
  created_ts  timestamptz not null,
  updated_ts  timestamptz,
  deleted     boolean not null default false,
  head        integer not null,
  lock_by     text,
  lock_at     timestamptz,
  lock_id     integer,
  source      jsonb,                                 -- e.g. {"kind":"email","message_id":…,"warnings":[…]}
  search      tsvector,
  primary key (conv_id, id)
);
create index messages_search on messages using gin (search);
create index messages_head on messages (conv_id, head);

-- Participants of a conversation, with the per-user state of local users.
create table participants (
  conv_id       bigint not null references conversations on delete cascade,
  address       text not null,
  user_id       bigint references users on delete set null,   -- set for local users
  perms         text not null check (perms in ('full','write','read')),
  added_id      integer not null,
  head          integer not null,
  removed_id    integer,                                       -- action that removed them
  seen_id       integer not null default 0,                    -- last action id they marked seen
  -- per-user flags (local users only; em2 folder rules in src/core/folders.ts)
  inbox         boolean not null default false,
  deleted       boolean not null default false,
  spam          boolean not null default false,
  seen          boolean not null default true,
  muted         boolean not null default false,
  last_event_ts timestamptz,                                   -- ordering of the user's list
  snapshot      jsonb,                                         -- {subject, last_ts, message_count} at removal
  primary key (conv_id, address)
);
create index participants_user on participants (user_id, last_event_ts desc, conv_id desc) where user_id is not null;
create index participants_head on participants (conv_id, head);

create table labels (
  id          bigserial primary key,
  user_id     bigint not null references users on delete cascade,
  name        text not null,
  color       text not null default '#888888',
  ordering    integer not null default 0,
  description text not null default '',
  unique (user_id, name)
);

create table conversation_labels (
  label_id bigint not null references labels on delete cascade,
  conv_id  bigint not null references conversations on delete cascade,
  user_id  bigint not null references users on delete cascade,
  primary key (label_id, conv_id)
);
create index conversation_labels_user on conversation_labels (user_id, conv_id);

-- Each user's ordered stream of events (device sync and websockets read it by cursor).
create table user_events (
  user_id    bigint not null references users on delete cascade,
  seq        bigint not null,
  conv_id    bigint not null references conversations on delete cascade,
  kind       text not null,                  -- 'action' | 'flags' | 'labels' | 'conversation'
  action_id  integer,
  payload    jsonb,
  created_at timestamptz not null default now(),
  primary key (user_id, seq)
);

-- Content-addressed blobs; the bytes live on disk under dataDir/blobs/ab/cd/<sha256>.
create table blobs (
  sha256       text primary key,
  size         bigint not null,
  content_type text not null default 'application/octet-stream',
  uploaded_by  bigint references users on delete set null,
  created_at   timestamptz not null default now()
);

-- Files attached to messages (authorises downloads, feeds search by file name).
create table attachments (
  conv_id      bigint not null references conversations on delete cascade,
  message_id   integer not null,
  ordinal      integer not null,
  sha256       text not null references blobs,
  name         text not null,
  content_type text not null,
  size         bigint not null,
  content_id   text,
  inline       boolean not null default false,
  primary key (conv_id, message_id, ordinal)
);
create index attachments_sha on attachments (sha256);

-- Message-IDs of emails received or sent for a conversation (threading, idempotent import).
create table email_messages (
  id          bigserial primary key,
  conv_id     bigint not null references conversations on delete cascade,
  message_id  text not null,                 -- RFC 5322 msg-id without angle brackets
  direction   text not null check (direction in ('in','out')),
  action_id   integer,
  created_at  timestamptz not null default now(),
  unique (conv_id, message_id)
);
create index email_messages_mid on email_messages (message_id);

-- Every inbound email, committed (raw bytes on disk) before SMTP 250 is answered.
create table inbound_emails (
  id            bigserial primary key,
  raw_sha256    text not null references blobs,
  mail_from     text not null default '',
  rcpt_to       text[] not null,
  remote_ip     text not null default '',
  helo          text not null default '',
  received_at   timestamptz not null default now(),
  status        text not null check (status in ('received','ingested','duplicate','failed')),
  conv_id       bigint references conversations on delete set null,
  error         text,
  auth          jsonb
);

-- The transactional outbox: one row per transmission, created in the writing transaction.
create table deliveries (
  id              bigserial primary key,
  conv_id         bigint references conversations on delete cascade,
  action_id       integer,
  plugin          text not null,                   -- 'smtp' | 'parley' | 'webhook' | 'sms' …
  destination     text not null,                   -- email address, platform domain, URL, phone
  state           text not null default 'pending'
                  check (state in ('pending','sending','sent','delivered','read','replied','failed','cancelled')),
  attempts        integer not null default 0,
  next_attempt_at timestamptz not null default now(),
  expires_at      timestamptz,                     -- give up after this
  last_error      text,
  provider_ref    text,
  idempotency_key text not null unique,
  payload         jsonb not null default '{}',
  locked_by       text,
  locked_until    timestamptz,
  created_at      timestamptz not null default now(),
  updated_at      timestamptz not null default now()
);
create index deliveries_due on deliveries (next_attempt_at) where state in ('pending','sending');
create index deliveries_conv on deliveries (conv_id, action_id);

create table delivery_attempts (
  id           bigserial primary key,
  delivery_id  bigint not null references deliveries on delete cascade,
  at           timestamptz not null default now(),
  plugin       text not null,
  outcome      text not null check (outcome in ('accepted','retry','failed')),
  error        text,
  provider_ref text,
  duration_ms  integer not null default 0,
  worker       text not null default ''
);
create index delivery_attempts_delivery on delivery_attempts (delivery_id);

-- Who uploaded a blob (download rights before the file is attached to a message).
create table blob_uploaders (
  sha256  text not null references blobs on delete cascade,
  user_id bigint not null references users on delete cascade,
  primary key (sha256, user_id)
);
