"""The MQTT codes a session answers with, per reason, and which ends are normal.

One table per question, so docs/mqtt-behaviour.md has one place to point at: the CONNACK
refusing a connection (3.1.1 return code, 5 reason code), the MQTT 5 DISCONNECT ending a
live session from outside (`gateway.connection.Session.cut`), the ends after which the
broker gets a DISCONNECT, and the ends that are not the device's fault.

Invariants:

* Pure data and lookups: no state, no I/O; every reason without an entry gets the
  protocol's generic code (CONNACK not authorized, DISCONNECT unspecified error).
"""

from __future__ import annotations

from typing import Final

from gateway.mqtt.packets import MQTT_5
from schemas.events import Reason

__all__ = [
    "BAD_AUTH_METHOD",
    "CLEAN_CUTS",
    "DISCONNECT_BYTES",
    "HANDED_OVER",
    "NORMAL_ENDS",
    "PROTOCOL_ERROR",
    "QUOTA_EXCEEDED",
    "TOPIC_ALIAS_INVALID",
    "connack_code",
    "disconnect_code",
]

# MQTT 5 reason codes of the session's own closes and refusals.
TOPIC_ALIAS_INVALID: Final = 0x94
PROTOCOL_ERROR: Final = 0x82
BAD_AUTH_METHOD: Final = 0x8C
# Quota exceeded ("an implementation or administrative imposed limit has been exceeded"):
# the budget, not the credential, ended the session; each denial was already answered
# with 0x87, and 0x87 on DISCONNECT means "renew your certificate" here (expiry).
QUOTA_EXCEEDED: Final = 0x97

# CONNACK codes per refusal reason: (MQTT 3.1.1 return code, MQTT 5 reason code).
_CONNACK: Final = {
    Reason.CLIENT_ID_MISMATCH: (0x02, 0x85),
    Reason.UNSUPPORTED_PROTOCOL_VERSION: (0x01, 0x84),
    Reason.UPSTREAM_UNAVAILABLE: (0x03, 0x88),
    Reason.REVOCATION_STATE_STALE: (0x03, 0x88),
    Reason.EVENT_LOG_UNAVAILABLE: (0x03, 0x88),
    Reason.SERVER_SHUTTING_DOWN: (0x03, 0x88),
    Reason.TOO_MANY_CONNECTIONS: (0x03, 0x97),
    Reason.POLICY_NOT_LOADED: (0x03, 0x88),
    # Connection rate exceeded (3.1.1 has no such code: server unavailable, retry later).
    Reason.CONNECT_RATE_EXCEEDED: (0x03, 0x9F),
}
_NOT_AUTHORIZED: Final = (0x05, 0x87)

# MQTT 5 DISCONNECT codes for sessions ended from outside (`Session.cut`).
_CUT_CODES: Final = {
    Reason.SESSION_TAKEN_OVER: 0x8E,  # Session taken over
    Reason.SERVER_SHUTTING_DOWN: 0x8B,  # Server shutting down
    Reason.CERTIFICATE_REVOKED: 0x98,  # Administrative action
    Reason.CERTIFICATE_SUPERSEDED: 0x98,
    Reason.DEVICE_REVOKED: 0x98,
    Reason.DEVICE_DISABLED: 0x98,
    # Not authorized: the credential is no longer valid. Not 0x98 (no operator acted) nor
    # 0xA0 Maximum connect time (a client would just reconnect): the device must renew.
    Reason.CERTIFICATE_EXPIRED: 0x87,
    # Not authorized, with a Reason String naming the filter or client id: the policy
    # changed under a live session (`gateway.connection.Session.rejudge`).
    Reason.SESSION_ENDED_BY_POLICY: 0x87,
}
_UNSPECIFIED_ERROR: Final = 0x80

# Ends from outside after which the broker gets a DISCONNECT, so it drops the will: the
# gateway itself is going away, not the device (docs/mqtt-behaviour.md, "What the broker
# sees when a session ends"). No other cut sends one: a takeover is left to the broker's
# own, and the rest close the broker connection without one, so the will fires.
CLEAN_CUTS: Final = frozenset({Reason.SERVER_SHUTTING_DOWN})
DISCONNECT_BYTES: Final = b"\xe0\x00"  # DISCONNECT, reason 0: the same on 3.1.1 and 5

# Session ends that are not the device's fault.
NORMAL_ENDS: Final = frozenset(
    {
        Reason.CLIENT_DISCONNECTED,
        Reason.CONNECTION_LOST,
        Reason.UPSTREAM_CLOSED,
        Reason.SERVER_SHUTTING_DOWN,
        Reason.SESSION_TAKEN_OVER,
        Reason.CERTIFICATE_SUPERSEDED,
    }
)

# Cuts on the revocation path that are no revocation: the device renewed, and its live
# session on the old certificate is handed over to the new one (`session_superseded`,
# allowed; the device reconnects with its new certificate).
HANDED_OVER: Final = frozenset({Reason.CERTIFICATE_SUPERSEDED})


def connack_code(reason: Reason, version: int) -> int:
    """The CONNACK code refusing a connection for ``reason`` on ``version``."""
    v3, v5 = _CONNACK.get(reason, _NOT_AUTHORIZED)
    return v5 if version == MQTT_5 else v3


def disconnect_code(reason: Reason) -> int:
    """The MQTT 5 DISCONNECT code ending a live session from outside for ``reason``."""
    return _CUT_CODES.get(reason, _UNSPECIFIED_ERROR)
