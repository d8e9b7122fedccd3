"""The attacks a security team worries about, each run against the live gateway.

Each attack returns an `Attack`: what was tried, what the attacker saw, and the reason
codes the gateway must have recorded for it. Whether the refusal really was recorded is
checked later against ``auth_events`` (`provisioning.demo.report`), not taken on trust.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiomqtt
import asyncpg
from cryptography.hazmat.primitives.asymmetric import ec

from provisioning import admin, store
from provisioning.agent import device
from provisioning.agent.device import CERT_FILE, CHAIN_FILE, KEY_FILE, client_ssl_context, key_pem
from provisioning.demo.factory import FLEET, Enrolled, devicegate
from provisioning.demo.manufacturer import Idevid, Manufacturer
from provisioning.demo.stack import Stack
from provisioning.demo.traffic import MQTT_TIMEOUT, device_session, telemetry_topic
from provisioning.pki.ca import (
    CertificateAuthority,
    DeviceIdentity,
    SignOptions,
    fingerprint,
    serial_hex,
    to_pem,
)
from provisioning.pki.directory import init_pki, load_ca

LIVE_CUT_WAIT = 3.0
"""Seconds the demo waits for the gateway to cut a revoked device's live session."""


@dataclass
class Attack:
    """One attack and how it went.

    Attributes:
        name: Short title.
        tried: What the attacker did.
        reasons: Reason codes the gateway should record (any one of them counts).
        refused: Whether the attacker was refused, as the attacker saw it.
        observed: What the attacker saw (error, reason codes).
        notes: Extra facts worth showing.
    """

    name: str
    tried: str
    reasons: tuple[str, ...]
    refused: bool = False
    observed: str = ""
    notes: list[str] = field(default_factory=list)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"TLS alert {exc.reason}"
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text} ({cause})"
    return " ".join(text.split())[:140]


async def _expect_refused(attack: Attack, connect: Callable[[], Awaitable[None]]) -> Attack:
    """Run ``connect``; the attack is refused when it raises an MQTT or TLS error."""
    try:
        await connect()
    except (aiomqtt.MqttError, ssl.SSLError, OSError, TimeoutError) as exc:
        attack.refused = True
        attack.observed = _describe(exc)
    else:
        attack.observed = "connected: NOT refused"
    return attack


def _write_identity(
    directory: Path, key: ec.EllipticCurvePrivateKey, cert_pem: str, chain: Path
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / KEY_FILE).write_bytes(key_pem(key))
    (directory / CERT_FILE).write_text(cert_pem)
    # The attacker trusts the real gateway (it is the gateway that must refuse them).
    (directory / CHAIN_FILE).write_bytes(chain.read_bytes())
    return directory


def connect_packet(client_id: str) -> bytes:
    """A minimal MQTT 5 CONNECT (clean start, keepalive 30 s, no properties)."""
    name = client_id.encode()
    variable = b"\x00\x04MQTT\x05\x02\x00\x1e\x00"
    body = variable + len(name).to_bytes(2, "big") + name
    assert len(body) < 128  # one-byte remaining length is enough for a device id
    return bytes([0x10, len(body)]) + body


async def _connect_once(port: int, identifier: str, context: ssl.SSLContext) -> None:
    """TLS, then CONNECT, then read the answer: raises how the gateway refused.

    A raw stream rather than an MQTT client: with TLS 1.3 the client's handshake completes
    before the server has judged its certificate, and the refusal arrives as an alert at
    the first read, which MQTT clients report only as a timeout.
    """
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="127.0.0.1"),
        MQTT_TIMEOUT,
    )
    try:
        writer.write(connect_packet(identifier))
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(4), MQTT_TIMEOUT)
        if not answer:
            raise ConnectionResetError("the gateway closed the connection")
        if answer[0] >> 4 == 2 and len(answer) >= 4 and answer[3] != 0:
            raise ConnectionRefusedError(f"CONNACK 0x{answer[3]:02X}")
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def no_client_certificate(stack: Stack, victim: Enrolled) -> Attack:
    """TLS without a client certificate, claiming a real device's client id."""
    attack = Attack(
        "no client certificate",
        f"TLS without a certificate, client id {victim.device_id}",
        ("no_client_certificate",),
    )
    context = client_ssl_context(ca_cert=stack.chain)
    return await _expect_refused(
        attack, lambda: _connect_once(stack.gateway_port, victim.device_id, context)
    )


async def rogue_ca(stack: Stack, victim: Enrolled) -> Attack:
    """A certificate for a real device id, signed by a CA the attacker made."""
    attack = Attack(
        "rogue CA",
        f"certificate for {victim.device_id} from the attacker's own CA",
        ("unknown_issuer",),
    )
    rogue_dir = stack.work / "attacker" / "rogue-pki"
    await asyncio.to_thread(init_pki, rogue_dir, passphrase=None)
    rogue = await asyncio.to_thread(load_ca, rogue_dir, None)
    directory = _issue(
        rogue, victim, stack, stack.work / "attacker" / "rogue-device",
        SignOptions.starting_now(validity=timedelta(days=1), backdate=timedelta(minutes=5)),
    )  # fmt: skip
    context = client_ssl_context(ca_cert=stack.chain, directory=directory)
    return await _expect_refused(
        attack, lambda: _connect_once(stack.gateway_port, victim.device_id, context)
    )


def _issue(
    ca: CertificateAuthority, victim: Enrolled, stack: Stack, directory: Path,
    options: SignOptions,
) -> Path:  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    identity = DeviceIdentity(victim.device_id, victim.fleet, "devicegate.local")
    cert = ca.issue_device_certificate(key.public_key(), identity, options)
    _write_identity(directory, key, to_pem(cert), stack.chain)
    return directory


async def expired_certificate(stack: Stack, victim: Enrolled) -> Attack:
    """A genuine certificate of ours, registered to the device, that expired ten days ago."""
    attack = Attack(
        "expired certificate",
        f"genuine, registered certificate of {victim.device_id}, expired 10 days ago",
        ("certificate_expired",),
    )
    ca = await asyncio.to_thread(load_ca, stack.pki_dir, stack.passphrase.encode())
    now = datetime.now(UTC)
    options = SignOptions(not_before=now - timedelta(days=40), not_after=now - timedelta(days=10))
    key = ec.generate_private_key(ec.SECP256R1())
    identity = DeviceIdentity(victim.device_id, victim.fleet, "devicegate.local")
    cert = ca.issue_device_certificate(key.public_key(), identity, options)
    conn = await asyncpg.connect(stack.database_url, timeout=10)
    try:
        await store.insert_certificate(
            conn,
            store.NewCertificate(
                serial=serial_hex(cert.serial_number),
                device_id=victim.device_id,
                fingerprint_sha256=fingerprint(cert),
                not_before=cert.not_valid_before_utc,
                not_after=cert.not_valid_after_utc,
                key_type="ec-p256",
                pem=to_pem(cert),
            ),
        )
    finally:
        await conn.close()
    directory = _write_identity(
        stack.work / "attacker" / "expired-device", key, to_pem(cert), stack.chain
    )
    context = client_ssl_context(ca_cert=stack.chain, directory=directory)
    return await _expect_refused(
        attack, lambda: _connect_once(stack.gateway_port, victim.device_id, context)
    )


async def spoofed_client_id(stack: Stack, attacker: Enrolled, victim: Enrolled) -> Attack:
    """A real device connects with another device's id as its MQTT client id."""
    attack = Attack(
        "spoofed client id",
        f"{attacker.device_id} connects as client id {victim.device_id}",
        ("client_id_mismatch",),
    )

    async def connect() -> None:
        async with device_session(stack.gateway_port, attacker, identifier=victim.device_id):
            pass

    return await _expect_refused(attack, connect)


async def topic_escape(
    stack: Stack, attacker: Enrolled, victim: Enrolled, *, dashboard_foreign: Callable[[], int]
) -> Attack:
    """Subscribe to everything and to another device's topic; publish as another device."""
    attack = Attack(
        "topic escape",
        f"{attacker.device_id} subscribes '#' and {telemetry_topic(victim.device_id)}, "
        "publishes to the latter",
        ("topic_not_authorized",),
    )
    async with device_session(stack.gateway_port, attacker) as client:
        everything = await client.subscribe("#", qos=1)
        other = await client.subscribe(telemetry_topic(victim.device_id), qos=1)
        forged = {"from": attacker.device_id, "temperature_c": 99.9, "forged": True}
        # PUBACK 0x87 on MQTT 5 (aiomqtt does not surface the code; the audit does).
        await client.publish(telemetry_topic(victim.device_id), json.dumps(forged).encode(), qos=1)
    codes = [_code(code) for code in (*_codes(everything), *_codes(other))]
    attack.refused = all(code >= 0x80 for code in codes)
    attack.observed = "SUBACK " + ", ".join(f"0x{code:02X}" for code in codes)
    await asyncio.sleep(0.3)  # let a forwarded publish (there must be none) reach the dashboard
    if dashboard_foreign():
        attack.refused = False
        attack.notes.append("the dashboard received the forged reading")
    else:
        attack.notes.append("forged PUBLISH never reached the broker (dashboard saw nothing)")
    return attack


def _codes(result: object) -> list[object]:
    return list(result) if isinstance(result, list | tuple) else [result]


def _code(code: object) -> int:
    value = getattr(code, "value", code)
    return int(value) if isinstance(value, int) else 0x80


async def revoked_while_connected(stack: Stack, victim: Enrolled) -> Attack:
    """Revoke a connected device; its live session is cut, and it cannot come back."""
    attack = Attack(
        "revoked while connected",
        f"security team revokes {victim.device_id} during its session, it reconnects",
        ("certificate_revoked", "device_revoked"),
    )
    async with device_session(stack.gateway_port, victim) as client:
        await client.subscribe(f"devices/{victim.device_id}/commands", qos=1)
        listening = asyncio.create_task(_until_disconnected(client), name="revoked-session")
        conn = await asyncpg.connect(stack.database_url, timeout=10)
        try:
            await admin.revoke_device(
                conn, victim.device_id, actor="demo-security-team", instance="demo"
            )
        finally:
            await conn.close()
        try:
            await asyncio.wait_for(asyncio.shield(listening), LIVE_CUT_WAIT)
            attack.notes.append("live session cut by the gateway")
        except TimeoutError:
            attack.notes.append(
                f"live session NOT cut within {LIVE_CUT_WAIT:.0f}s (gateway has no live cut "
                "yet); the reconnect below is refused"
            )
        finally:
            listening.cancel()
    await asyncio.sleep(0.2)

    async def reconnect() -> None:
        async with device_session(stack.gateway_port, victim):
            pass

    await _expect_refused(attack, reconnect)
    attack.observed = f"reconnect: {attack.observed}"
    return attack


async def _until_disconnected(client: aiomqtt.Client) -> None:
    try:
        async for _ in client.messages:
            pass
    except aiomqtt.MqttError:
        return


# --- enrollment with manufacturer certificates (IDevID) -------------------------------


async def _expect_enroll_refused(attack: Attack, stack: Stack, idevid: Idevid) -> Attack:
    """Enroll with ``idevid`` over mutual TLS; refused when the service answers a problem."""
    try:
        bundle = await device.enroll_idevid(
            url=stack.provisioning_url, idevid_cert=idevid.cert, idevid_key=idevid.key,
            out_dir=stack.work / "attacker" / idevid.cert.stem, ca_cert=stack.chain,
        )  # fmt: skip
    except device.EnrollmentError as exc:
        attack.refused = exc.status != 0
        attack.observed = " ".join(str(exc).split())[:140]
    else:
        attack.observed = f"enrolled as {bundle.device_id}: NOT refused"
    return attack


async def untrusted_idevid(stack: Stack) -> Attack:
    """A device certificate from a manufacturer no fleet trusts."""
    rogue = Manufacturer(stack.work / "rogue-manufacturer", name="rogue", intermediate_ca=False)
    attack = Attack(
        "untrusted IDevID",
        "enroll without a token, with a device certificate from a manufacturer CA no fleet trusts",
        ("idevid_untrusted",),
    )
    return await _expect_enroll_refused(attack, stack, rogue.idevid())


async def blocked_idevid(stack: Stack, maker: Manufacturer) -> Attack:
    """A genuine IDevID of the trusted manufacturer, blocked by the operator (stolen unit)."""
    stolen = maker.idevid()
    await devicegate(stack, "idevid", "block", "--fleet", FLEET, "--serial", stolen.serial,
                     "--note", "reported stolen")  # fmt: skip
    attack = Attack(
        "blocked IDevID",
        f"enroll with a genuine IDevID (serial {stolen.serial[:12]}…) the operator blocked",
        ("idevid_blocked",),
    )
    return await _expect_enroll_refused(attack, stack, stolen)
