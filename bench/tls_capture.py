"""Benchmark: what the TLS accelerator's verify callback costs a handshake (gateway/_tlsext.c).

The gateway's server context carries an OpenSSL verify callback that keeps a refused
connection's leaf certificate. It must cost nothing measurable on a successful handshake
(it returns at its first test for every certificate of a good chain). This runs complete
TLS 1.3 handshakes in one process over memory BIOs: a device (its certificate from a
scratch CA made with the project's CA code) against `gateway.tls.TlsPump`, with the
server context as the gateway builds it and with the same context built without the
callback. Only the server's side is timed (thread CPU time around `TlsPump.feed`), so the
client's work does not dilute the difference.

Prints, for successful and for refused (expired certificate) handshakes, the median server
CPU per handshake of ``--repeat`` alternating rounds of ``--handshakes`` each, with and
without the callback, and the difference. For refusals the "with" column also includes
what the gateway then does in Python with the kept leaf (`describe_certificate`, cached per
certificate: one device retrying), and a last line what describing a new certificate costs.

Usage: .venv/bin/python bench/tls_capture.py [--handshakes 400] [--repeat 7]
"""

from __future__ import annotations

import argparse
import ssl
import statistics
import tempfile
import time
import timeit
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway import tls
from gateway.tls import TlsFailure, TlsPump, server_context
from provisioning.agent.device import key_pem
from provisioning.pki.ca import DeviceIdentity, SignOptions, to_pem
from provisioning.pki.directory import init_pki, load_ca
from schemas.certificates import _describe, describe_certificate

PASSPHRASE = b"bench"


def device_files(directory: Path, name: str, not_after: datetime) -> tuple[Path, Path]:
    ca = load_ca(directory, PASSPHRASE)
    key = ec.generate_private_key(ec.SECP256R1())
    options = SignOptions(not_before=not_after - timedelta(days=30), not_after=not_after)
    cert = ca.issue_device_certificate(
        key.public_key(), DeviceIdentity(name, "bench", "devicegate.local"), options
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_text(to_pem(cert))
    key_path.write_bytes(key_pem(key))
    return cert_path, key_path


def client_context(directory: Path, cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(directory / "chain.pem"))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(str(cert), str(key))
    return context


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, refused: bool) -> int:
    """One handshake over memory; the server's thread CPU time in ns."""
    pump = TlsPump(server)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    peer = client.wrap_bio(incoming, outgoing, server_hostname="localhost")
    spent = 0
    for _ in range(10):
        try:
            peer.do_handshake()
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError:
            break  # TLS 1.2 clients learn of the refusal in the handshake
        flight = outgoing.read()
        if not flight:
            break
        start = time.thread_time_ns()
        try:
            pump.feed(flight)
        except TlsFailure as failure:
            if failure.presented is not None:
                describe_certificate(failure.presented)
            spent += time.thread_time_ns() - start
            assert refused, failure
            return spent
        spent += time.thread_time_ns() - start
        incoming.write(pump.take_outgoing())
    assert pump.handshake_complete and not refused
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--handshakes", type=int, default=400)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    if not tls.CAPTURES_PRESENTED:
        raise SystemExit("gateway._tlsext is not built: nothing to measure")
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        init_pki(directory, passphrase=PASSPHRASE, server_names=["localhost"])
        pki = (directory / "chain.pem", directory / "server.crt", directory / "server.key")
        with_callback = server_context(*pki)
        saved, tls._tlsext = tls._tlsext, None  # the same context, minus the callback
        try:
            without = server_context(*pki)
        finally:
            tls._tlsext = saved
        now = datetime.now(UTC)
        good = client_context(directory, *device_files(directory, "good", now + timedelta(1)))
        expired = client_context(directory, *device_files(directory, "old", now - timedelta(1)))
        print(
            f"{ssl.OPENSSL_VERSION}; {args.repeat} alternating rounds of {args.handshakes}"
            " TLS 1.3 handshakes; server CPU per handshake (median)"
        )
        print(f"{'handshake':<10} {'callback':>12} {'without':>12} {'difference':>16}")
        for name, client, refused in (("success", good, False), ("refused", expired, True)):
            figures: dict[bool, list[float]] = {True: [], False: []}
            for context in (with_callback, without):  # warm-up, untimed
                for _ in range(50):
                    handshake(context, client, refused)
            for _ in range(args.repeat):
                for installed, context in ((True, with_callback), (False, without)):
                    total = sum(handshake(context, client, refused) for _ in range(args.handshakes))
                    figures[installed].append(total / args.handshakes / 1000)
            on, off = statistics.median(figures[True]), statistics.median(figures[False])
            print(f"{name:<10} {on:>9.1f} us {off:>9.1f} us "
                  f"{on - off:>+8.1f} us {100 * (on - off) / off:>+5.1f}%")  # fmt: skip
        # The refusals above describe one certificate again and again (cached after the
        # first); a new certificate each time costs its description once:
        leaf = (directory / "old.crt").read_bytes()
        der = x509.load_pem_x509_certificate(leaf).public_bytes(serialization.Encoding.DER)
        cold = timeit.repeat(lambda: _describe.__wrapped__(der), number=200, repeat=args.repeat)
        print(f"describing a new refused certificate: {min(cold) / 200 * 1e6:.1f} us (best)")


if __name__ == "__main__":
    main()
