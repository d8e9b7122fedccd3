"""Operator actions, shared by the admin API and the CLI: each is one transaction that writes
the new state, its auth event (``detail.actor`` names the admin key, or ``cli``) and, for
revocations, the NOTIFY that gateways act on.
"""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg

from provisioning import policies, store
from provisioning.errors import Conflict
from provisioning.eventlog import append_event
from provisioning.tokens import ADMIN_KEY_PREFIX, TOKEN_PREFIX, new_secret, secret_hash
from schemas.api import (
    AdminKeyCreated,
    AdminKeyInfo,
    CertificateInfo,
    DeviceDetail,
    DeviceInfo,
    TokenCreated,
    TokenCreateRequest,
    TokenInfo,
)
from schemas.events import EventType, Outcome, Reason
from schemas.notify import RevocationNotice

Connection = Any


async def _event(
    conn: Connection,
    instance: str,
    type: EventType,
    actor: str,
    *,
    device_id: str | None = None,
    fleet: str | None = None,
    cert_serial: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    await append_event(
        conn,
        instance=instance,
        type=type,
        outcome=Outcome.ALLOWED,
        reason=Reason.ADMIN_ACTION,
        device_id=device_id,
        fleet=fleet,
        cert_serial=cert_serial,
        detail={"actor": actor, **(detail or {})},
    )


# --- tokens ----------------------------------------------------------------------------


async def create_token(
    conn: Connection, request: TokenCreateRequest, *, actor: str, instance: str
) -> TokenCreated:
    """Create a bootstrap token; the returned secret is never stored nor shown again."""
    attributes = policies.check_attributes(request.attributes)
    secret = new_secret(TOKEN_PREFIX)
    async with conn.transaction():
        info = await store.insert_token(
            conn,
            token_hash=secret_hash(secret),
            fleet=request.fleet,
            uses=request.uses,
            ttl=request.ttl,
            note=request.note,
            allow_reenroll=request.allow_reenroll,
            attributes=attributes,
        )
        await _event(
            conn,
            instance,
            EventType.TOKEN,
            actor,
            fleet=info.fleet,
            detail={
                "action": "create",
                "token_id": str(info.id),
                "uses": info.uses_allowed,
                **({"attributes": attributes} if attributes else {}),
            },
        )
    return TokenCreated(**info.model_dump(), token=secret)


async def revoke_token(
    conn: Connection, token_id: uuid.UUID, *, actor: str, instance: str
) -> TokenInfo:
    async with conn.transaction():
        info = await store.revoke_token(conn, token_id)
        await _event(
            conn,
            instance,
            EventType.TOKEN,
            actor,
            fleet=info.fleet,
            detail={"action": "revoke", "token_id": str(info.id)},
        )
    return info


# --- devices ---------------------------------------------------------------------------


async def _device_notice(conn: Connection, device: DeviceInfo) -> None:
    await store.notify_revocation(
        conn, RevocationNotice(kind="device", device_id=device.device_id, status=device.status)
    )


async def revoke_device(
    conn: Connection, device_id: str, *, actor: str, instance: str
) -> DeviceInfo:
    """Revoke a device and every certificate it holds. Idempotent."""
    async with conn.transaction():
        device = await store.get_device(conn, device_id, lock=True)
        serials = await store.revoke_device_certificates(conn, device_id, "device_revoked")
        if device.status == "revoked" and not serials:
            return device
        device = await store.set_device_status(conn, device_id, "revoked")
        await _device_notice(conn, device)
        for serial in serials:
            await store.notify_revocation(
                conn,
                RevocationNotice(
                    kind="certificate", device_id=device_id, serial=serial, status="revoked"
                ),
            )
        await _event(
            conn,
            instance,
            EventType.REVOKE,
            actor,
            device_id=device_id,
            fleet=device.fleet,
            detail={"target": "device", "revoked_serials": serials},
        )
    return device


async def _set_status(
    conn: Connection, device_id: str, status: str, type: EventType, *, actor: str, instance: str
) -> DeviceInfo:
    async with conn.transaction():
        device = await store.get_device(conn, device_id, lock=True)
        if device.status == "revoked":
            raise Conflict(f"device {device_id} is revoked; revocation is final")
        if device.status == status:
            return device
        device = await store.set_device_status(conn, device_id, status)
        await _device_notice(conn, device)
        await _event(conn, instance, type, actor, device_id=device_id, fleet=device.fleet)
    return device


async def disable_device(
    conn: Connection, device_id: str, *, actor: str, instance: str
) -> DeviceInfo:
    """Disable a device: gateways refuse and cut it; its certificates stay valid."""
    return await _set_status(
        conn, device_id, "disabled", EventType.DEVICE_DISABLE, actor=actor, instance=instance
    )


async def enable_device(
    conn: Connection, device_id: str, *, actor: str, instance: str
) -> DeviceInfo:
    """Enable a disabled device (a revoked device stays revoked)."""
    return await _set_status(
        conn, device_id, "active", EventType.DEVICE_ENABLE, actor=actor, instance=instance
    )


# --- certificates ----------------------------------------------------------------------


async def revoke_certificate(
    conn: Connection, serial: str, *, actor: str, instance: str
) -> CertificateInfo:
    """Revoke one certificate. Idempotent."""
    serial = serial.lower().removeprefix("0x").lstrip("0") or "0"
    async with conn.transaction():
        current = await store.get_certificate(conn, serial)
        device = await store.get_device(conn, current.device_id, lock=True)
        if await store.revoke_certificate(conn, serial, "admin_action"):
            await store.notify_revocation(
                conn,
                RevocationNotice(
                    kind="certificate",
                    device_id=device.device_id,
                    serial=serial,
                    status="revoked",
                ),
            )
            await _event(
                conn,
                instance,
                EventType.REVOKE,
                actor,
                device_id=device.device_id,
                fleet=device.fleet,
                cert_serial=serial,
                detail={"target": "certificate"},
            )
        return await store.get_certificate(conn, serial)


# --- admin keys ------------------------------------------------------------------------


async def create_admin_key(
    conn: Connection, name: str, *, actor: str, instance: str
) -> AdminKeyCreated:
    """Create an admin API key; the returned secret is never stored nor shown again."""
    secret = new_secret(ADMIN_KEY_PREFIX)
    async with conn.transaction():
        try:
            info = await store.insert_admin_key(conn, name=name, key_hash=secret_hash(secret))
        except asyncpg.UniqueViolationError:
            raise Conflict(f"an admin key named {name!r} exists") from None
        await _event(
            conn,
            instance,
            EventType.ADMIN,
            actor,
            detail={"action": "admin_key_create", "name": name, "key_id": str(info.id)},
        )
    return AdminKeyCreated(id=info.id, name=info.name, key=secret)


async def revoke_admin_key(
    conn: Connection, id_or_name: str, *, actor: str, instance: str
) -> AdminKeyInfo:
    async with conn.transaction():
        info = await store.revoke_admin_key(conn, id_or_name)
        await _event(
            conn,
            instance,
            EventType.ADMIN,
            actor,
            detail={"action": "admin_key_revoke", "name": info.name, "key_id": str(info.id)},
        )
    return info


async def authenticate_admin(conn: Connection, authorization: str | None) -> str | None:
    """The admin key's name for an ``Authorization: Bearer dgk_...`` header, else ``None``."""
    if authorization is None:
        return None
    scheme, _, secret = authorization.partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret.startswith(ADMIN_KEY_PREFIX):
        return None
    return await store.admin_key_name(conn, secret_hash(secret))


async def device_detail(conn: Connection, device_id: str) -> DeviceDetail:
    """A device with its certificates, newest first."""
    device = await store.get_device(conn, device_id)
    certificates = await store.list_certificates(conn, device_id=device_id)
    return DeviceDetail(**device.model_dump(), certificates=certificates)
