-- Conversation replication between platforms (issue 3 §4–6, §8; docs/federation.md,
-- "Replication"). `conversations.leader` (001) names the platform that numbers a
-- conversation's actions: this platform's primary domain for the conversations it created,
-- the signer of action 1 for a replica.

-- On the leader: participants whose domain is served by another Parley platform (remote
-- participants: replicated to, never emailed), decided once when they are added.
create table federation_participants (
  conv_id   bigint not null references conversations on delete cascade,
  address   text not null,
  platform  text not null,                        -- the platform's name (its primary domain)
  primary key (conv_id, address)
);

-- On the leader: the outbox of replication, one cursor per (conversation, destination
-- platform). A link is due while acked_id < coalesce(stop_id, conversations.last_id) and
-- next_attempt_at has passed; the pusher (src/federation/pusher.ts) claims it with a lease.
create table federation_links (
  conv_id          bigint not null references conversations on delete cascade,
  platform         text not null,
  acked_id         integer not null default 0,     -- the platform stored every action up to this id
  stop_id          integer,                        -- removal of its last participant: nothing after it is sent
  next_attempt_at  timestamptz not null default now(),
  attempts         integer not null default 0,     -- failed attempts in a row (backoff)
  last_error       text,
  locked_until     timestamptz,                    -- lease of the pusher working on it
  updated_at       timestamptz not null default now(),
  primary key (conv_id, platform)
);
create index federation_links_due on federation_links (next_attempt_at);

-- On a follower: its users' actions proposed to the leader (issue 3 §4), kept until the
-- leader has numbered them (applied) or refused them (failed). `actions` are the complete
-- signed actions as last proposed (the leader deduplicates them by id and hash); `inputs` are
-- the user's intent, rebuilt on a newer head when the leader answers stale_head.
create table federation_proposals (
  id               bigserial primary key,
  conv_id          bigint not null references conversations on delete cascade,
  leader           text not null,
  actor            text not null,
  inputs           jsonb not null,
  actions          jsonb not null,
  state            text not null default 'pending' check (state in ('pending', 'applied', 'failed')),
  attempts         integer not null default 0,
  next_attempt_at  timestamptz not null default now(),
  locked_until     timestamptz,
  last_error       text,
  error_code       text,
  created_at       timestamptz not null default now(),
  updated_at       timestamptz not null default now()
);
create index federation_proposals_pending on federation_proposals (conv_id, id) where state = 'pending';
create index federation_proposals_due on federation_proposals (next_attempt_at) where state = 'pending';
