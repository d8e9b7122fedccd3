"""Deliveries judged by a policy's receive rules (`gateway.downstream.Downstream.judge`):
withheld PUBLISHes are dropped whole (even split across reads) and acknowledged to the
broker by the gateway; allowed ones pass untouched; without a judge nothing changes."""

from __future__ import annotations

import pytest

from gateway.downstream import Downstream
from gateway.mqtt import encode
from gateway.mqtt.packets import Publish, Pubrel, Suback
from gateway.mqtt.properties import Properties, PropertyId


def _judge(topic: str) -> bool:
    return not topic.startswith("secret/")


def _feed(downstream: Downstream, data: bytes, cut: int | None = None) -> bytes:
    pieces = [data] if cut is None else [data[:cut], data[cut:]]
    return b"".join(bytes(chunk) for piece in pieces for chunk in downstream.feed(piece))


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("cut", [None, 1, 3, 9, 40])
def test_withheld_deliveries_are_dropped_and_acknowledged(version: int, cut: int | None) -> None:
    downstream = Downstream(version)
    downstream.judged_by(_judge)
    kept = encode(Publish(topic="open/a", payload=b"k" * 50, qos=1, packet_id=3), version=version)
    withheld = [
        encode(
            Publish(topic="secret/x", payload=b"s" * 50, qos=qos, packet_id=pid), version=version
        )
        for qos, pid in ((0, None), (1, 7), (2, 8))
    ]
    stream = withheld[0] + kept + withheld[1] + withheld[2] + kept
    out = b""
    for frame_start in range(0, len(stream), 60):  # reads that cut frames anywhere
        out += _feed(downstream, stream[frame_start : frame_start + 60], cut)
    assert out == kept + kept
    assert downstream.withheld == 3
    assert downstream.replies == [b"\x40\x02\x00\x07", b"\x50\x02\x00\x08"]  # PUBACK, PUBREC
    # The broker's PUBREL for the withheld QoS 2 delivery is the gateway's: PUBCOMP.
    downstream.replies.clear()
    device_pubrel = encode(Pubrel(packet_id=3), version=version)
    ours = encode(Pubrel(packet_id=8), version=version)
    assert _feed(downstream, ours + device_pubrel) == device_pubrel
    assert downstream.replies == [b"\x70\x02\x00\x08"]


def test_without_a_judge_every_delivery_passes_as_received() -> None:
    downstream = Downstream(4)
    data = encode(Publish(topic="secret/x", payload=b"s", qos=1, packet_id=1), version=4)
    data += encode(Suback(packet_id=2, reason_codes=(0,)), version=4)
    (chunk,) = downstream.feed(data)
    assert chunk is data and downstream.withheld == 0 and not downstream.replies


def test_v5_topic_aliases_set_by_the_broker_are_followed() -> None:
    downstream = Downstream(5)
    downstream.judged_by(_judge)

    def aliased(topic: str, alias: int) -> bytes:
        properties = Properties(((PropertyId.TOPIC_ALIAS, alias),))
        return encode(Publish(topic=topic, payload=b"p", properties=properties), version=5)

    first_open, first_secret = aliased("open/a", 1), aliased("secret/b", 2)
    again_open, again_secret = aliased("", 1), aliased("", 2)
    out = _feed(downstream, first_open + first_secret + again_open + again_secret)
    assert out == first_open + again_open
    assert downstream.withheld == 2
