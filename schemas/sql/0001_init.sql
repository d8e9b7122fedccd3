-- devicegate schema, version 1: fleets, bootstrap tokens, devices, certificates,
-- admin keys, and the partitioned, hash-chained auth event log.

CREATE TABLE fleets (
    name        text PRIMARY KEY CHECK (name ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE bootstrap_tokens (
    id              uuid PRIMARY KEY,
    token_hash      bytea NOT NULL UNIQUE,          -- sha256 of the secret; the secret is never stored
    fleet           text NOT NULL REFERENCES fleets (name),
    uses_allowed    integer NOT NULL CHECK (uses_allowed > 0),
    uses_left       integer NOT NULL CHECK (uses_left >= 0),
    allow_reenroll  boolean NOT NULL DEFAULT false,
    note            text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL,
    revoked_at      timestamptz,
    CHECK (uses_left <= uses_allowed)
);

CREATE TABLE devices (
    device_id    text PRIMARY KEY,
    fleet        text NOT NULL REFERENCES fleets (name),
    hardware_id  text UNIQUE,
    status       text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled', 'revoked')),
    token_id     uuid REFERENCES bootstrap_tokens (id),
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX devices_fleet_idx ON devices (fleet);

CREATE TABLE certificates (
    serial              text PRIMARY KEY,           -- lowercase hex, no leading zeros
    device_id           text NOT NULL REFERENCES devices (device_id),
    fingerprint_sha256  text NOT NULL UNIQUE,       -- lowercase hex of the DER
    not_before          timestamptz NOT NULL,
    not_after           timestamptz NOT NULL,
    status              text NOT NULL DEFAULT 'active'
                        CHECK (status IN ('active', 'superseded', 'revoked')),
    revoked_at          timestamptz,
    revocation_reason   text,
    key_type            text NOT NULL,
    pem                 text NOT NULL,
    issued_at           timestamptz NOT NULL DEFAULT now(),
    CHECK ((status = 'revoked') = (revoked_at IS NOT NULL))
);
CREATE INDEX certificates_device_idx ON certificates (device_id, issued_at DESC);
CREATE INDEX certificates_not_after_idx ON certificates (not_after) WHERE status = 'active';
CREATE INDEX certificates_revoked_idx ON certificates (revoked_at) WHERE status = 'revoked';

CREATE TABLE admin_keys (
    id          uuid PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    key_hash    bytea NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

-- The auth event log. Partitioned by month on `time`; the primary key includes it as
-- PostgreSQL requires. A default partition catches rows whose month has no partition
-- yet (a skewed clock), so no event is ever refused for its time.
CREATE TABLE auth_events (
    id                uuid NOT NULL,
    time              timestamptz NOT NULL,
    instance          text NOT NULL,
    type              text NOT NULL,
    outcome           text NOT NULL CHECK (outcome IN ('allowed', 'denied')),
    reason            text NOT NULL,
    device_id         text,
    fleet             text,
    cert_serial       text,
    cert_fingerprint  text,
    client_id         text,
    peer_address      text,
    tls_version       text,
    tls_cipher        text,
    detail            jsonb NOT NULL DEFAULT '{}',
    chain_id          text NOT NULL,
    seq               bigint NOT NULL,
    prev_hash         text NOT NULL,
    hash              text NOT NULL,
    PRIMARY KEY (id, time)
) PARTITION BY RANGE (time);

CREATE TABLE auth_events_default PARTITION OF auth_events DEFAULT;

CREATE INDEX auth_events_time_idx ON auth_events (time DESC, id DESC);
CREATE INDEX auth_events_device_time_idx ON auth_events (device_id, time DESC);
CREATE INDEX auth_events_reason_time_idx ON auth_events (reason, time DESC);
CREATE INDEX auth_events_outcome_time_idx ON auth_events (outcome, time DESC);
CREATE INDEX auth_events_peer_time_idx ON auth_events (peer_address, time DESC);
CREATE INDEX auth_events_chain_idx ON auth_events (chain_id, seq);

-- The head of each chain, for writers that append inside a transaction (provisioning):
-- SELECT ... FOR UPDATE serialises appends to one chain.
CREATE TABLE event_chains (
    chain_id   text PRIMARY KEY,
    seq        bigint NOT NULL,
    hash       text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Where retention cut a chain: the verifier restarts each chain at its prune point.
CREATE TABLE audit_prunes (
    id             bigserial PRIMARY KEY,
    pruned_before  timestamptz NOT NULL,
    partitions     text[] NOT NULL,
    events         bigint NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);

-- Creates the monthly partitions from `months_back` months ago to `months_ahead` months
-- ahead of now. Idempotent; called by migrations and periodically by the writers.
CREATE FUNCTION devicegate_ensure_partitions(months_back integer DEFAULT 1,
                                             months_ahead integer DEFAULT 3)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    month_start date;
    part_name   text;
    created     integer := 0;
BEGIN
    FOR i IN -months_back..months_ahead LOOP
        month_start := (date_trunc('month', now() AT TIME ZONE 'UTC') + make_interval(months => i))::date;
        part_name := format('auth_events_%s', to_char(month_start, 'YYYY_MM'));
        IF to_regclass(part_name) IS NULL THEN
            -- A default partition holding rows of this month would block the CREATE:
            -- move them into the new partition.
            EXECUTE format(
                'CREATE TABLE %I (LIKE auth_events INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                part_name);
            EXECUTE format(
                'WITH moved AS (DELETE FROM auth_events_default WHERE time >= %L AND time < %L RETURNING *)
                 INSERT INTO %I SELECT * FROM moved',
                month_start::timestamp AT TIME ZONE 'UTC',
                (month_start + interval '1 month')::timestamp AT TIME ZONE 'UTC', part_name);
            EXECUTE format(
                'ALTER TABLE auth_events ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                part_name,
                month_start::timestamp AT TIME ZONE 'UTC',
                (month_start + interval '1 month')::timestamp AT TIME ZONE 'UTC');
            created := created + 1;
        END IF;
    END LOOP;
    RETURN created;
END;
$$;

SELECT devicegate_ensure_partitions();
