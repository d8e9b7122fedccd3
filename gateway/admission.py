"""The pure steps of admitting a device: its CONNECT judged, the broker's CONNECT, the
device's CONNACK. `gateway.connection.Session` holds the state and runs them in order.

Invariants:

* No state, no I/O: each step is a function of the packet, the device's identity and its
  compiled policy (`gateway.policy_live.SessionPolicy`).
* Identity comes from the certificate only: an MQTT 5 enhanced authentication is refused
  (0x8C Bad authentication method; an AUTH exchange with the broker would bypass it), and
  the broker's CONNECT carries the device id as username and no password.
* The CONNACK a v5 device gets never offers a Maximum Packet Size above the gateway's own
  limit (so a compliant client never trips it), and names the client id the gateway
  assigned when the device sent none.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from gateway.codes import BAD_AUTH_METHOD
from gateway.identity import DeviceIdentity
from gateway.mqtt.packets import MQTT_3_1_1, MQTT_5, Connack, Connect
from gateway.mqtt.properties import Properties, PropertyId
from gateway.policy import upstream_client_id
from gateway.policy_live import SessionPolicy
from schemas.events import Reason

__all__ = ["Refusal", "connect_refusal", "device_connack", "upstream_connect"]


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a CONNECT is refused: the event's reason and detail, and the CONNACK code when
    it is not the reason's own (`gateway.codes.connack_code`)."""

    reason: Reason
    detail: dict[str, object]
    code: int | None = None


def connect_refusal(
    connect: Connect, identity: DeviceIdentity, policy: SessionPolicy
) -> Refusal | None:
    """Why ``connect`` is refused before the directory is asked, or None.

    The will topic is judged by the session itself, with its decision cache.
    """
    if connect.protocol_level == MQTT_5 and connect.properties.authentication_method is not None:
        detail: dict[str, object] = {"error": "enhanced authentication is not supported"}
        return Refusal(Reason.PROTOCOL_ERROR, detail, BAD_AUTH_METHOD)
    client_id = connect.client_id
    if not client_id:
        if connect.protocol_level == MQTT_3_1_1 and not connect.clean_start:
            detail = {"error": "empty client id without clean session"}
            return Refusal(Reason.CLIENT_ID_MISMATCH, detail)
    elif not policy.client_id_allowed(client_id):
        return Refusal(Reason.CLIENT_ID_MISMATCH, {"requested": client_id})
    return None


def upstream_connect(connect: Connect, identity: DeviceIdentity, client_id: str) -> Connect:
    """The CONNECT the broker gets: the device's, under the device's name, no password."""
    return replace(
        connect,
        client_id=upstream_client_id(identity.device_id, client_id),
        username=identity.device_id,
        password=None,
    )


def device_connack(
    connack: Connack, *, max_packet_size: int, assigned_client_id: str | None
) -> Connack:
    """The broker's MQTT 5 CONNACK as the device gets it (``connack`` itself if unchanged)."""
    items = connack.properties.items
    broker_max = connack.properties.maximum_packet_size
    if broker_max is None or broker_max > max_packet_size:
        items = (
            *(i for i in items if i[0] != PropertyId.MAXIMUM_PACKET_SIZE),
            (PropertyId.MAXIMUM_PACKET_SIZE, max_packet_size),
        )
    if assigned_client_id is not None:
        items = (*items, (PropertyId.ASSIGNED_CLIENT_IDENTIFIER, assigned_client_id))
    if items is not connack.properties.items:
        connack = replace(connack, properties=Properties(tuple(items)))
    return connack
