-- Federation foundations (issue 3 §1–2; docs/federation.md).

-- The platform's Ed25519 signing keys. At most one is active (retired_at is null): it signs
-- requests and actions. Every key, active or retired, verifies what was signed between its
-- created_at and its not_after, and is published at GET /.well-known/parley/keys.
create table platform_keys (
  key_id       text primary key,                 -- first 16 hex digits of SHA-256(raw public key)
  public_key   text not null,                    -- raw 32-byte Ed25519 public key, base64url, no padding
  private_key  text not null,                    -- PKCS#8 PEM: a secret (docs/federation.md, "Protecting the key")
  created_at   timestamptz not null,
  not_after    timestamptz not null,             -- end of validity for verification
  retired_at   timestamptz                       -- when a newer key replaced it for signing
);
create unique index platform_keys_one_active on platform_keys ((true)) where retired_at is null;

-- Signatures of federation requests already accepted, kept until they could no longer pass
-- the clock-skew check: a replayed request is refused by every process of the platform.
create table federation_replay (
  id          text primary key,                  -- hex SHA-256 of keyid, LF, signature bytes
  expires_at  timestamptz not null
);
create index federation_replay_expires on federation_replay (expires_at);
