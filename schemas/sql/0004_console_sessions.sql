-- Sessions of the audit console (provisioning/console). A row per logged-in browser; the
-- cookie value is never stored, only its sha256, so a read of this table yields no usable
-- session. Kept in PostgreSQL so that every provisioning replica honours every session.
-- A session dies with its admin key: lookups join admin_keys and require revoked_at NULL.
CREATE TABLE console_sessions (
    id_hash       bytea PRIMARY KEY,
    admin_key_id  uuid NOT NULL REFERENCES admin_keys (id) ON DELETE CASCADE,
    csrf_token    text NOT NULL,
    peer_address  text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_seen     timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL
);
CREATE INDEX console_sessions_expires_idx ON console_sessions (expires_at);
