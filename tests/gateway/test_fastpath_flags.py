"""The fast path with a policy whose conditions read the QoS or retain flag: a topic is
known good only with the flags it was allowed with, so a PUBLISH the policy would deny
is never forwarded undecoded, and an allowed one still skips decoding."""

from __future__ import annotations

from gateway.actions import Record, ToDevice, ToUpstream
from gateway.audit import EventContext
from gateway.connection import Session, State
from gateway.fastpath import SLOW, allowed_publish_end
from gateway.identity import DeviceIdentity
from gateway.mqtt import Connack, Connect, Publish, encode
from gateway.policy import compile_for
from schemas.events import Reason
from schemas.policy import Action, Conditions, Effect, Policy, PolicyFile, Statement

ID = DeviceIdentity(device_id="d1", fleet="plant", serial="abc", fingerprint="00" * 32)
TOPIC = "devices/d1/t"


def _session() -> Session:
    policy = Policy(
        statements=(
            Statement(id="c", effect=Effect.ALLOW, actions=(Action.CONNECT,), resources=("d1",)),
            Statement(
                id="qos0-only",
                effect=Effect.ALLOW,
                actions=(Action.PUBLISH,),
                resources=("devices/{device_id}/#",),
                conditions=Conditions(max_qos=0),
            ),
        )
    )
    document = PolicyFile.model_validate(
        {"policies": {"p": policy.model_dump()}, "attach": [{"policy": "p", "fleet": "plant"}]}
    )
    compiled = compile_for(document, ID)
    assert compiled.publish_flags_matter
    session = Session(
        identity=ID, policy=compiled, context=EventContext(instance="t"), max_packet_size=4096
    )
    session.receive_device(encode(Connect(protocol_level=5, client_id="d1"), version=5))
    session.device_checked(Reason.OK)
    session.receive_upstream(encode(Connack(), version=5))
    session.admitted()
    assert session.state is State.ACTIVE
    return session


def test_allowed_flags_go_fast_and_other_flags_are_judged() -> None:
    session = _session()
    qos0 = encode(Publish(topic=TOPIC, payload=b"x"), version=5)
    qos1 = encode(Publish(topic=TOPIC, payload=b"x", qos=1, packet_id=5), version=5)
    retained = encode(Publish(topic=TOPIC, payload=b"x", retain=True), version=5)
    assert session.receive_device(qos0) == [ToUpstream(qos0)]  # decoded, allowed, remembered
    flagged = session._raw_flagged
    assert flagged == {0: {TOPIC.encode(): True}}  # known good with QoS 0, retain 0 only
    fast = {"v5": True, "max_packet_size": 4096, "allowed": {}, "flagged": flagged}
    assert allowed_publish_end(qos0, 0, len(qos0), **fast) == len(qos0)
    assert allowed_publish_end(qos1, 0, len(qos1), **fast) == SLOW
    packets = session.packets_in
    assert session.receive_device(qos0 * 3) == [ToUpstream(qos0 * 3)]  # the fast path
    assert session.packets_in == packets + 3
    actions = session.receive_device(qos1)  # same topic, QoS 1: denied by the condition
    assert not any(isinstance(a, ToUpstream) for a in actions)
    assert any(isinstance(a, ToDevice) for a in actions)  # PUBACK 0x87
    (record,) = [a for a in actions if isinstance(a, Record)]
    assert record.event.detail["statement"] == "default-deny"
    assert session.receive_device(qos1) and session.state is State.ACTIVE  # still judged
    assert allowed_publish_end(retained, 0, len(retained), **fast) == SLOW
