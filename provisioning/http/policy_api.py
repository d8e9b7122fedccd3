"""The policy admin API: policies, attachments, device attributes, groups, explain.

Thin handlers as in `provisioning.http.api`: authenticate (bearer admin key), parse,
call `provisioning.policies` / `provisioning.policy_engine`, render. A refused change
(bad body, invalid document, a limit, an unknown target) is answered with its problem
document and recorded as one denied ``policy`` event naming the admin key; an accepted
one is recorded by the change itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web

from provisioning import policies, policy_engine
from provisioning.errors import NotFound
from provisioning.http.common import json_response, parse_model, read_body, require_admin, service
from schemas.api import (
    AttachmentInfo,
    AttributesInfo,
    AttributesPut,
    ExplainRequest,
    ExplainResult,
    GroupInfo,
    GroupMembersPut,
    GroupPut,
    PolicyApplied,
    PolicyInfo,
    PolicyPut,
    PolicyRevisionInfo,
    PolicyVersion,
)
from schemas.errors import DevicegateError

T = TypeVar("T")

Change = Callable[[Any, str, str], Awaitable[T]]


async def _change(
    request: web.Request, action: str, change: Change[T], *, device_id: str | None = None
) -> T:
    """Run ``change(conn, actor, instance)``; record a typed refusal as one denied event."""
    actor = await require_admin(request)
    svc = service(request)
    instance = svc.settings.instance_id
    async with svc.pool.acquire() as conn:
        try:
            return await change(conn, actor, instance)
        except DevicegateError as exc:
            await policies.record_refusal(
                conn, exc, actor=actor, instance=instance, action=action, device_id=device_id
            )
            raise


# --- policies --------------------------------------------------------------------------


async def _info(conn: Any, name: str, *, document: bool) -> PolicyInfo:
    revisions = await policies.history(conn, name, limit=1)
    if not revisions or revisions[0].deleted:
        raise NotFound(f"unknown policy {name!r}")
    attached = await policies.attachments(conn, name)
    return PolicyInfo(
        name=name,
        version=revisions[0].version,
        sha256=revisions[0].sha256,
        attachments=[f"{kind}:{target}" for _, kind, target in attached],
        document=await policies.current_document(conn, name) if document else None,
    )


async def list_policies(request: web.Request) -> web.Response:
    await require_admin(request)
    async with service(request).pool.acquire() as conn:
        names = await policies.policy_names(conn)
        infos = [await _info(conn, name, document=False) for name in names]
    return json_response(list(infos))


async def get_policy(request: web.Request) -> web.Response:
    await require_admin(request)
    name = policies.check_name(request.match_info["name"])
    async with service(request).pool.acquire() as conn:
        return json_response(await _info(conn, name, document=True))


async def put_policy(request: web.Request) -> web.Response:
    """``PUT /v1/policies/{name}``: store a document (a new version only if it changed)."""
    name = request.match_info["name"]

    async def change(conn: Any, actor: str, instance: str) -> policies.ApplyResult:
        policies.check_name(name)
        body = parse_model(PolicyPut, await read_body(request))
        targets = [(name, *policies.parse_target(text)) for text in body.attach]
        document = policy_engine.check_document(body.document, name=name)
        return await policies.apply_policies(
            conn, {name: document}, actor=actor, instance=instance, attach=targets
        )

    result = await _change(request, "policy_apply", change)
    return json_response(
        PolicyApplied(
            name=name,
            version=result.version,
            changed=bool(result.changed),
            attached=[f"{kind}:{target}" for _, kind, target in result.attached],
        ),
        status=201 if result.changed else 200,
    )


async def delete_policy(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    version = await _change(
        request,
        "policy_delete",
        lambda conn, actor, instance: policies.delete_policy(
            conn, name, actor=actor, instance=instance
        ),
    )
    return json_response(PolicyVersion(version=version))


async def policy_history(request: web.Request) -> web.Response:
    await require_admin(request)
    name = request.query.get("name")
    if name is not None:
        policies.check_name(name)
    async with service(request).pool.acquire() as conn:
        revisions = await policies.history(conn, name, limit=1000)
    return json_response(
        [PolicyRevisionInfo(**{k: getattr(r, k) for k in PolicyRevisionInfo.model_fields})
         for r in revisions]
    )  # fmt: skip


async def policy_version(request: web.Request) -> web.Response:
    await require_admin(request)
    async with service(request).pool.acquire() as conn:
        return json_response(PolicyVersion(version=await policies.current_version(conn)))


# --- attachments -----------------------------------------------------------------------


async def list_attachments(request: web.Request) -> web.Response:
    await require_admin(request)
    async with service(request).pool.acquire() as conn:
        rows = await policies.attachments(conn, request.query.get("policy"))
    return json_response(
        [AttachmentInfo(policy=name, target_kind=kind, target=target)
         for name, kind, target in rows]
    )  # fmt: skip


async def change_attachment(request: web.Request) -> web.Response:
    """``PUT|DELETE /v1/policies/{name}/attachments/{kind}/{target}``."""
    name, kind, target = (request.match_info[k] for k in ("name", "kind", "target"))
    attach = request.method == "PUT"
    operation = policies.attach if attach else policies.detach

    async def change(conn: Any, actor: str, instance: str) -> int | None:
        return await operation(conn, name, kind, target, actor=actor, instance=instance)

    version = await _change(request, "policy_attach" if attach else "policy_detach", change)
    async with service(request).pool.acquire() as conn:
        current = await policies.current_version(conn)
    return json_response(PolicyVersion(version=version if version is not None else current))


# --- device attributes -----------------------------------------------------------------


async def _attributes(conn: Any, device_id: str) -> AttributesInfo:
    values = await policies.get_attributes(conn, device_id)
    return AttributesInfo(
        device_id=device_id,
        attributes=values,
        groups=await policies.groups_of(conn, device_id),
        policy_version=await policies.current_version(conn),
    )


async def get_attributes(request: web.Request) -> web.Response:
    await require_admin(request)
    async with service(request).pool.acquire() as conn:
        return json_response(await _attributes(conn, request.match_info["device_id"]))


async def put_attributes(request: web.Request) -> web.Response:
    """``PUT /v1/devices/{id}/attributes``: replace the device's attributes."""
    device_id = request.match_info["device_id"]

    async def change(conn: Any, actor: str, instance: str) -> AttributesInfo:
        body = parse_model(AttributesPut, await read_body(request))
        current = await policies.get_attributes(conn, device_id)
        await policies.set_attributes(
            conn, device_id, body.attributes,
            unset=[key for key in current if key not in body.attributes],
            actor=actor, instance=instance,
        )  # fmt: skip
        return await _attributes(conn, device_id)

    return json_response(await _change(request, "attributes_set", change, device_id=device_id))


# --- groups ----------------------------------------------------------------------------


def _group(info: policies.GroupInfo, devices: list[str] | None = None) -> GroupInfo:
    return GroupInfo(
        name=info.name,
        description=info.description,
        members=info.members,
        created_at=info.created_at,
        devices=devices,
    )


async def list_groups(request: web.Request) -> web.Response:
    await require_admin(request)
    async with service(request).pool.acquire() as conn:
        groups = await policies.list_groups(conn)
    return json_response(list(_group(g) for g in groups))


async def get_group(request: web.Request) -> web.Response:
    await require_admin(request)
    name = request.match_info["name"]
    async with service(request).pool.acquire() as conn:
        devices = await policies.group_members(conn, name)
        info = next(g for g in await policies.list_groups(conn) if g.name == name)
    return json_response(_group(info, devices))


async def put_group(request: web.Request) -> web.Response:
    """``PUT /v1/groups/{name}``: create a group (409 if it exists)."""
    name = request.match_info["name"]

    async def change(conn: Any, actor: str, instance: str) -> int:
        body = parse_model(GroupPut, await read_body(request))
        return await policies.create_group(
            conn, name, body.description, actor=actor, instance=instance
        )

    return json_response(
        PolicyVersion(version=await _change(request, "group_create", change)), status=201
    )


async def delete_group(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    version = await _change(
        request,
        "group_delete",
        lambda conn, actor, instance: policies.delete_group(
            conn, name, actor=actor, instance=instance
        ),
    )
    return json_response(PolicyVersion(version=version))


async def change_members(request: web.Request) -> web.Response:
    """``POST /v1/groups/{name}/members``: ``{"add": [...], "remove": [...]}``."""
    name = request.match_info["name"]

    async def change(conn: Any, actor: str, instance: str) -> int:
        body = parse_model(GroupMembersPut, await read_body(request))
        for add, devices in ((True, body.add), (False, body.remove)):
            if devices:
                await policies.change_members(
                    conn, name, devices, add=add, actor=actor, instance=instance
                )
        return await policies.current_version(conn)

    return json_response(PolicyVersion(version=await _change(request, "group_members", change)))


# --- explain ---------------------------------------------------------------------------


async def explain(request: web.Request) -> web.Response:
    """``POST /v1/policy/explain``: decision, statement and policy version for a device."""
    await require_admin(request)
    body = parse_model(ExplainRequest, await read_body(request))
    async with service(request).pool.acquire() as conn:
        explained = await policy_engine.explain_device(
            conn, body.device_id, action=body.action, topic=body.topic, qos=body.qos,
            retain=body.retain, trust_domain=service(request).settings.trust_domain,
        )  # fmt: skip
    return json_response(ExplainResult.model_validate(explained.as_dict()))


ROUTES = [
    web.get("/v1/policies", list_policies),
    web.get("/v1/policies/{name}", get_policy),
    web.put("/v1/policies/{name}", put_policy),
    web.delete("/v1/policies/{name}", delete_policy),
    web.put("/v1/policies/{name}/attachments/{kind}/{target}", change_attachment),
    web.delete("/v1/policies/{name}/attachments/{kind}/{target}", change_attachment),
    web.get("/v1/policy/history", policy_history),
    web.get("/v1/policy/version", policy_version),
    web.get("/v1/policy/attachments", list_attachments),
    web.post("/v1/policy/explain", explain),
    web.get("/v1/devices/{device_id}/attributes", get_attributes),
    web.put("/v1/devices/{device_id}/attributes", put_attributes),
    web.get("/v1/groups", list_groups),
    web.get("/v1/groups/{name}", get_group),
    web.put("/v1/groups/{name}", put_group),
    web.delete("/v1/groups/{name}", delete_group),
    web.post("/v1/groups/{name}/members", change_members),
]
"""The routes, for `provisioning.http.server.build_app`."""
