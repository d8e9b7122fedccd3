"""The hot path: recognise an already-allowed PUBLISH from its bytes, without decoding it.

Most of a device's traffic is PUBLISH to the few topics it always uses. Once a topic has
been decoded, validated and allowed, its raw bytes are remembered per session; a later
PUBLISH to the same bytes is checked here with a few byte reads and forwarded untouched.

Invariants:

* Returns the frame's end only when the full decoder would accept the packet and the
  session would forward it unchanged: flags (QoS 0-2, no DUP on QoS 0), a Remaining Length
  in shortest form within ``max_packet_size``, a non-empty topic whose exact bytes are
  known good (hence valid UTF-8 without wildcards), a non-zero packet id for QoS > 0, and
  on MQTT 5 an empty property block (so no Topic Alias to resolve). The payload is opaque
  in both versions, so nothing else can be malformed.
* When the policy's conditions read the QoS or the retain flag, a topic is known good only
  together with the flags it was allowed with (``flagged``).
* Anything else returns `SLOW` and the caller decodes normally (which raises or judges);
  an incomplete frame returns `MORE`. It never raises and never allows what the slow path
  would not: the cache only holds topics the slow path allowed.
"""

from __future__ import annotations

from typing import Final

__all__ = ["MORE", "SLOW", "allowed_publish_end"]

MORE: Final = 0
SLOW: Final = -1


def allowed_publish_end(
    data: bytes,
    pos: int,
    n: int,
    *,
    v5: bool,
    max_packet_size: int,
    allowed: dict[bytes, bool],
    flagged: dict[int, dict[bytes, bool]] | None = None,
) -> int:
    """The end offset of the allowed PUBLISH frame at ``data[pos]``, or `MORE` / `SLOW`.

    Args:
        data: The received bytes; ``data[pos]`` is the first byte of a PUBLISH frame.
        pos: Where the frame starts.
        n: ``len(data)``.
        v5: Whether the session speaks MQTT 5.
        max_packet_size: The session's packet size limit.
        allowed: Raw topic bytes the slow path decoded and allowed.
        flagged: Instead of ``allowed`` when the policy's conditions read the QoS and
            retain flag: the allowed raw topics per ``qos << 1 | retain``.
    """
    flags = data[pos] & 0x0F
    qos = (flags >> 1) & 3
    if qos == 3 or (qos == 0 and flags & 8):
        return SLOW
    i = pos + 1
    length = 0
    shift = 0
    while True:
        if i >= n:
            return MORE
        byte = data[i]
        i += 1
        length |= (byte & 0x7F) << shift
        if byte < 0x80:
            if byte == 0 and shift:
                return SLOW  # not the shortest form
            break
        shift += 7
        if shift > 21:
            return SLOW
    end = i + length
    if end - pos > max_packet_size:
        return SLOW
    if end > n:
        return MORE
    if i + 2 > end:
        return SLOW
    topic_start = i + 2
    topic_end = topic_start + ((data[i] << 8) | data[i + 1])
    if topic_end == topic_start:
        return SLOW  # empty topic: a Topic Alias use
    p = topic_end
    if qos:
        if p + 2 > end or not (data[p] | data[p + 1]):
            return SLOW
        p += 2
    if v5:
        if p >= end or data[p]:
            return SLOW  # properties to look at (a Topic Alias among them, perhaps)
    elif p > end:
        return SLOW
    if flagged is not None:
        table = flagged.get(flags & 7)  # QoS and retain; DUP does not matter
        if table is None:
            return SLOW
        allowed = table
    if allowed.get(data[topic_start:topic_end]) is not True:
        return SLOW
    return end
