"""Benchmark: a device's mutual-TLS handshakes with its key in a PKCS#11 token vs in a file.

The agent can present a key that lives in a secure element or TPM (provisioning/agent/
pkcs11_key.py: OpenSSL's pkcs11 engine; every handshake signature is a C_Sign in the
token). This measures what that costs the device, with SoftHSM2 standing in for the
token: SoftHSM2 signs in software inside the client process, so its CPU is counted here,
where a real secure element would sign on its own chip (slower in wall time: tens of
milliseconds or more per ECDSA P-256 signature on I2C parts, by vendor figures not
measured here; cheaper in host CPU).

Setup, in a scratch directory: a SoftHSM2 token with an EC P-256 key generated inside it
(pkcs11-tool), a file key of the same type, both certified by a test manufacturer CA, and
devicegate's PKI (`init_pki`) for the server's certificate. The server, a process of its
own, requires a client certificate from the manufacturer CA (`serve`). The
client (this process) runs ``--repeat`` alternating rounds of ``--handshakes`` sequential
connections per key: connect, full TLS 1.3 handshake (no resumption), one line echoed
(so the server has verified the client's CertificateVerify), close.

Prints, per key, the median handshakes/s, the client process's CPU per handshake
(getrusage) and the server's (from /proc), and the token/file ratios.

Usage: .venv/bin/python bench/pkcs11_handshake.py [--handshakes 200] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from provisioning.agent.pkcs11_key import pkcs11_client_context
from provisioning.pki.directory import init_pki

MODULE = Path("/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so")
PIN = "1234"
URI = "pkcs11:token=bench;object=idevid;type=private"


def certify(
    public_key: ec.EllipticCurvePublicKey, ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate
) -> bytes:
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, "HW-BENCH")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(ca.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )


def setup(directory: Path) -> None:
    """The token (SOFTHSM2_CONF is set for this process), the certificates, the PIN."""
    (directory / "tokens").mkdir()
    conf = directory / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {directory / 'tokens'}\nobjectstore.backend = file\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)

    def run(*command: str) -> None:
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    run("softhsm2-util", "--init-token", "--free", "--label", "bench", "--pin", PIN,
        "--so-pin", "5678")  # fmt: skip
    tool = ("pkcs11-tool", "--module", str(MODULE))
    run(*tool, "--login", "--pin", PIN, "--keypairgen", "--key-type", "EC:prime256v1",
        "--label", "idevid", "--id", "01")  # fmt: skip
    run(*tool, "--read-object", "--type", "pubkey", "--id", "01",
        "--output-file", str(directory / "token.pub"))  # fmt: skip

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Bench Manufacturer")])
    now = datetime.now(UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "mfr.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    token_public = serialization.load_der_public_key((directory / "token.pub").read_bytes())
    assert isinstance(token_public, ec.EllipticCurvePublicKey)
    (directory / "token.crt").write_bytes(certify(token_public, ca_key, ca))
    file_key = ec.generate_private_key(ec.SECP256R1())
    (directory / "file.crt").write_bytes(certify(file_key.public_key(), ca_key, ca))
    key_path = directory / "file.key"
    key_path.write_bytes(
        file_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    (directory / "pin").write_text(PIN + "\n")
    (directory / "pin").chmod(0o600)
    init_pki(directory / "pki", passphrase=None)


def proc_cpu(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def round_of(
    context: ssl.SSLContext, port: int, handshakes: int, server: int
) -> tuple[float, float, float]:
    """(handshakes/s, client CPU per handshake, server CPU per handshake)."""
    start, cpu, server_cpu = time.perf_counter(), self_cpu(), proc_cpu(server)
    for _ in range(handshakes):
        raw = socket.create_connection(("127.0.0.1", port), timeout=30)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with raw, context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"ping\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = tls.recv(100)
                if not chunk:
                    raise RuntimeError("the server closed before echoing")
                reply += chunk
            assert reply == b"gnip\n", reply
    wall = time.perf_counter() - start
    return (
        handshakes / wall,
        (self_cpu() - cpu) / handshakes,
        (proc_cpu(server) - server_cpu) / handshakes,
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def serve(port: int, directory: Path) -> None:
    """The server process: one connection at a time, a client certificate from the
    manufacturer CA required, each line echoed reversed (as ``openssl s_server -rev``, but
    with TCP_NODELAY: s_server's small writes wait on delayed ACKs, ~20 ms a handshake)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "pki" / "server.crt", directory / "pki" / "server.key")
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(directory / "mfr.pem")
    with socket.create_server(("127.0.0.1", port)) as listener:
        while True:
            raw, _ = listener.accept()
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                with context.wrap_socket(raw, server_side=True) as tls:
                    line = tls.recv(100)
                    tls.sendall(line.rstrip(b"\n")[::-1] + b"\n")
            except (OSError, ssl.SSLError):
                raw.close()  # the readiness probe, or a client that went away


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--handshakes", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve, args.serve_dir)
        return
    with tempfile.TemporaryDirectory(prefix="pkcs11-bench-") as scratch:
        directory = Path(scratch)
        setup(directory)
        chain = directory / "pki" / "chain.pem"
        contexts = {
            "token": pkcs11_client_context(
                directory / "token.crt", URI, MODULE, directory / "pin", ca_cert=chain
            ),
            "file": ssl.create_default_context(cafile=str(chain)),
        }
        contexts["file"].minimum_version = ssl.TLSVersion.TLSv1_2
        contexts["file"].load_cert_chain(directory / "file.crt", directory / "file.key")
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(port), "--serve-dir", str(directory)],
            stdin=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while True:  # the server takes each connection in turn; a probe is harmless
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            for context in contexts.values():  # warm up: the engine, the token session
                round_of(context, port, 5, server.pid)
            results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in contexts}
            for _ in range(args.repeat):
                for name, context in contexts.items():
                    results[name].append(round_of(context, port, args.handshakes, server.pid))
        finally:
            server.kill()
            server.wait()
    print(
        f"{args.repeat} rounds x {args.handshakes} sequential mutual-TLS 1.3 handshakes "
        "per key (median of rounds), EC P-256, against a Python ssl server process"
    )
    medians = {}
    for name, rows in results.items():
        rate = statistics.median(r[0] for r in rows)
        client = statistics.median(r[1] for r in rows)
        server_cpu = statistics.median(r[2] for r in rows)
        medians[name] = (rate, client, server_cpu)
        print(
            f"  {name:5} key: {rate:7.1f} handshakes/s, client CPU {client * 1e3:.2f} ms "
            f"per handshake, server CPU {server_cpu * 1e3:.2f} ms"
        )
    token, file = medians["token"], medians["file"]
    print(
        f"  token/file: rate {token[0] / file[0]:.2f}x, client CPU {token[1] / file[1]:.2f}x, "
        f"server CPU {token[2] / file[2]:.2f}x"
    )


if __name__ == "__main__":
    main()
