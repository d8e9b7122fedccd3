-- Hourly rollup of auth_events for the console's day and week overview
-- (provisioning/console/rollup.py). Filled by the provisioning service, hour by hour once an
-- hour is over, not by a trigger: a row trigger on the partitioned event table would tax
-- every gateway COPY. Rows are exact counts of the hours in [filled_from, filled_upto);
-- the overview reads them and aggregates only the hours after filled_upto from auth_events.

-- Events per hour by admission (type tls_handshake or connect), outcome and reason.
CREATE TABLE auth_event_hourly (
    hour        timestamptz NOT NULL,
    connection  boolean NOT NULL,
    outcome     text NOT NULL,
    reason      text NOT NULL,
    events      bigint NOT NULL,
    PRIMARY KEY (hour, connection, outcome, reason)
);

-- Denied events per hour by device id (device) or by peer host, the address up to its
-- last ':' (NOT device).
CREATE TABLE auth_event_hourly_denials (
    hour    timestamptz NOT NULL,
    device  boolean NOT NULL,
    value   text NOT NULL,
    events  bigint NOT NULL,
    PRIMARY KEY (hour, device, value)
);

-- The filler's one row: which hours are filled, the last audit prune already applied
-- (a prune drops events: the hours it touched are recomputed), and the last pass looking
-- for events stored late into filled hours. SELECT ... FOR UPDATE SKIP LOCKED on it keeps
-- the fillers of several provisioning replicas from running at once.
CREATE TABLE auth_event_rollup (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    filled_from    timestamptz,
    filled_upto    timestamptz,
    prune_id       bigint NOT NULL DEFAULT 0,
    reconciled_at  timestamptz,
    CHECK (filled_from <= filled_upto)
);
INSERT INTO auth_event_rollup DEFAULT VALUES;
