-- One writer per chain, and tamper evidence against whoever administers this database.
--
-- audit_chains: every chain's genesis. A chain's events in this database begin after
-- (base_seq, base_hash): (0, the all-zero hash) for a chain begun here; later for a chain
-- whose spool held history this database never saw (previous_* name the head it had).
-- It also keeps the newest checkpoint's number and hash, so a deleted checkpoint row is
-- seen even without the external copies.
CREATE TABLE audit_chains (
    chain_id        text PRIMARY KEY,
    writer          text NOT NULL,              -- 'gateway' or 'provisioning'
    instance        text NOT NULL,
    reason          text NOT NULL,              -- why the chain begins where it does
    base_seq        bigint NOT NULL DEFAULT 0,
    base_hash       text NOT NULL DEFAULT repeat('0', 64),
    previous_chain  text,
    previous_seq    bigint,
    previous_hash   text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    checkpoint_n    bigint NOT NULL DEFAULT 0,
    checkpoint_hash text
);

-- Every chain already here began here (prunes explain later starts).
INSERT INTO audit_chains (chain_id, writer, instance, reason)
SELECT chain_id, CASE WHEN chain_id = 'provisioning' THEN 'provisioning' ELSE 'gateway' END,
       split_part(chain_id, '/', 1), 'registered_by_migration'
FROM (SELECT chain_id FROM event_chains UNION SELECT DISTINCT chain_id FROM auth_events) AS c;
INSERT INTO audit_chains (chain_id, writer, instance, reason)
VALUES ('provisioning', 'provisioning', 'provisioning', 'genesis')
ON CONFLICT DO NOTHING;

-- Who writes each single-writer chain (the gateway's): named when a second process
-- asks for the same chain. The advisory lock on the writer's shipping connection is what
-- excludes; this row only says who holds it.
CREATE TABLE chain_writers (
    chain_id     text PRIMARY KEY,
    host         text NOT NULL,
    pid          integer NOT NULL,
    instance     text NOT NULL,
    spool        text NOT NULL,
    token        text NOT NULL,                 -- random, per writer process
    backend_pid  integer NOT NULL,              -- the connection holding the lock
    started_at   timestamptz NOT NULL,
    seen_at      timestamptz NOT NULL DEFAULT now()
);

-- Certificates of the audit signing keys (issued by devicegate's CA). `audit verify`
-- trusts one only through its chain to chain.pem, never because it is here.
CREATE TABLE audit_signers (
    fingerprint  text PRIMARY KEY,              -- SHA-256 of the DER
    certificate  text NOT NULL,                 -- PEM
    added_at     timestamptz NOT NULL DEFAULT now()
);

-- Signed checkpoints: chain head (seq, hash) at a time, linked to the chain's previous
-- checkpoint. `body` is the exact signed JSON.
CREATE TABLE audit_checkpoints (
    chain_id    text NOT NULL,
    n           bigint NOT NULL,
    seq         bigint NOT NULL,
    hash        text NOT NULL,
    time        timestamptz NOT NULL,
    body        text NOT NULL,
    digest      text NOT NULL,
    signer      text NOT NULL,
    signature   text NOT NULL,
    PRIMARY KEY (chain_id, n)
);
