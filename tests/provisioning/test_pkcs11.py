"""CA keys in a PKCS#11 token (SoftHSM2): ``ca init`` through the real CLI, the keys'
protection as pkcs11-tool and the token report it, certificates and CRLs checked by the
openssl binary, and what enrollment and renewal do when the token cannot sign."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from provisioning.agent import device
from provisioning.agent.device import KeyType, generate_key
from provisioning.pki.ca import DeviceIdentity, SignOptions, to_pem
from provisioning.pki.directory import CA_KEYS, CHAIN, ISSUING_CERT, ROOT_CERT, SERVER_CERT, load_ca
from provisioning.pki.pkcs11 import (
    REOPEN_INTERVAL,
    CaKeysRecord,
    Pkcs11Signer,
    TokenRef,
    key_attributes,
)
from schemas.settings import Settings
from tests.conftest import Pki
from tests.helpers import provisioning_server
from tests.provisioning.conftest import (
    INSTANCE,
    Server,
    last_event,
    make_token,
    new_fleet,
    uses_left,
)
from tests.provisioning.hsm import Hsm
from tests.provisioning.test_renew import post_renew

DEVICEGATE = str(Path(sys.executable).with_name("devicegate"))


def ca_init(hsm: Hsm, directory: Path, token: TokenRef, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            DEVICEGATE, "ca", "init", "--pki-dir", str(directory),
            "--pkcs11-module", str(token.module), "--pkcs11-token", token.token,
            "--pkcs11-pin-file", str(token.pin_file), *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **os.environ,
            **hsm.env,
            "DEVICEGATE_PUBLIC_URL": "https://127.0.0.1:8443",
            "COLUMNS": "250",
        },
    )  # fmt: skip


@pytest.fixture(scope="module")
def token_pki(hsm: Hsm, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TokenRef]:
    """A PKI made by ``devicegate ca init`` with its CA keys in a new SoftHSM2 token."""
    token = hsm.new_token()
    directory = tmp_path_factory.mktemp("pki-token")
    done = ca_init(hsm, directory, token)
    assert done.returncode == 0, done.stderr
    return directory, token


def private_keys_in(directory: Path) -> dict[str, ec.EllipticCurvePublicKey | object]:
    """Every file of ``directory`` that is a private key (PEM or DER, unencrypted or
    not), with its public key; and a PRIVATE KEY marker counts even if it does not parse."""
    found: dict[str, object] = {}
    for path in sorted(directory.iterdir()):
        data = path.read_bytes()
        for load in (serialization.load_pem_private_key, serialization.load_der_private_key):
            try:
                found[path.name] = load(data, None).public_key()
                break
            except TypeError:  # encrypted: a private key all the same
                found[path.name] = "encrypted"
                break
            except ValueError:
                continue
        if path.name not in found and b"PRIVATE KEY" in data:
            found[path.name] = "unparsed"
    return found


def test_ca_init_keeps_the_ca_keys_in_the_token(token_pki: tuple[Path, TokenRef], hsm: Hsm) -> None:
    directory, token = token_pki
    record = CaKeysRecord.read(directory / CA_KEYS)
    assert record.token == token

    # On disk: the listeners' and the audit signer's keys, and no CA key at all.
    keys = private_keys_in(directory)
    assert set(keys) == {"server.key", "audit.key"}, keys
    ca_public = [
        x509.load_pem_x509_certificate((directory / name).read_bytes()).public_key()
        for name in (ROOT_CERT, ISSUING_CERT)
    ]
    assert not any(key == public for key in keys.values() for public in ca_public)
    assert token.pin_file.read_text().strip() not in (directory / CA_KEYS).read_text()

    # pkcs11-tool's view of the token: both CA keys, sensitive and never extractable.
    listed = subprocess.run(
        [
            "pkcs11-tool", "--module", str(token.module), "--token-label", token.token,
            "--list-objects", "--type", "privkey", "--login",
            "--pin", token.pin_file.read_text().strip(),
        ],
        capture_output=True, text=True, check=True, env={**os.environ, **hsm.env},
    )  # fmt: skip
    objects = {
        match["label"]: match["access"]
        for match in re.finditer(
            r"Private Key Object; EC.*?\n\s+label:\s+(?P<label>\S+)"
            r".*?\n\s+Access:\s+(?P<access>[^\n]+)",
            listed.stdout,
            re.S,
        )
    }
    assert set(objects) == {record.root.label, record.issuing.label}, listed.stdout
    for access in objects.values():
        flags = {flag.strip() for flag in access.split(",")}
        assert {"sensitive", "always sensitive", "never extractable", "local"} <= flags
        assert "extractable" not in flags

    # The token's own attributes, through python-pkcs11.
    for key in (record.root, record.issuing):
        assert key_attributes(token, key) == {
            "token": True,
            "private": True,
            "sensitive": True,
            "always_sensitive": True,
            "extractable": False,
            "never_extractable": True,
            "local": True,
        }


def openssl_verify(chain: Path, certificate: Path, crl: Path | None = None) -> str:
    args = ["openssl", "verify", "-CAfile", str(chain)]
    if crl is not None:
        args += ["-crl_check", "-CRLfile", str(crl)]
    done = subprocess.run([*args, str(certificate)], capture_output=True, text=True)
    return (done.stdout + done.stderr).strip()


def test_certificates_and_crl_signed_in_the_token_verify_with_openssl(
    token_pki: tuple[Path, TokenRef], tmp_path: Path
) -> None:
    directory, _ = token_pki
    ca = load_ca(directory, None, crl_url="https://127.0.0.1:8443/v1/crl")
    assert isinstance(ca.signer, Pkcs11Signer)
    options = SignOptions.starting_now(validity=timedelta(days=1), backdate=timedelta(minutes=5))
    # The first certificate of a key class is built by the builder, the next ones come from
    # the DER template (`RawSigner.sign_bytes`): both paths sign in the token.
    issued = [
        ca.issue_device_certificate(
            generate_key(KeyType.P256).public_key(),
            DeviceIdentity(f"dev-{n}", "hsm", "devicegate.local"),
            options,
        )
        for n in range(3)
    ]
    assert ca._template is not None and ca._template[1].verified == {"signing": True}
    crl = ca.build_crl([(issued[0].serial_number, datetime.now(UTC))])
    (tmp_path / "crl.pem").write_bytes(crl.public_bytes(serialization.Encoding.PEM))

    for n, certificate in enumerate(issued):
        path = tmp_path / f"dev-{n}.crt"
        path.write_text(to_pem(certificate))
        verdict = openssl_verify(directory / CHAIN, path, tmp_path / "crl.pem")
        if n == 0:
            assert "certificate revoked" in verdict, verdict
        else:
            assert verdict == f"{path}: OK", verdict
    server = directory / SERVER_CERT
    assert openssl_verify(directory / CHAIN, server, tmp_path / "crl.pem") == f"{server}: OK"
    # The CRL itself: its signature by the issuing CA, checked by openssl.
    checked = subprocess.run(
        ["openssl", "crl", "-in", str(tmp_path / "crl.pem"), "-CAfile", str(directory / CHAIN),
         "-noout"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert "verify OK" in checked.stdout + checked.stderr, checked


def _sign_in_child(directory: Path, data: bytes, out: multiprocessing.Queue) -> None:
    ca = load_ca(directory, None)
    out.put(ca.signer.sign_bytes(data))  # type: ignore[attr-defined]


def test_threads_share_the_session_and_a_forked_child_opens_its_own(
    token_pki: tuple[Path, TokenRef],
) -> None:
    directory, _ = token_pki
    signer = load_ca(directory, None).signer
    assert isinstance(signer, Pkcs11Signer)
    public = signer.certificate.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    messages = [f"tbs {n}".encode() for n in range(64)]
    with ThreadPoolExecutor(4) as pool:
        signatures = list(pool.map(signer.sign_bytes, messages))
    for message, signature in zip(messages, signatures, strict=True):
        public.verify(signature, message, ec.ECDSA(hashes.SHA256()))

    # The parent's session is open now; a forked child must not use its handles.
    context = multiprocessing.get_context("fork")
    out: multiprocessing.Queue = context.Queue()
    child = context.Process(target=_sign_in_child, args=(directory, b"from the child", out))
    child.start()
    signature = out.get(timeout=30)
    child.join(30)
    assert child.exitcode == 0
    public.verify(signature, b"from the child", ec.ECDSA(hashes.SHA256()))
    public.verify(signer.sign_bytes(b"parent still"), b"parent still", ec.ECDSA(hashes.SHA256()))


def test_ca_init_refuses_a_bad_module_pin_or_pin_file(hsm: Hsm, tmp_path: Path) -> None:
    token = hsm.new_token()
    cases = {
        "module": (TokenRef(Path("/nonexistent/libpkcs11.so"), token.token, token.pin_file),
                   "/nonexistent/libpkcs11.so"),
        "token": (TokenRef(token.module, "no-such-token", token.pin_file), "no-such-token"),
    }  # fmt: skip
    wrong = tmp_path / "wrong.pin"
    wrong.write_text("000000\n")
    wrong.chmod(0o600)
    cases["pin"] = (TokenRef(token.module, token.token, wrong), "wrong PIN")
    loose = tmp_path / "loose.pin"
    loose.write_text(token.pin_file.read_text())
    loose.chmod(0o644)
    cases["pin file mode"] = (TokenRef(token.module, token.token, loose), "chmod 600")
    for name, (ref, expected) in cases.items():
        directory = tmp_path / f"pki-{name.replace(' ', '-')}"
        done = ca_init(hsm, directory, ref)
        lines = done.stderr.strip().splitlines()
        assert done.returncode != 0, (name, done.stdout)
        assert len(lines) == 1 and lines[0].startswith("error:"), (name, done.stderr)
        assert expected in lines[0], (name, lines[0])
        assert "000000" not in done.stderr + done.stdout
        assert token.pin_file.read_text().strip() not in done.stderr + done.stdout
        assert not directory.exists() or not any(directory.iterdir()), name

    alone = subprocess.run(
        [DEVICEGATE, "ca", "init", "--pki-dir", str(tmp_path / "pki-alone"),
         "--pkcs11-pin-file", str(token.pin_file)],
        capture_output=True, text=True, env={**os.environ, **hsm.env},
    )  # fmt: skip
    assert alone.returncode == 2 and "go together" in alone.stderr
    assert len(alone.stderr.strip().splitlines()) == 1


@pytest.fixture
def unavailable(hsm: Hsm, database_url: str, tmp_path: Path) -> Iterator[tuple[Server, Pki, Path]]:
    """A provisioning listener over a token CA whose PIN file (the setting) holds a wrong
    PIN: the token refuses to sign until the test writes the right one. ``ca init`` runs
    in its own process: this one must not have logged in to the token already."""
    token = hsm.new_token()
    directory = tmp_path / "pki"
    assert ca_init(hsm, directory, token).returncode == 0
    pin_file = tmp_path / "override.pin"
    pin_file.write_text("999999\n")
    pin_file.chmod(0o600)
    settings = Settings(
        database_url=database_url,
        pki_dir=directory,
        pkcs11_pin_file=pin_file,
        instance_id=INSTANCE,
        refusal_events_per_minute=1_000_000,
    )
    pki = Pki(directory, b"", load_ca(directory, None))
    with provisioning_server(settings) as port:
        yield Server(f"https://127.0.0.1:{port}", port), pki, pin_file


async def test_token_unavailable_refuses_enrollment_and_renewal_and_issues_nothing(
    unavailable: tuple[Server, Pki, Path], hsm: Hsm, db: asyncpg.Connection, tmp_path: Path
) -> None:
    server, pki, pin_file = unavailable
    record = CaKeysRecord.read(pki.directory / CA_KEYS)
    right_pin = record.token.pin_file.read_text()
    fleet = new_fleet("hsm")
    token, token_id = await make_token(db, fleet=fleet, uses=2)
    connector = aiohttp.TCPConnector(ssl=False, force_close=True)

    async def enroll() -> tuple[int, dict]:
        body = {"token": token, "csr": device.csr_pem(generate_key(KeyType.P256))}
        async with (
            aiohttp.ClientSession(connector=connector, connector_owner=False) as http,
            http.post(f"{server.url}/v1/enroll", json=body) as response,
        ):
            return response.status, await response.json(content_type=None)

    # Wrong PIN: 503 with the signer-unavailable problem; nothing is spent or written.
    for _ in range(2):  # the second is refused without trying the PIN again
        status, problem = await enroll()
        assert status == 503, problem
        assert problem["type"] == "urn:devicegate:problem:signer_unavailable"
        assert problem["reason"] == "signer_unavailable"
        assert record.token.token in problem["detail"] and "999999" not in json.dumps(problem)
    assert await uses_left(db, token_id) == 2
    assert await db.fetchval("SELECT count(*) FROM devices WHERE fleet = $1", fleet) == 0
    assert (
        await db.fetchval(
            "SELECT count(*) FROM certificates c JOIN devices d USING (device_id) "
            "WHERE d.fleet = $1",
            fleet,
        )
        == 0
    )
    event = await last_event(db, type="enroll", fleet=fleet)
    assert (event["outcome"], event["reason"]) == ("denied", "signer_unavailable")
    assert json.loads(event["detail"])["token_id"] == token_id
    assert "999999" not in event["detail"]

    # The right PIN: a request signs again, without a restart (once the token may be
    # tried again: at most once per REOPEN_INTERVAL while it fails).
    pin_file.write_text(right_pin)
    await asyncio.sleep(REOPEN_INTERVAL)
    out = tmp_path / "device"
    bundle = await device.enroll(url=server.url, token=token, out_dir=out, ca_cert=pki.chain)
    assert await uses_left(db, token_id) == 1

    # The token goes away (its directory is gone): renewal is refused, nothing changes.
    home = hsm.token_directory(record.token.token)
    shutil.move(home, home.with_name(home.name + ".away"))
    try:
        status, problem = await post_renew(pki, server, out / "device.crt", out / "device.key")
    finally:
        shutil.move(home.with_name(home.name + ".away"), home)
    assert status == 503, problem
    assert problem["reason"] == "signer_unavailable"
    rows = await db.fetch(
        "SELECT serial, status FROM certificates WHERE device_id = $1", bundle.device_id
    )
    assert [(row["serial"], row["status"]) for row in rows] == [(bundle.serial, "active")]
    event = await last_event(db, type="renew", device_id=bundle.device_id)
    assert (event["outcome"], event["reason"]) == ("denied", "signer_unavailable")
    assert event["cert_serial"] == bundle.serial

    # Back: renewal works again, in the same process.
    await asyncio.sleep(REOPEN_INTERVAL)
    status, renewed = await post_renew(pki, server, out / "device.crt", out / "device.key")
    assert status == 201, renewed
    assert renewed["serial"] != bundle.serial


def test_ca_init_force_swaps_the_kind_of_ca(hsm: Hsm, tmp_path: Path) -> None:
    """A token CA over a file CA leaves no CA key file behind, and the other way round
    leaves no ca-keys.toml (load_ca would otherwise pick the token)."""
    directory = tmp_path / "pki"
    env = {**os.environ, **hsm.env, "DEVICEGATE_PUBLIC_URL": "https://127.0.0.1:8443"}
    file_init = [DEVICEGATE, "ca", "init", "--pki-dir", str(directory), "--insecure-no-passphrase"]
    subprocess.run(file_init, check=True, capture_output=True, env=env)
    assert {"root-ca.key", "issuing-ca.key"} <= set(private_keys_in(directory))

    done = ca_init(hsm, directory, hsm.new_token(), "--force")
    assert done.returncode == 0, done.stderr
    assert set(private_keys_in(directory)) == {"server.key", "audit.key"}
    assert isinstance(load_ca(directory, None).signer, Pkcs11Signer)

    subprocess.run([*file_init, "--force"], check=True, capture_output=True, env=env)
    assert not (directory / CA_KEYS).exists()
    assert not isinstance(load_ca(directory, None).signer, Pkcs11Signer)
