-- The console's hourly rollup counts decisions, not rows (issue 21): a throttled summary of
-- 600 refused handshakes is 600 in the overview, as in `devicegate audit summary`
-- (provisioning/audit/counting.py: detail.count, formerly detail.refused). `events` now
-- holds decisions; `rows` the rows, which the filler compares with an index-only count of
-- auth_events to find hours that got late events. Peer hosts are cut by host, not at the
-- last ':' (a bare IPv4 or IPv6 address was cut wrongly). The rows filled before are
-- dropped and the filler counts the backfill window again.
ALTER TABLE auth_event_hourly ADD COLUMN rows bigint NOT NULL DEFAULT 0;
DELETE FROM auth_event_hourly;
DELETE FROM auth_event_hourly_denials;
UPDATE auth_event_rollup SET filled_from = NULL, filled_upto = NULL, reconciled_at = NULL;
