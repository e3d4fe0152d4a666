-- Delivery engine, engine half (issue 4): per-step servicechain state, per-row fallback
-- windows, receipts that arrive before their attempt is recorded, and an audit trail of
-- fallbacks and operator actions on dead letters. See docs/delivery.md.

alter table deliveries
  -- the caller's idempotency key; each chain step's key is `<idempotency_base>:<plugin>`
  add column idempotency_base text unique,
  -- when the current chain step began (its retry policy's max age counts from here)
  add column step_started_at  timestamptz,
  -- {"not_delivered_s": n, "not_read_s": n}: time-window fallback of this row
  add column fallback_policy  jsonb;

-- A receipt names the provider's reference, which may belong to an earlier chain step.
create index delivery_attempts_provider_ref on delivery_attempts (plugin, provider_ref) where provider_ref is not null;
-- Replies by channel address (an SMS reply names only the contact's phone number).
create index deliveries_org_destination on deliveries (org_id, plugin, destination) where org_id is not null;

-- Events may arrive before their delivery is known (a receipt racing the attempt's record,
-- a reply from an unknown number): kept with delivery_id null and matched later.
alter table delivery_events
  alter column delivery_id drop not null,
  add column org_id bigint references organisations on delete cascade,
  drop constraint delivery_events_kind_check,
  add constraint delivery_events_kind_check
    check (kind in ('delivered','read','replied','failed','fallback','retried','cancelled'));
create index delivery_events_unmatched on delivery_events (plugin, provider_ref) where delivery_id is null;
