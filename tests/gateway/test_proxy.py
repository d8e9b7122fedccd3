"""The PROXY v2 parser: every input whole, byte by byte and with trailing data; fuzzed."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.proxy import (
    NEED_DATA,
    SIGNATURE,
    Command,
    ProxyGate,
    ProxyHeader,
    ProxyProtocolError,
    parse_header,
)

TLS_START = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"


def header(
    command: int = 1,
    family_transport: int = 0x11,
    body: bytes | None = None,
    *,
    version: int = 2,
    tlvs: bytes = b"",
    length: int | None = None,
) -> bytes:
    if body is None:
        if family_transport >> 4 == 2:
            body = (
                ipaddress.IPv6Address("2001:db8::7").packed
                + ipaddress.IPv6Address("2001:db8::1").packed
                + struct.pack("!HH", 51000, 8883)
            )
        elif family_transport >> 4 == 1:
            body = bytes([192, 0, 2, 7, 10, 0, 0, 1]) + struct.pack("!HH", 51000, 8883)
        else:
            body = b""
    body += tlvs
    size = len(body) if length is None else length
    return (
        SIGNATURE
        + bytes([version << 4 | command, family_transport])
        + struct.pack("!H", size)
        + body
    )


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def parse_all_ways(data: bytes) -> ProxyHeader:
    """Whole, whole + trailing bytes, and every strict prefix (NEED_DATA)."""
    whole = parse_header(data)
    assert isinstance(whole, ProxyHeader)
    assert whole.length == len(data)
    trailing = parse_header(data + TLS_START)
    assert trailing == whole
    for cut in range(len(data)):
        assert parse_header(data[:cut]) is NEED_DATA, cut
    # And through the gate, byte by byte.
    gate = ProxyGate(trusted=True)
    stream = data + TLS_START
    for i, byte in enumerate(stream):
        out = gate.feed(bytes([byte]))
        if i < len(data) - 1:
            assert out is None
        elif i == len(data) - 1:
            assert out == (whole, b"")
            break
    return whole


def test_ipv4() -> None:
    parsed = parse_all_ways(header())
    assert parsed.command is Command.PROXY
    assert parsed.source == ("192.0.2.7", 51000)
    assert parsed.destination == ("10.0.0.1", 8883)
    assert parsed.tlvs == ()


def test_ipv6() -> None:
    parsed = parse_all_ways(header(family_transport=0x21))
    assert parsed.source == ("2001:db8::7", 51000)
    assert parsed.destination == ("2001:db8::1", 8883)


def test_ipv4_mapped_ipv6_reads_as_ipv4() -> None:
    body = (
        ipaddress.IPv6Address("::ffff:192.0.2.9").packed
        + ipaddress.IPv6Address("::1").packed
        + struct.pack("!HH", 1, 2)
    )
    parsed = parse_all_ways(header(family_transport=0x21, body=body))
    assert parsed.source == ("192.0.2.9", 1)


def test_local_health_check() -> None:
    # HAProxy's check-send-proxy: LOCAL, AF_UNSPEC, no address block.
    parsed = parse_all_ways(header(command=0, family_transport=0x00))
    assert parsed.command is Command.LOCAL
    assert parsed.source is None
    # LOCAL with an address block: the block is ignored.
    assert parse_all_ways(header(command=0, family_transport=0x11)).source is None


def test_unspec_and_unix_give_no_address() -> None:
    assert parse_all_ways(header(family_transport=0x00)).source is None
    unix = header(family_transport=0x31, body=b"/a".ljust(108, b"\0") + b"/b".ljust(108, b"\0"))
    assert parse_all_ways(unix).source is None


def test_tlvs_are_walked_and_returned() -> None:
    tlvs = tlv(0x01, b"mqtt") + tlv(0x04, b"") + tlv(0x05, b"\x00" * 8)
    parsed = parse_all_ways(header(tlvs=tlvs))
    assert parsed.tlvs == ((0x01, b"mqtt"), (0x04, b""), (0x05, b"\x00" * 8))
    assert parsed.source == ("192.0.2.7", 51000)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x16\x03\x01\x00", "signature"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "signature"),
        (SIGNATURE[:5] + b"x", "signature"),
        (header(version=1), "version"),
        (header(command=2), "command"),
        (header(family_transport=0x12), "datagram"),
        (header(family_transport=0x41), "family"),
        (header(family_transport=0x13), "family"),
        (header(family_transport=0x11, body=b"\x00" * 11), "address block"),
        (header(family_transport=0x21, body=b"\x00" * 12), "address block"),
        (header(tlvs=b"\x01\x00"), "TLV header"),
        (header(tlvs=b"\x01\x00\x05abc"), "overruns"),
        (header(length=5000, body=b""), "above"),
    ],
)
def test_malformed(data: bytes, message: str) -> None:
    with pytest.raises(ProxyProtocolError, match=message):
        parse_header(data)


def test_length_bound_is_enforced_before_the_body_arrives() -> None:
    # Only the fixed part: the length field alone is refused, nothing is buffered.
    with pytest.raises(ProxyProtocolError):
        parse_header(header(length=65535, body=b"")[:16])
    gate = ProxyGate(trusted=True, max_length=64)
    with pytest.raises(ProxyProtocolError):
        gate.feed(header(length=65, body=b"")[:16])


def test_gate_trusted_requires_the_header() -> None:
    gate = ProxyGate(trusted=True)
    with pytest.raises(ProxyProtocolError):
        gate.feed(TLS_START)
    gate = ProxyGate(trusted=True)
    assert gate.feed(SIGNATURE[:7]) is None
    assert gate.buffered == 7
    out = gate.feed(header()[7:] + TLS_START)
    assert out is not None
    parsed, rest = out
    assert parsed is not None and parsed.source == ("192.0.2.7", 51000)
    assert rest == TLS_START


def test_gate_untrusted_passes_tls_and_refuses_a_header() -> None:
    assert ProxyGate(trusted=False).feed(TLS_START) == (None, TLS_START)
    gate = ProxyGate(trusted=False)
    assert gate.feed(SIGNATURE[:3]) is None
    assert gate.feed(b"x") == (None, SIGNATURE[:3] + b"x")  # not the signature after all
    gate = ProxyGate(trusted=False)
    assert gate.feed(SIGNATURE[:6]) is None
    with pytest.raises(ProxyProtocolError, match="not in proxy_protocol_from"):
        gate.feed(SIGNATURE[6:] + b"\x21\x11")


@given(st.binary(max_size=300))
def test_random_bytes_header_or_error(data: bytes) -> None:
    try:
        result = parse_header(data)
    except ProxyProtocolError:
        return
    assert result is NEED_DATA or (isinstance(result, ProxyHeader) and result.length <= len(data))


@given(
    st.sampled_from([0x00, 0x01, 0x02]),
    st.integers(0, 0x3F),
    st.binary(max_size=300),
    st.integers(0, 400),
)
def test_random_headers_after_the_signature(
    command: int, family: int, body: bytes, length: int
) -> None:
    data = SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", length) + body
    for feed in (data, data + TLS_START):
        try:
            result = parse_header(feed, max_length=300)
        except ProxyProtocolError:
            continue
        if result is NEED_DATA:
            assert len(feed) < 16 + length
        else:
            assert isinstance(result, ProxyHeader)
            assert result.length == 16 + length


@given(st.binary(max_size=200), st.booleans())
def test_gate_random_bytes_never_raise_anything_else(data: bytes, trusted: bool) -> None:
    gate = ProxyGate(trusted=trusted, max_length=128)
    try:
        for i in range(0, len(data), 7):
            out = gate.feed(data[i : i + 7])
            if out is not None:
                return
    except ProxyProtocolError:
        return
    assert gate.buffered <= 16 + 128
