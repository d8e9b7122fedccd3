"""What one ``auth_events`` row counts for, as SQL expressions shared by every aggregate.

A row may stand for many decisions: a denial window's summary (``detail.count``, written by
the gateway's `gateway.denials`), a SUBSCRIBE denying several filters, a throttled burst of
refused handshakes or anonymous requests. ``audit summary``, the console overview and its
hourly rollup count decisions with `DECISIONS`, so 600 refused handshakes read 600, not one
row. Rows written before the key was unified carry ``detail.refused``; it is still read.
``events_lost`` and ``events_missing`` carry a ``count`` of log records, not of decisions:
they count as one row each (their detail has the numbers).

Peers are grouped by host with `PEER_HOST`: ``1.2.3.4``, ``1.2.3.4:5``, ``[2001:db8::1]:5``
and ``2001:db8::1`` all name their host, never a port.
"""

from __future__ import annotations

DECISIONS = """(CASE
    WHEN type IN ('events_lost', 'events_missing') THEN 1
    WHEN jsonb_typeof(detail->'count') = 'number' THEN (detail->>'count')::numeric::bigint
    WHEN jsonb_typeof(detail->'refused') = 'number' THEN (detail->>'refused')::numeric::bigint
    ELSE 1 END)"""
"""How many decisions a row stands for (``detail.count``, formerly ``detail.refused``)."""

PEER_HOST = """(CASE
    WHEN peer_address LIKE '[%' THEN split_part(substr(peer_address, 2), ']', 1)
    WHEN peer_address LIKE '%:%:%' THEN peer_address
    ELSE split_part(peer_address, ':', 1) END)"""
"""The host of ``peer_address``: IPv4 with or without a port, IPv6 bracketed or bare."""
