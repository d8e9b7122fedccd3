-- Manufacturer trust (IDevID enrollment, docs/manufacturer-certificates.md): the CAs whose
-- device certificates (IEEE 802.1AR IDevIDs) a fleet accepts instead of a bootstrap token,
-- the manifest (allowlist) of IDevIDs a fleet expects, the IDevIDs it blocks, and which
-- device each enrolled IDevID became.

CREATE TABLE manufacturer_cas (
    fleet                    text NOT NULL REFERENCES fleets (name),
    ca_fingerprint           text NOT NULL,      -- lowercase hex sha256 of the root's SPKI (DER)
    subject                  text NOT NULL,      -- RFC 4514, for people
    pem                      text NOT NULL,      -- the root certificate
    intermediates            text[] NOT NULL DEFAULT '{}',   -- PEM, for path building
    require_allowlist        boolean NOT NULL DEFAULT false,
    require_channel_binding  boolean NOT NULL DEFAULT false,
    crl_der                  bytea,              -- the manufacturer's CRL, when configured
    created_at               timestamptz NOT NULL DEFAULT now(),
    updated_at               timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (fleet, ca_fingerprint)
);
CREATE INDEX manufacturer_cas_fingerprint_idx ON manufacturer_cas (ca_fingerprint);

-- kind 'serial': the IDevID's serial number, lowercase hex without leading zeros;
-- kind 'spki': lowercase hex sha256 of the IDevID's SubjectPublicKeyInfo (DER).
-- Collation "C": hex compares bytewise, and a 100,000-row import spends its time in
-- this primary key's comparisons.
CREATE TABLE idevid_manifest (
    fleet        text NOT NULL REFERENCES fleets (name),
    kind         text COLLATE "C" NOT NULL CHECK (kind IN ('serial', 'spki')),
    value        text COLLATE "C" NOT NULL,
    attributes   jsonb NOT NULL DEFAULT '{}',    -- model, site, line (kept for later use)
    imported_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (fleet, kind, value)
);

CREATE TABLE idevid_blocks (
    fleet       text NOT NULL REFERENCES fleets (name),
    kind        text NOT NULL CHECK (kind IN ('serial', 'spki')),
    value       text NOT NULL,
    note        text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (fleet, kind, value)
);

CREATE TABLE device_idevids (
    device_id       text PRIMARY KEY REFERENCES devices (device_id),
    fleet           text NOT NULL REFERENCES fleets (name),
    ca_fingerprint  text NOT NULL,
    issuer          text NOT NULL,
    serial          text NOT NULL,
    spki_sha256     text NOT NULL,
    enrolled_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (fleet, spki_sha256)
);
