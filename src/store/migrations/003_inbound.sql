-- Inbound email (issue 2 §6): find an earlier copy of a message without Message-ID by its
-- raw bytes' SHA-256 (idempotent ingest and import), and list failed/received messages.
create index inbound_emails_raw on inbound_emails (raw_sha256);
create index inbound_emails_status on inbound_emails (status) where status in ('received', 'failed');
