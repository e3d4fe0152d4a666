-- Accounts (issue 2 §3): login throttling prunes failures older than its window on every
-- attempt (src/accounts/throttle.ts); this index keeps that delete cheap.
create index if not exists login_failures_at on login_failures (at);
