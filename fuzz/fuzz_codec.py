"""atheris harness for the MQTT codec (gateway.mqtt) and the PUBLISH fast path.

The rule, for any bytes: ``decode`` returns a packet or NEED_DATA, or raises
MalformedPacket; nothing else escapes. On top of that, per input:

* a decoded packet encodes back to bytes that decode to the same packet;
* feeding the stream in two pieces (cut where the input says) decodes the same packets and
  stops at the same error as feeding it whole;
* with ``max_packet_size``, the receive loop never holds more than that many bytes while
  waiting (a too-large packet is refused from its fixed header);
* the fast path never accepts a PUBLISH the decoder refuses, and agrees on its length.

Memory is bounded by ``-rss_limit_mb`` (see fuzz/run.sh). Run: ``bash fuzz/run.sh 60``.
"""

from __future__ import annotations

import sys

import atheris  # type: ignore[import-untyped]

with atheris.instrument_imports():
    from gateway.fastpath import allowed_publish_end
    from gateway.mqtt import NEED_DATA, Connect, MalformedPacket, Publish, decode, encode


def receive(
    chunks: list[bytes], version: int, limit: int | None
) -> tuple[list[object], int | None]:
    """A session's receive loop: buffer, decode until NEED_DATA, stop at the first error."""
    buf = b""
    packets: list[object] = []
    for chunk in chunks:
        buf += chunk
        while True:
            try:
                result = decode(buf, version=version, max_packet_size=limit)
            except MalformedPacket as exc:
                assert exc.v5_reason_code in (0x81, 0x82, 0x84, 0x95), exc
                return packets, exc.v5_reason_code
            if result is NEED_DATA:
                if limit is not None:
                    assert len(buf) <= max(limit, 4), f"holding {len(buf)} > {limit} bytes"
                break
            packet, used = result
            assert 2 <= used <= len(buf)
            version_of = packet.protocol_level if isinstance(packet, Connect) else version
            encoded = encode(packet, version=version_of)
            assert decode(encoded, version=version_of) == (packet, len(encoded)), packet
            packets.append(packet)
            buf = buf[used:]
    return packets, None


def fast_path(data: bytes, version: int, limit: int) -> None:
    if not data or data[0] >> 4 != 3:
        return
    try:
        result = decode(data, version=version, max_packet_size=limit)
    except MalformedPacket:
        result = None
    allowed: dict[bytes, bool] = {}
    if result is not None and result is not NEED_DATA and isinstance(result[0], Publish):
        allowed[result[0].topic.encode()] = True
    end = allowed_publish_end(
        data, 0, len(data), v5=version == 5, max_packet_size=limit, allowed=allowed
    )
    if end > 0:
        assert result is not None and result is not NEED_DATA, "fast path accepted a refusal"
        assert isinstance(result[0], Publish) and result[1] == end


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    version = 5 if fdp.ConsumeBool() else 4
    limit = fdp.ConsumeIntInRange(2, 70_000) if fdp.ConsumeBool() else None
    cut = fdp.ConsumeIntInRange(0, 4096)
    stream = fdp.ConsumeBytes(fdp.remaining_bytes())
    whole = receive([stream], version, limit)
    pieces = receive([stream[:cut], stream[cut:]], version, limit)
    assert whole == pieces, (whole, pieces)
    fast_path(stream, version, limit or 268_435_460)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
