"""atheris harness for the PROXY protocol v2 parser (gateway.proxy).

The rule, for any bytes: ``parse_header`` returns a header or NEED_DATA, or raises
ProxyProtocolError; nothing else escapes. Per input also:

* a header never claims more bytes than it was given, nor more than ``16 + max_length``;
* NEED_DATA only while fewer than ``16 + max_length`` bytes are held (bounded buffering);
* a strict prefix of an accepted header is NEED_DATA, and bytes after it change nothing;
* `ProxyGate` fed in two pieces decides as `parse_header` does on the whole (trusted), and
  passes a non-PROXY stream through untouched (untrusted).
"""

from __future__ import annotations

import sys

import atheris  # type: ignore[import-untyped]

with atheris.instrument_imports():
    from gateway.proxy import (
        NEED_DATA,
        ProxyGate,
        ProxyHeader,
        ProxyProtocolError,
        parse_header,
        signature_prefix,
    )


def parse(data: bytes, max_length: int) -> ProxyHeader | object:
    try:
        return parse_header(data, max_length=max_length)
    except ProxyProtocolError as exc:
        return ("error", type(exc))


def check(data: bytes, max_length: int, cut: int) -> None:
    result = parse(data, max_length)
    if result is NEED_DATA:
        assert len(data) < 16 + max_length, f"NEED_DATA while holding {len(data)} bytes"
    elif isinstance(result, ProxyHeader):
        assert 16 <= result.length <= min(len(data), 16 + max_length)
        header = data[: result.length]
        assert parse(header + b"\x16\x03\x01tail", max_length) == result
        if result.length > 16:
            assert parse(header[: 16 + (cut % (result.length - 16))], max_length) is NEED_DATA
    # The gate, trusted: the same verdict, fed in two pieces.
    gate = ProxyGate(trusted=True, max_length=max_length)
    verdict: object
    try:
        first = gate.feed(data[:cut])
        # Decided on the first piece: the second is simply more TLS bytes.
        verdict = gate.feed(data[cut:]) if first is None else (first[0], first[1] + data[cut:])
    except ProxyProtocolError:
        verdict = "error"
    if isinstance(result, ProxyHeader):
        assert verdict == (result, data[result.length :]), (verdict, result)
    elif result is NEED_DATA:
        assert verdict is None and gate.buffered == len(data)
    else:
        assert verdict == "error", verdict
    # Untrusted: anything that is not (a prefix of) the signature passes through untouched.
    gate = ProxyGate(trusted=False, max_length=max_length)
    try:
        passed = gate.feed(data)
    except ProxyProtocolError:
        assert signature_prefix(data) is True
        return
    if signature_prefix(data) is False:
        assert passed == (None, data)
    else:
        assert passed is None and len(data) < 12


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    max_length = fdp.ConsumeIntInRange(0, 70_000)
    cut = fdp.ConsumeIntInRange(0, 512)
    signed = fdp.ConsumeBool()
    body = fdp.ConsumeBytes(fdp.remaining_bytes())
    if signed:  # most inputs should get past the signature
        body = b"\r\n\r\n\x00\r\nQUIT\n" + body
    check(body, max_length, cut)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
