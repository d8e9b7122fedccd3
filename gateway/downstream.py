"""Broker-to-device bytes: passed through untouched, except SUBACKs the gateway must merge.

Decision (issue 4): the broker direction is always frame-split, cheaply. Only the fixed
header of each frame is read (type and Remaining Length, a few byte reads), the payload
is skipped by a counter, and a chunk with nothing to rewrite is forwarded as the very
object that was received. Splitting always, rather than only while a rewrite is pending,
is what keeps the frame boundaries known at the moment a partially denied SUBSCRIBE
starts one; it also gives the packet counts for ``session_end``.

Invariants:

* Deliveries are judged only when the session's policy has ``receive`` statements
  (``judge`` set): then each PUBLISH's topic is read from its first bytes (its payload
  never), a withheld one is dropped whole, even across reads, and acknowledged to the
  broker by the gateway (PUBACK; PUBREC, then PUBCOMP for its PUBREL, which the device
  never sees), so the broker neither retries nor stalls. MQTT 5 topic aliases the broker
  sets are followed (those PUBLISHes are decoded). Without ``judge`` nothing changes.
* Nothing but a SUBACK whose packet id has a pending merge is ever decoded; the packet id
  of an UNSUBACK is read only while the gateway awaits one for its own UNSUBSCRIBE
  (``unsubacks``, after a policy change), and that UNSUBACK is swallowed.
* Output order equals input order; a held partial frame is never forwarded early.
* A merged SUBACK has one code per filter of the device's original SUBSCRIBE, the denied
  codes at their original positions, the broker's codes (and properties) for the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Final

from gateway.mqtt.codec import decode, encode
from gateway.mqtt.errors import MalformedPacket
from gateway.mqtt.packets import Publish, Suback

__all__ = ["Downstream", "SubackMerge"]

_SUBACK: Final = 9
_UNSUBACK: Final = 11
_PUBLISH: Final = 3
_PUBREL: Final = 6
_PINGRESP: Final = 13
_UNSPECIFIED_ERROR_V3: Final = 0x80


@dataclass(frozen=True, slots=True)
class SubackMerge:
    """How to rebuild one SUBACK: ``None`` where the broker's next code goes."""

    codes: tuple[int | None, ...]

    def apply(self, suback: Suback) -> Suback:
        broker = iter(suback.reason_codes)
        merged = tuple(
            code if code is not None else next(broker, _UNSPECIFIED_ERROR_V3) for code in self.codes
        )
        return replace(suback, reason_codes=merged)


def _frame_at(data: bytes, pos: int, n: int) -> tuple[int, int] | None:
    """``(packet_type, total_size)`` of the frame at ``pos``, or None if the header is cut."""
    if pos + 1 >= n:
        return None
    length = 0
    shift = 0
    i = pos + 1
    while True:
        if i >= n:
            return None
        byte = data[i]
        length |= (byte & 0x7F) << shift
        i += 1
        if byte < 0x80:
            break
        shift += 7
        if shift > 21:
            raise MalformedPacket("remaining length longer than 4 bytes")
    return data[pos] >> 4, i - pos + length


def _id_at(data: bytes, pos: int) -> int:
    """Offset of the packet id in the frame at ``pos`` (after the Remaining Length)."""
    i = pos + 1
    while data[i] & 0x80:
        i += 1
    return i + 1 - pos


class Downstream:
    """Cuts the broker's byte stream into what the device gets."""

    __slots__ = (
        "_aliases",
        "_dropping",
        "_pubrels",
        "_received",
        "_skip",
        "_tail",
        "judge",
        "merges",
        "packets",
        "pingresps",
        "replies",
        "swallow",
        "unsubacks",
        "version",
        "withheld",
    )

    def __init__(self, version: int) -> None:
        self.version = version
        self.merges: dict[int, SubackMerge] = {}
        self.packets = 0
        self.pingresps = 0  # a drain's PINGREQ barrier waits for the next one
        self.swallow = 0  # PINGRESPs owed to the gateway's own PINGREQs: not the device's
        self.unsubacks: set[int] = set()  # packet ids of the gateway's own UNSUBSCRIBEs
        self.judge: Callable[[str], bool] | None = None  # may this delivery reach the device?
        self.replies: list[bytes] = []  # the gateway's acks of withheld deliveries, upstream
        self.withheld = 0
        self._received: dict[bytes, bool] = {}  # topic bytes -> judge's verdict
        self._aliases: dict[int, str] = {}  # the broker's MQTT 5 topic aliases
        self._pubrels: set[int] = set()  # QoS 2 deliveries withheld: their PUBREL is ours
        self._dropping = False  # the frame being skipped across reads is withheld
        self._skip = 0
        self._tail = b""

    def feed(self, data: bytes) -> list[bytes | memoryview]:
        """Take broker bytes; return the byte strings to send to the device, in order.

        Raises:
            MalformedPacket: the broker sent a broken frame header or SUBACK.
        """
        n = len(data)
        skip = self._skip
        if skip >= n and not self._tail:
            self._skip = skip - n
            return [] if self._dropping else [data]
        if self._tail:
            data = self._tail + data
            n = len(data)
            self._tail = b""
        pos = min(skip, n)
        self._skip = 0
        out: list[bytes | memoryview] = []
        start = pos if self._dropping else 0
        self._dropping = False
        merges = self.merges
        judge = self.judge
        while pos < n:
            frame = _frame_at(data, pos, n)
            if frame is None:
                self._tail = data[pos:]
                break
            packet_type, size = frame
            end = pos + size
            if packet_type == _PINGRESP:
                self.pingresps += 1
                if self.swallow and end <= n:
                    self.swallow -= 1
                    if start < pos:
                        out.append(memoryview(data)[start:pos])
                    start = end
            if packet_type == _UNSUBACK and self.unsubacks:
                if end > n:
                    self._tail = data[pos:]
                    break
                at = pos + _id_at(data, pos)
                if at + 2 > end:
                    raise MalformedPacket("UNSUBACK without a packet id from the broker")
                packet_id = (data[at] << 8) | data[at + 1]
                if packet_id in self.unsubacks:
                    self.unsubacks.discard(packet_id)
                    if start < pos:
                        out.append(memoryview(data)[start:pos])
                    start = end
                    self.packets -= 1  # not the device's
            if judge is not None and packet_type in (_PUBLISH, _PUBREL):
                verdict = self._judge(data, pos, n, end, packet_type)
                if verdict is None:  # its topic is not all here yet
                    self._tail = data[pos:]
                    break
                if not verdict:  # withheld: dropped, acknowledged by the gateway
                    if start < pos:
                        out.append(memoryview(data)[start:pos])
                    if end > n:
                        self._skip = end - n
                        self._dropping = True
                        pos = start = n
                        break
                    pos = start = end
                    continue
            if packet_type == _SUBACK and merges:
                if end > n:
                    self._tail = data[pos:]
                    break
                rewritten = self._merge(memoryview(data)[pos:end])
                if rewritten is not None:
                    if start < pos:
                        out.append(memoryview(data)[start:pos])
                    out.append(rewritten)
                    start = end
            self.packets += 1
            if end > n:
                self._skip = end - n
                pos = n
                break
            pos = end
        if start == 0 and pos == n:
            out.append(data)
        elif start < pos:
            out.append(memoryview(data)[start:pos])
        return out

    def _judge(self, data: bytes, pos: int, n: int, end: int, packet_type: int) -> bool | None:
        """Whether the PUBLISH (or PUBREL) at ``pos`` goes to the device; None: read more."""
        at = pos + _id_at(data, pos)  # the fixed header is whole (`_frame_at`)
        if packet_type == _PUBREL:  # the end of a QoS 2 delivery the device never saw?
            if not self._pubrels:
                return True
            if end > n:
                return None
            packet_id = (data[at] << 8) | data[at + 1]
            if packet_id not in self._pubrels:
                return True
            self._pubrels.discard(packet_id)
            self.replies.append(bytes((0x70, 2, data[at], data[at + 1])))  # PUBCOMP
            return False
        if at + 2 > n:
            return None
        topic_end = at + 2 + ((data[at] << 8) | data[at + 1])
        qos = (data[pos] >> 1) & 3
        head = topic_end + (2 if qos else 0)
        v5 = self.version == 5
        if head + (1 if v5 else 0) > n:
            return None
        if v5 and (data[head] or topic_end == at + 2):  # properties: perhaps a topic alias
            if end > n:
                return None
            result = decode(memoryview(data)[pos:end], version=self.version)
            assert isinstance(result, tuple)
            publish = result[0]
            assert isinstance(publish, Publish)
            alias = publish.properties.topic_alias
            topic = publish.topic
            if alias is not None:
                if topic:
                    self._aliases[alias] = topic
                else:
                    topic = self._aliases.get(alias, "")
            allowed = bool(topic) and self._allowed(topic.encode())
        else:
            allowed = self._allowed(data[at + 2 : topic_end])
        if allowed:
            return True
        self.withheld += 1
        if qos:
            raw_id = bytes(data[topic_end : topic_end + 2])
            if qos == 1:
                self.replies.append(b"\x40\x02" + raw_id)  # PUBACK
            else:
                self._pubrels.add((raw_id[0] << 8) | raw_id[1])
                self.replies.append(b"\x50\x02" + raw_id)  # PUBREC
        return False

    def _allowed(self, topic: bytes) -> bool:
        verdict = self._received.get(topic)
        if verdict is None:
            judge = self.judge
            assert judge is not None
            verdict = judge(topic.decode("utf-8", "replace"))
            if len(self._received) >= 1024:
                self._received.clear()
            self._received[topic] = verdict
        return verdict

    def judged_by(self, judge: Callable[[str], bool] | None) -> None:
        """Judge deliveries with ``judge`` from now on (None: every delivery passes)."""
        self.judge = judge
        self._received.clear()

    def _merge(self, frame: memoryview) -> bytes | None:
        result = decode(frame, version=self.version)
        if not isinstance(result, tuple) or not isinstance(result[0], Suback):
            raise MalformedPacket("broken SUBACK from the broker")
        suback = result[0]
        merge = self.merges.pop(suback.packet_id, None)
        if merge is None:
            return None
        return encode(merge.apply(suback), version=self.version)
