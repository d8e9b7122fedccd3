"""Synthetic load for the console: devices, certificates and auth events made in SQL.

Everything is generated server-side with ``generate_series`` (no rows cross the wire), and
the events are real links of real chains: a running ``sha256`` aggregate used as a window
function computes ``hash = sha256(prev_hash || canonical event)`` per chain, with the
canonical JSON of `schemas.events.canonical_bytes` built in SQL. So ``audit verify`` and the
console's chain page verify them like gateway events.

Shape: `CHAINS` gateway chains (``bulk-gw-<i>/w<j>``, instances ``bulk-gw-<i>``), events
evenly spread over ``[now - span, now)``, about 30% denials over a dozen reasons, hot
devices and peers among the denials, `DEVICES` devices with one certificate each (some
expiring within 7 days).
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

CHAINS = 8
DEVICES = 5000

_FUNCTIONS = r"""
CREATE OR REPLACE FUNCTION pg_temp.dg_step(state bytea, body text) RETURNS bytea
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
BEGIN RETURN sha256(state || convert_to(body, 'UTF8')); END $$;
DROP AGGREGATE IF EXISTS pg_temp.dg_chain(text);
CREATE AGGREGATE pg_temp.dg_chain(text) (
    sfunc = pg_temp.dg_step, stype = bytea,
    initcond = '\x0000000000000000000000000000000000000000000000000000000000000000'
);
"""

_REGISTRY = """
INSERT INTO fleets (name) VALUES ('line-a'), ('line-b') ON CONFLICT DO NOTHING;
INSERT INTO devices (device_id, fleet, status, created_at, updated_at)
SELECT 'dev-' || lpad(d::text, 5, '0'), CASE WHEN d % 2 = 0 THEN 'line-a' ELSE 'line-b' END,
       CASE WHEN d % 97 = 0 THEN 'disabled' ELSE 'active' END,
       now() - interval '40 days', now() - interval '40 days'
FROM generate_series(0, $1 - 1) AS d
ON CONFLICT DO NOTHING;
INSERT INTO certificates (serial, device_id, fingerprint_sha256, not_before, not_after, status,
                          key_type, pem, issued_at)
SELECT 'b' || to_hex(d), 'dev-' || lpad(d::text, 5, '0'),
       encode(sha256(convert_to('bulk-cert-' || d, 'UTF8')), 'hex'),
       now() - interval '20 days', now() - interval '2 days' + (d % 40) * interval '1 day',
       'active', 'ec-p256', 'synthetic', now() - interval '20 days'
FROM generate_series(0, $1 - 1) AS d
ON CONFLICT DO NOTHING;
"""

# r = a pseudo-random 0..99 per event decides its type, outcome and reason.
_EVENTS = """
INSERT INTO auth_events (id, time, instance, type, outcome, reason, device_id, fleet,
    cert_serial, cert_fingerprint, client_id, peer_address, tls_version, tls_cipher, detail,
    chain_id, seq, prev_hash, hash)
WITH raw AS (
    SELECT n, (n * 7919 + n / 13) % 100 AS r,
           $2::timestamptz - $3::interval + $3::interval * (n::float8 / $1) AS time,
           'bulk-gw-' || (n % $4) / 2 || '/w' || (n % $4) % 2 AS chain_id,
           'bulk-gw-' || (n % $4) / 2 AS instance,
           n / $4 + 1 AS seq
    FROM generate_series(0::bigint, $1 - 1) AS n
), shaped AS (
    SELECT n, time, chain_id, instance, seq, gen_random_uuid() AS id,
        CASE WHEN r < 55 THEN 'connect' WHEN r < 65 THEN 'publish' WHEN r < 70 THEN 'subscribe'
             WHEN r < 75 THEN 'session_end' WHEN r < 87 THEN 'tls_handshake'
             WHEN r < 94 THEN 'connect' WHEN r < 98 THEN 'publish' ELSE 'connect' END AS type,
        CASE WHEN r < 75 THEN 'allowed' ELSE 'denied' END AS outcome,
        CASE WHEN r < 70 THEN 'ok' WHEN r < 75 THEN 'client_disconnected'
             WHEN r < 80 THEN 'certificate_expired' WHEN r < 84 THEN 'unknown_issuer'
             WHEN r < 87 THEN 'no_client_certificate' WHEN r < 91 THEN 'client_id_mismatch'
             WHEN r < 94 THEN 'device_disabled' WHEN r < 98 THEN 'topic_not_authorized'
             WHEN r = 98 THEN 'certificate_revoked' ELSE 'rate_limited' END AS reason,
        CASE WHEN r BETWEEN 80 AND 86 THEN NULL
             WHEN r >= 75 THEN 'dev-' || lpad(((n * 31) % 40)::text, 5, '0')
             ELSE 'dev-' || lpad(((n * 31) % $5)::text, 5, '0') END AS device_id,
        CASE WHEN r >= 75 THEN '203.0.113.' || (n * 17) % 24 || ':' || 40000 + n % 20000
             ELSE '10.' || n % 3 || '.' || (n * 13) % 250 || '.' || (n * 7) % 250 || ':'
                  || 30000 + n % 30000 END AS peer_address
    FROM raw
), filled AS (
    SELECT s.*,
        CASE WHEN device_id IS NULL THEN NULL
             WHEN substr(device_id, 9, 1)::int % 2 = 0 THEN 'line-a' ELSE 'line-b' END AS fleet,
        CASE WHEN device_id IS NULL THEN NULL ELSE 'b' || to_hex(substr(device_id, 5)::int)
             END AS cert_serial,
        CASE WHEN device_id IS NULL THEN NULL
             ELSE encode(sha256(convert_to('bulk-cert-' || substr(device_id, 5)::int, 'UTF8')),
                         'hex') END AS cert_fingerprint,
        CASE WHEN type = 'tls_handshake' THEN NULL WHEN reason = 'client_id_mismatch'
             THEN 'spoof-' || n % 7 ELSE device_id END AS client_id,
        'TLSv1.3' AS tls_version, 'TLS_AES_128_GCM_SHA256' AS tls_cipher,
        CASE WHEN type = 'connect' THEN '{"protocol":5}' ELSE '{}' END AS detail
    FROM shaped s
), bodies AS (
    SELECT f.*,
        '{"cert_fingerprint":' || coalesce(to_json(cert_fingerprint)::text, 'null')
        || ',"cert_serial":' || coalesce(to_json(cert_serial)::text, 'null')
        || ',"chain_id":' || coalesce(to_json(chain_id)::text, 'null')
        || ',"client_id":' || coalesce(to_json(client_id)::text, 'null')
        || ',"detail":' || detail
        || ',"device_id":' || coalesce(to_json(device_id)::text, 'null')
        || ',"fleet":' || coalesce(to_json(fleet)::text, 'null')
        || ',"id":"' || id::text || '"'
        || ',"instance":' || coalesce(to_json(instance)::text, 'null')
        || ',"outcome":' || coalesce(to_json(outcome)::text, 'null')
        || ',"peer_address":' || coalesce(to_json(peer_address)::text, 'null')
        || ',"reason":' || coalesce(to_json(reason)::text, 'null')
        || ',"seq":' || seq
        || ',"time":"' || to_char(time AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') || '"'
        || ',"tls_cipher":' || coalesce(to_json(tls_cipher)::text, 'null')
        || ',"tls_version":' || coalesce(to_json(tls_version)::text, 'null')
        || ',"type":' || coalesce(to_json(type)::text, 'null') || '}' AS body
    FROM filled f
), chained AS (
    SELECT b.*, pg_temp.dg_chain(body) OVER w AS digest
    FROM bodies b
    WINDOW w AS (PARTITION BY chain_id ORDER BY seq ROWS UNBOUNDED PRECEDING)
)
SELECT id, time, instance, type, outcome, reason, device_id, fleet, cert_serial,
       cert_fingerprint, client_id, peer_address, tls_version, tls_cipher, detail::jsonb,
       chain_id, seq,
       coalesce(encode(lag(digest) OVER (PARTITION BY chain_id ORDER BY seq), 'hex'),
                repeat('0', 64)),
       encode(digest, 'hex')
FROM chained
"""


async def load(
    conn: Any, *, events: int, span: timedelta = timedelta(days=7), analyze: bool = True
) -> float:
    """Add the registry and ``events`` chained events ending now; returns the seconds taken.

    Call once per database (chains start at seq 1).
    """
    began = time.monotonic()
    await conn.execute(_FUNCTIONS)
    async with conn.transaction():
        await conn.execute("SET LOCAL work_mem = '256MB'")  # the chain sort stays in memory
        for statement in _REGISTRY.strip().split(";\n"):
            if statement.strip():
                args = (DEVICES,) if "$1" in statement else ()
                await conn.execute(statement, *args)
        now = await conn.fetchval("SELECT now()")
        await conn.execute(_EVENTS, events, now, span, CHAINS, DEVICES)
    if analyze:
        await conn.execute("VACUUM (ANALYZE) auth_events")
        await conn.execute("ANALYZE certificates")
        await conn.execute("ANALYZE devices")
    return time.monotonic() - began
