"""Benchmark: the gateway's TLS server CPU alone, per full and per resumed handshake.

In process, no sockets: a client ``SSLObject`` (its own P-256 device certificate from the
project's CA) and the gateway's `gateway.tls.TlsPump` on the gateway's own
`gateway.tls.server_context` exchange flights through memory; only the server's
``feed`` + ``take_outgoing`` calls are timed (thread CPU time). Variants, alternating:

* **full, 1 ticket**: what a device without a ticket costs (the gateway's setting with
  resumption on: `gateway.tickets.TicketKeys` sets ``num_tickets = 1``);
* **full, no ticket**: the same with resumption off (``num_tickets = 0``): the ticket's price;
* **full, device sends its chain**: a device whose context also sends the CAs of its trust
  store (OpenSSL's default; devicegate's own device contexts did so before
  `provisioning.agent.device.present_own_chain`): what two more certificates to parse cost;
* **resumed**: a TLS 1.3 resumption from the ticket of the previous connection (PSK with
  ECDHE). The server sends no new ticket on a resumed handshake (its flight after the
  client's Finished is empty: printed), so the device keeps resuming with the ticket of its
  last full handshake until the ticket's lifetime or its certificate ends.

Then the same in C (`bench/loadgen/tls_floor.c`, compiled here when a C compiler is
present): OpenSSL alone, configured like the gateway's context, with no server around it.
Its full / resumed ratio is the most any server on this OpenSSL can save by resuming,
before it does anything else per connection (accept, MQTT, close). It also prints the
TLS state one held connection keeps (heap after the handshake, record buffers freed),
with a device that sends only its certificate and with one that sends its chain (what
Python's default client context does when its CA file holds the device's CAs).

Why: the gateway's CPU per reconnect is this TLS part plus everything the gateway does per
connection besides (`bench/resumption.py` measures the sum on a served gateway). The
ratio full / resumed of the TLS part alone bounds what resumption can save however small
the rest becomes (bench/README.md, "Reconnect storms").

Usage: .venv/bin/python bench/tls_handshake_cpu.py [--handshakes N] [--rounds R]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.tickets import TicketKeys
from gateway.tls import TlsFailure, TlsPump, server_context
from provisioning.agent.device import present_own_chain
from provisioning.pki.ca import DeviceIdentity, SignOptions
from provisioning.pki.directory import init_pki, load_ca

PASSPHRASE = b"bench-passphrase-not-secret"
PADDING = 180  # CA certificates after the leaf: ~99 KB, under OpenSSL's default 100 KiB
FLOOR_SOURCE = Path(__file__).resolve().parent / "loadgen" / "tls_floor.c"


def _pki(work: Path) -> tuple[Path, Path, Path]:
    """(pki dir, device cert, device key): a fresh CA and one device."""
    pki = work / "pki"
    init_pki(pki, passphrase=PASSPHRASE, force=True)
    ca = load_ca(pki, PASSPHRASE)
    now = datetime.now(UTC)
    options = SignOptions(not_before=now - timedelta(minutes=5), not_after=now + timedelta(days=1))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue_device_certificate(
        key.public_key(), DeviceIdentity("tls-bench", "bench", "devicegate.local"), options
    )
    cert_path, key_path = work / "device.crt", work / "device.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pki, cert_path, key_path


def device_context(pki: Path, cert: Path, key: Path, *, own_chain: bool) -> ssl.SSLContext:
    """A device's context: with ``own_chain`` a devicegate device's (`present_own_chain`:
    its certificate only), else OpenSSL's default (also the CAs of its trust store)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(pki / "chain.pem"))
    context.check_hostname = False
    context.load_cert_chain(str(cert), str(key))
    if own_chain and not present_own_chain(context):
        raise SystemExit("the TLS accelerator (gateway/_tlsext.c) is not built")
    return context


def handshake(
    server: ssl.SSLContext, client: ssl.SSLContext, session: ssl.SSLSession | None
) -> tuple[float, ssl.SSLSession | None, bool, list[int]]:
    """One handshake: (server CPU seconds, the client's session after it, resumed, the
    sizes of the server's flights)."""
    inbox, outbox = ssl.MemoryBIO(), ssl.MemoryBIO()
    device = client.wrap_bio(inbox, outbox, server_side=False, session=session)
    pump = TlsPump(server)
    spent = 0.0
    flights: list[int] = []
    for _ in range(4):  # ClientHello, then the client's certificate/Finished
        with contextlib.suppress(ssl.SSLWantReadError):
            device.do_handshake()
        data = outbox.read()
        if not data:
            break
        started = time.thread_time()
        pump.feed(data)
        out = pump.take_outgoing()
        spent += time.thread_time() - started
        flights.append(len(out))
        inbox.write(out)
    with contextlib.suppress(ssl.SSLError):  # the client reads the ticket, if one came
        device.read(1)
    return spent, device.session, pump.resumed(), flights


def padded_refusal(server: ssl.SSLContext, client: ssl.SSLContext, attempts: int) -> float:
    """Server CPU (seconds, mean) of refusing a Certificate message over the gateway's
    16 KiB limit (`_tlsext.limit_client_chain`): what a padding attacker costs it now."""
    spent = 0.0
    for _ in range(attempts):
        inbox, outbox = ssl.MemoryBIO(), ssl.MemoryBIO()
        device = client.wrap_bio(inbox, outbox, server_side=False)
        pump = TlsPump(server)
        for _ in range(4):
            with contextlib.suppress(ssl.SSLWantReadError):
                device.do_handshake()
            data = outbox.read()
            if not data:
                raise SystemExit("the padded chain was not refused")
            started = time.thread_time()
            try:
                pump.feed(data)
            except TlsFailure as failure:
                spent += time.thread_time() - started
                if "EXCESSIVE_MESSAGE_SIZE" not in failure.detail:
                    raise SystemExit(f"refused for another reason: {failure.detail}") from None
                break
            out = pump.take_outgoing()
            spent += time.thread_time() - started
            inbox.write(out)
        else:
            raise SystemExit("the padded chain was not refused")
    return spent / attempts


def openssl_floor(
    work: Path, pki: Path, cert: Path, key: Path, padded: Path, n: int, rounds: int
) -> None:
    """Print OpenSSL's own server CPU and held state (`bench/loadgen/tls_floor.c`)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        print("no C compiler: OpenSSL's floor not measured")
        return
    binary = work / "tls_floor"
    subprocess.run(
        [compiler, "-O2", "-o", str(binary), str(FLOOR_SOURCE), "-lssl", "-lcrypto"], check=True
    )
    chained = work / "device-chain.pem"
    chained.write_bytes(cert.read_bytes() + (pki / "chain.pem").read_bytes())
    server = [str(pki / "chain.pem"), str(pki / "server.crt"), str(pki / "server.key")]

    def run(device: Path, *counts: int) -> list[str]:
        args = [str(binary), *server, str(device), str(key), *map(str, counts)]
        return subprocess.run(args, check=True, capture_output=True, text=True).stdout.split()

    full, resumed, held_leaf, resumed_count = run(cert, n, rounds, 1000)
    held_chain = run(chained, 0, 0, 1000)[2]
    if int(resumed_count) != n * rounds:
        raise SystemExit(f"OpenSSL alone: only {resumed_count}/{n * rounds} handshakes resumed")
    print(f"| OpenSSL alone (C): full, 1 ticket | {float(full):.3f} ms | |")
    print(f"| OpenSSL alone (C): resumed | {float(resumed):.3f} ms | |")
    print(f"full / resumed, OpenSSL alone: {float(full) / float(resumed):.2f}x (the bound for "
          "any server on this OpenSSL)")  # fmt: skip
    print(f"TLS state per held connection (OpenSSL heap): {int(held_leaf):,} B when the device "
          f"sends its certificate, {int(held_chain):,} B when it sends its chain")  # fmt: skip
    # OpenSSL's default Certificate message limit (100 KiB), which the C program keeps.
    full_padded, _, held_padded, _ = run(padded, max(n // 10, 5), 1, 20)
    print(f"OpenSSL's default limit, a padded chain ({PADDING} CA copies): "
          f"{float(full_padded):.1f} ms per full handshake, {int(held_padded):,} B per held "
          "connection")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--handshakes", type=int, default=500, help="per variant and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="devicegate-tls-") as tmp:
        pki, cert, key = _pki(Path(tmp))
        server = server_context(pki / "chain.pem", pki / "server.crt", pki / "server.key")
        TicketKeys(server, pki / "ticket-keys", 3600)
        client = device_context(pki, cert, key, own_chain=True)
        chained = device_context(pki, cert, key, own_chain=False)
        server.num_tickets = 1
        _, ticket, _, _ = handshake(server, client, None)
        variants = (
            ("full, 1 ticket", 1, False, client),
            ("full, no ticket", 0, False, client),
            ("full, 1 ticket, device sends its chain", 1, False, chained),
            ("resumed", 1, True, client),
        )
        spent: dict[str, list[float]] = {name: [] for name, _, _, _ in variants}
        flights: dict[str, list[int]] = {}
        for _ in range(args.rounds):
            for name, tickets, resume, device in variants:
                server.num_tickets = tickets
                total, resumed = 0.0, 0
                for _ in range(args.handshakes):
                    cpu, session, was_resumed, sizes = handshake(
                        server, device, ticket if resume else None
                    )
                    total += cpu
                    resumed += was_resumed
                    if resume and session is not None:
                        ticket = session
                    flights[name] = sizes
                if resume and resumed != args.handshakes:
                    raise SystemExit(f"only {resumed}/{args.handshakes} handshakes resumed")
                spent[name].append(total / args.handshakes)
        print("| handshake | server TLS CPU (median of rounds) | server flights (bytes) |")
        print("|---|---|---|")
        for name, _, _, _ in variants:
            median = statistics.median(spent[name])
            print(f"| {name} | {1e3 * median:.3f} ms | {' + '.join(map(str, flights[name]))} |")
        full = statistics.median(spent["full, 1 ticket"])
        resumed_cpu = statistics.median(spent["resumed"])
        ticket_cpu = full - statistics.median(spent["full, no ticket"])
        print(f"full / resumed, TLS alone: {full / resumed_cpu:.2f}x; one ticket costs "
              f"{1e3 * ticket_cpu:.3f} ms of a full handshake")  # fmt: skip
        padded = Path(tmp) / "padded.pem"
        padded.write_bytes(cert.read_bytes() + (pki / "chain.pem").read_bytes() * (PADDING // 2))
        attacker = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        attacker.check_hostname = False
        attacker.verify_mode = ssl.CERT_NONE
        attacker.load_cert_chain(str(padded), str(key))
        refusal = padded_refusal(server, attacker, args.handshakes)
        print(f"the gateway refusing a padded chain ({PADDING} CA copies, "
              f"{padded.stat().st_size:,} B of PEM): {1e3 * refusal:.3f} ms")  # fmt: skip
        openssl_floor(Path(tmp), pki, cert, key, padded, args.handshakes, args.rounds)


if __name__ == "__main__":
    main()
