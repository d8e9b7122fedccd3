"""The sans-IO session: bytes and outcomes in, actions out. No sockets, no loop."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.actions import (
    Action,
    Admit,
    CheckDevice,
    Close,
    DialUpstream,
    Record,
    ToDevice,
    ToUpstream,
)
from gateway.audit import EventContext
from gateway.connection import Session, State
from gateway.identity import DeviceIdentity
from gateway.mqtt import (
    Connack,
    Connect,
    Disconnect,
    Pingreq,
    Properties,
    PropertyId,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Subscription,
    Will,
    decode,
    encode,
)
from gateway.policy import compile_for
from schemas.events import EventType, Outcome, Reason
from schemas.policy import FleetPolicy

ID = DeviceIdentity(device_id="d1", fleet="plant", serial="abc", fingerprint="00" * 32)
MINE = "devices/d1/t"
OTHER = "devices/d2/t"


def new_session(policy: FleetPolicy | None = None) -> Session:
    return Session(
        identity=ID,
        policy=compile_for(policy or FleetPolicy(), ID),
        context=EventContext(instance="t", peer_address="1.2.3.4:5", identity=ID),
        max_packet_size=4096,
    )


def kinds(actions: list[Action]) -> list[type]:
    return [type(a) for a in actions]


def device_bytes(actions: list[Action], version: int) -> list[Any]:
    out = []
    data = b"".join(bytes(a.data) for a in actions if isinstance(a, ToDevice))
    while data:
        packet, used = decode(data, version=version)  # type: ignore[misc]
        out.append(packet)
        data = data[used:]
    return out


def upstream_bytes(actions: list[Action]) -> bytes:
    return b"".join(bytes(a.data) for a in actions if isinstance(a, ToUpstream))


def records(actions: list[Action]) -> list[Any]:
    return [a.event for a in actions if isinstance(a, Record)]


def admit(session: Session, version: int = 4, client_id: str = "d1", **kwargs: Any) -> Connect:
    """Drive a session to ACTIVE; return the CONNECT forwarded upstream."""
    connect = Connect(protocol_level=version, client_id=client_id, **kwargs)
    assert kinds(session.receive_device(encode(connect, version=version))) == [CheckDevice]
    dial = session.device_checked(Reason.OK)
    assert kinds(dial) == [DialUpstream]
    assert isinstance(dial[0], DialUpstream)
    forwarded, _ = decode(dial[0].connect, version=version)  # type: ignore[misc]
    props = Properties.of((PropertyId.TOPIC_ALIAS_MAXIMUM, 10)) if version == 5 else Properties()
    actions = session.receive_upstream(
        encode(Connack(reason_code=0, properties=props), version=version)
    )
    assert kinds(actions) == [Admit]
    assert isinstance(actions[0], Admit)
    assert actions[0].event.type is EventType.CONNECT
    assert actions[0].event.outcome is Outcome.ALLOWED
    session.admitted()
    assert session.state is State.ACTIVE
    assert isinstance(forwarded, Connect)
    return forwarded


@pytest.mark.parametrize("version", [4, 5])
def test_connect_is_rebound_to_the_device(version: int) -> None:
    session = new_session()
    forwarded = admit(session, version, username="x", password=b"secret")
    assert forwarded.client_id == "d1"
    assert forwarded.username == "d1"
    assert forwarded.password is None


def test_connect_fed_byte_by_byte_with_trailing_data() -> None:
    session = new_session()
    data = encode(Connect(protocol_level=4, client_id="d1"), version=4) + encode(
        Publish(topic=MINE, payload=b"early"), version=4
    )
    actions: list[Action] = []
    for i in range(len(data)):
        actions += session.receive_device(data[i : i + 1])
    assert kinds(actions) == [CheckDevice]
    session.device_checked(Reason.OK)
    session.receive_upstream(encode(Connack(), version=4))
    # The pipelined PUBLISH is held until the session is admitted, then forwarded.
    forwarded = session.admitted()
    assert upstream_bytes(forwarded) == encode(Publish(topic=MINE, payload=b"early"), version=4)


@pytest.mark.parametrize(
    ("version", "client_id", "code"),
    [(4, "d2", 0x02), (5, "d2", 0x85), (4, "d1-x", 0x02), (5, "", None)],
)
def test_client_id_binding(version: int, client_id: str, code: int | None) -> None:
    session = new_session()
    actions = session.receive_device(
        encode(Connect(protocol_level=version, client_id=client_id), version=version)
    )
    if code is None:
        assert kinds(actions) == [CheckDevice]
        return
    assert kinds(actions) == [Record, ToDevice, Close]
    assert device_bytes(actions, version) == [Connack(reason_code=code)]
    (event,) = records(actions)
    assert event.reason is Reason.CLIENT_ID_MISMATCH and event.client_id == client_id


def test_client_id_prefix_policy() -> None:
    session = new_session(FleetPolicy(client_ids=("{device_id}-*",)))
    # Admitted, and kept apart from any device whose id is "d1-sensor" at the broker.
    assert admit(session, 4, client_id="d1-sensor").client_id == "d1:d1-sensor"


def test_empty_client_id_v5_is_assigned_in_connack() -> None:
    session = new_session()
    session.receive_device(encode(Connect(protocol_level=5, client_id=""), version=5))
    dial = session.device_checked(Reason.OK)
    assert isinstance(dial[0], DialUpstream)
    forwarded, _ = decode(dial[0].connect, version=5)  # type: ignore[misc]
    assert isinstance(forwarded, Connect) and forwarded.client_id == "d1"
    (action,) = session.receive_upstream(encode(Connack(), version=5))
    assert isinstance(action, Admit)
    connack, _ = decode(action.connack, version=5)  # type: ignore[misc]
    assert isinstance(connack, Connack)
    assert connack.properties.get(PropertyId.ASSIGNED_CLIENT_IDENTIFIER) == "d1"


def test_empty_client_id_v3_needs_clean_session() -> None:
    session = new_session()
    assert admit(session, 4, client_id="", clean_start=True).client_id == "d1"
    session = new_session()
    actions = session.receive_device(
        encode(Connect(protocol_level=4, client_id="", clean_start=False), version=4)
    )
    assert device_bytes(actions, 4) == [Connack(reason_code=0x02)]


@pytest.mark.parametrize(
    ("reason", "v3", "v5"),
    [
        (Reason.DEVICE_UNKNOWN, 0x05, 0x87),
        (Reason.DEVICE_DISABLED, 0x05, 0x87),
        (Reason.DEVICE_REVOKED, 0x05, 0x87),
        (Reason.CERTIFICATE_REVOKED, 0x05, 0x87),
        (Reason.REVOCATION_STATE_STALE, 0x03, 0x88),
    ],
)
def test_directory_refusals(reason: Reason, v3: int, v5: int) -> None:
    for version, code in ((4, v3), (5, v5)):
        session = new_session()
        session.receive_device(
            encode(Connect(protocol_level=version, client_id="d1"), version=version)
        )
        actions = session.device_checked(reason)
        assert device_bytes(actions, version) == [Connack(reason_code=code)]
        assert records(actions)[0].reason is reason
        assert isinstance(actions[-1], Close)


def test_upstream_unavailable() -> None:
    for version, code in ((4, 0x03), (5, 0x88)):
        session = new_session()
        session.receive_device(
            encode(Connect(protocol_level=version, client_id="d1"), version=version)
        )
        session.device_checked(Reason.OK)
        actions = session.upstream_failed("refused")
        assert device_bytes(actions, version) == [Connack(reason_code=code)]
        assert records(actions)[0].reason is Reason.UPSTREAM_UNAVAILABLE


def test_will_topic_must_be_authorised() -> None:
    session = new_session()
    will = Will(topic=OTHER, payload=b"bye")
    actions = session.receive_device(
        encode(Connect(protocol_level=5, client_id="d1", will=will), version=5)
    )
    assert device_bytes(actions, 5) == [Connack(reason_code=0x87)]
    assert records(actions)[0].detail == {"will_topic": OTHER}


def test_first_packet_must_be_connect() -> None:
    session = new_session()
    actions = session.receive_device(encode(Pingreq(), version=4))
    assert kinds(actions) == [Record, Close]
    assert records(actions)[0].reason is Reason.PROTOCOL_ERROR


def test_unsupported_protocol_level() -> None:
    session = new_session()
    mqtt31 = b"\x10\x11\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x03abc"
    actions = session.receive_device(mqtt31)
    assert device_bytes(actions, 4) == [Connack(reason_code=0x01)]
    assert records(actions)[0].reason is Reason.UNSUPPORTED_PROTOCOL_VERSION


def test_connect_timeout_only_before_connect() -> None:
    session = new_session()
    actions = session.connect_timed_out()
    assert records(actions)[0].reason is Reason.CONNECT_TIMEOUT
    session = new_session()
    admit(session)
    assert session.connect_timed_out() == []


def test_allowed_packets_are_forwarded_as_received() -> None:
    session = new_session()
    admit(session)
    data = b"".join(
        encode(p, version=4)
        for p in (
            Publish(topic=MINE, payload=b"x" * 100, qos=1, packet_id=1),
            Pingreq(),
            Publish(topic=MINE, payload=b"y"),
        )
    )
    actions = session.receive_device(data)
    assert len(actions) == 1 and isinstance(actions[0], ToUpstream)
    assert actions[0].data is data  # the very object: no copy


@pytest.mark.parametrize(("qos", "reply"), [(0, None), (1, Puback), (2, Pubrec)])
def test_denied_publish_v5(qos: int, reply: type | None) -> None:
    session = new_session()
    admit(session, 5)
    before = encode(Publish(topic=MINE, payload=b"a"), version=5)
    denied = encode(
        Publish(topic=OTHER, payload=b"b", qos=qos, packet_id=7 if qos else None), version=5
    )
    after = encode(Publish(topic=MINE, payload=b"c"), version=5)
    actions = session.receive_device(before + denied + after)
    assert upstream_bytes(actions) == before + after
    replies = device_bytes(actions, 5)
    assert replies == ([] if reply is None else [reply(packet_id=7, reason_code=0x87)])
    (event,) = records(actions)
    assert event.type is EventType.PUBLISH and event.detail["topic"] == OTHER
    assert session.state is State.ACTIVE


def test_denied_publish_v3_closes() -> None:
    session = new_session()
    admit(session, 4)
    actions = session.receive_device(encode(Publish(topic=OTHER, payload=b"b"), version=4))
    assert upstream_bytes(actions) == b""
    assert isinstance(actions[-1], Close) and actions[-1].reason is Reason.TOPIC_NOT_AUTHORIZED
    assert [e.type for e in records(actions)] == [EventType.PUBLISH, EventType.SESSION_END]


def test_denied_publish_v3_dropped_when_the_fleet_says_so() -> None:
    session = new_session(FleetPolicy(drop_denied_publish_v3=True))
    admit(session, 4)
    actions = session.receive_device(
        encode(Publish(topic=OTHER, payload=b"b", qos=2, packet_id=9), version=4)
    )
    assert device_bytes(actions, 4) == [Pubrec(packet_id=9)]
    actions = session.receive_device(encode(Pubrel(packet_id=9), version=4))
    assert device_bytes(actions, 4) == [Pubcomp(packet_id=9)]
    assert upstream_bytes(actions) == b""
    # A PUBREL for a forwarded QoS 2 message still goes to the broker.
    actions = session.receive_device(encode(Pubrel(packet_id=10), version=4))
    assert upstream_bytes(actions) == encode(Pubrel(packet_id=10), version=4)


def alias_publish(alias: int, topic: str = "", payload: bytes = b"p") -> bytes:
    props = Properties.of((PropertyId.TOPIC_ALIAS, alias))
    return encode(Publish(topic=topic, payload=payload, properties=props), version=5)


def test_topic_alias_is_resolved_before_judging() -> None:
    session = new_session()
    admit(session, 5)
    ok = alias_publish(1, MINE) + alias_publish(1)
    assert upstream_bytes(session.receive_device(ok)) == ok
    # Re-pointing alias 1 at a denied topic: neither the set nor the use is forwarded.
    actions = session.receive_device(alias_publish(1, OTHER) + alias_publish(1))
    assert upstream_bytes(actions) == b""
    assert [e.detail["topic"] for e in records(actions)] == [OTHER, OTHER]


@pytest.mark.parametrize(("alias", "code"), [(0, 0x94), (11, 0x94), (3, 0x82)])
def test_bad_topic_alias_disconnects(alias: int, code: int) -> None:
    session = new_session()
    admit(session, 5)
    actions = session.receive_device(alias_publish(alias))
    assert device_bytes(actions, 5) == [Disconnect(reason_code=code)]
    assert isinstance(actions[-1], Close) and actions[-1].reason is Reason.PROTOCOL_ERROR


@pytest.mark.parametrize(("version", "code"), [(4, 0x80), (5, 0x87)])
def test_subscribe_all_denied_is_answered_locally(version: int, code: int) -> None:
    session = new_session()
    admit(session, version)
    subscribe = Subscribe(
        packet_id=3,
        subscriptions=tuple(Subscription(topic_filter=f) for f in ("#", "devices/+/t", "$SYS/#")),
    )
    actions = session.receive_device(encode(subscribe, version=version))
    assert upstream_bytes(actions) == b""
    assert device_bytes(actions, version) == [Suback(packet_id=3, reason_codes=(code,) * 3)]
    # One event for the packet: how many filters it denied, and which.
    (event,) = records(actions)
    assert event.type is EventType.SUBSCRIBE and event.reason is Reason.TOPIC_NOT_AUTHORIZED
    # ... and which policy version and statement denied them (the file's: version 0).
    assert event.detail == {
        "count": 3,
        "filters": ["#", "devices/+/t", "$SYS/#"],
        "policy_version": 0,
        "statement": "default-deny",
    }


@pytest.mark.parametrize(("version", "code"), [(4, 0x80), (5, 0x87)])
def test_partially_denied_subscribe_is_merged(version: int, code: int) -> None:
    session = new_session()
    admit(session, version)
    filters = ("#", "devices/d1/#", "$SYS/#", "fleets/plant/+")
    subscribe = Subscribe(
        packet_id=4, subscriptions=tuple(Subscription(topic_filter=f, qos=1) for f in filters)
    )
    actions = session.receive_device(encode(subscribe, version=version))
    forwarded, _ = decode(upstream_bytes(actions), version=version)  # type: ignore[misc]
    assert isinstance(forwarded, Subscribe)
    assert [s.topic_filter for s in forwarded.subscriptions] == ["devices/d1/#", "fleets/plant/+"]
    # The broker's SUBACK, split across reads and surrounded by other traffic.
    message = encode(Publish(topic=MINE, payload=b"m" * 50), version=version)
    suback = encode(Suback(packet_id=4, reason_codes=(1, 0)), version=version)
    stream = message + suback + message
    out: list[Action] = []
    for i in range(0, len(stream), 7):
        out += session.receive_upstream(stream[i : i + 7])
    packets = device_bytes(out, version)
    assert packets[1] == Suback(packet_id=4, reason_codes=(code, 1, code, 0))
    assert len(packets) == 3
    # A later SUBACK with the same id is not rewritten again.
    assert b"".join(bytes(a.data) for a in session.receive_upstream(suback)) == suback  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "garbage",
    [b"\x00\x00", b"\x30\x02\x00", b"\xf0\x00", b"\x20\x02\x00\x00", b"\x10\x00"],
)
def test_malformed_or_server_packets_close_with_protocol_error(garbage: bytes) -> None:
    session = new_session()
    admit(session, 4)
    actions = session.receive_device(garbage + b"\x00" * 4)
    assert isinstance(actions[-1], Close)
    assert actions[-1].reason is Reason.PROTOCOL_ERROR
    (event,) = records(actions)
    assert event.type is EventType.SESSION_END and event.outcome is Outcome.DENIED


def test_packet_too_large() -> None:
    session = new_session()
    admit(session, 5)
    actions = session.receive_device(encode(Publish(topic=MINE, payload=b"x" * 5000), version=5))
    assert device_bytes(actions, 5) == [Disconnect(reason_code=0x95)]
    assert isinstance(actions[-1], Close) and actions[-1].reason is Reason.PACKET_TOO_LARGE


@pytest.mark.parametrize("version", [4, 5])
def test_disconnect_and_session_end_counts(version: int) -> None:
    session = new_session()
    connect = encode(Connect(protocol_level=version, client_id="d1"), version=version)
    session.receive_device(connect)
    session.device_checked(Reason.OK)
    (admission,) = session.receive_upstream(encode(Connack(), version=version))
    assert isinstance(admission, Admit)
    session.admitted()  # the bridge sent admission.connack
    publish = encode(Publish(topic=MINE, payload=b"x"), version=version)
    session.receive_device(publish)
    session.receive_upstream(publish)
    disconnect = encode(Disconnect(), version=version)
    actions = session.receive_device(disconnect)
    assert upstream_bytes(actions) == disconnect
    (event,) = records(actions)
    assert event.reason is Reason.CLIENT_DISCONNECTED and event.outcome is Outcome.ALLOWED
    # Both ways count the whole session: the CONNECT in, the CONNACK out (sent by the
    # bridge from `Admit`, never a ToDevice) with the broker's PUBLISH.
    assert event.detail["packets_in"] == 3 and event.detail["packets_out"] == 2
    assert event.detail["bytes_in"] == len(connect) + len(publish) + len(disconnect)
    assert event.detail["bytes_out"] == len(admission.connack) + len(publish)
    assert session.close(Reason.CONNECTION_LOST) == []  # already ended


def test_broker_refusal_is_passed_on() -> None:
    session = new_session()
    session.receive_device(encode(Connect(protocol_level=4, client_id="d1"), version=4))
    session.device_checked(Reason.OK)
    actions = session.receive_upstream(encode(Connack(reason_code=5), version=4))
    assert device_bytes(actions, 4) == [Connack(reason_code=5)]
    assert records(actions)[0].detail == {"broker_reason_code": 5}


def test_enhanced_authentication_is_refused() -> None:
    session = new_session()
    props = Properties.of((PropertyId.AUTHENTICATION_METHOD, "SCRAM-SHA-1"))
    actions = session.receive_device(
        encode(Connect(protocol_level=5, client_id="d1", properties=props), version=5)
    )
    assert device_bytes(actions, 5) == [Connack(reason_code=0x8C)]
    assert records(actions)[0].reason is Reason.PROTOCOL_ERROR
