"""The OpenAPI 3.1 document of the provisioning API, generated from the pydantic models."""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel

from schemas.api import (
    AttachmentInfo,
    AttributesInfo,
    AttributesPut,
    CertificateBundle,
    CertificateInfo,
    DeviceDetail,
    DeviceInfo,
    EnrollRequest,
    EventPage,
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
    Problem,
    RenewRequest,
    TokenCreated,
    TokenCreateRequest,
    TokenInfo,
)

_REF = "#/components/schemas/{model}"
_MODELS: tuple[type[BaseModel], ...] = (
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
    CertificateBundle,
    CertificateInfo,
    DeviceDetail,
    DeviceInfo,
    EnrollRequest,
    EventPage,
    Problem,
    RenewRequest,
    TokenCreated,
    TokenCreateRequest,
    TokenInfo,
)


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _op(
    summary: str,
    *,
    ok: int = 200,
    response: type[BaseModel] | None = None,
    array: bool = False,
    body: type[BaseModel] | None = None,
    admin: bool = False,
    params: list[dict[str, Any]] | None = None,
    content: dict[str, Any] | None = None,
) -> dict[str, Any]:
    problem = {"content": {"application/problem+json": {"schema": _ref(Problem)}}}
    operation: dict[str, Any] = {
        "summary": summary,
        "responses": {
            "default": {
                "description": "A problem document (RFC 9457) with a stable reason code.",
                **problem,
            }
        },
    }
    if response is not None:
        schema: dict[str, Any] = _ref(response)
        if array:
            schema = {"type": "array", "items": schema}
        operation["responses"][str(ok)] = {"description": "OK", "content": _json(schema)}
    else:
        extra = {"content": content} if content else {}
        operation["responses"][str(ok)] = {"description": "OK", **extra}
    if body is not None:
        operation["requestBody"] = {"required": True, "content": _json(_ref(body))}
    if admin:
        operation["security"] = [{"adminKey": []}]
    if params:
        operation["parameters"] = params
    return operation


def _q(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema or {"type": "string"},
    }


def _p(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


_PKCS7 = {"application/pkcs7-mime": {"schema": {"type": "string", "contentEncoding": "base64"}}}
_PKCS10_BODY = {
    "required": True,
    "description": "Base64 of a DER PKCS#10 CSR (RFC 7030).",
    "content": {"application/pkcs10": {"schema": {"type": "string", "contentEncoding": "base64"}}},
}
_LIMIT = _q("limit", "Page size (1-1000).", {"type": "integer", "minimum": 1, "maximum": 1000})


def _policy_paths() -> dict[str, Any]:
    """Policies, attachments, device attributes, groups, explain (all admin)."""
    name, kind, target = _p("name"), _p("kind"), _p("target")
    kind["schema"] = {"enum": ["fleet", "group", "device"]}
    put_policy = _op(
        "Store a policy document: 201 with a new version if it changed, else 200.",
        response=PolicyApplied,
        body=PolicyPut,
        admin=True,
        params=[name],
    )
    put_policy["responses"]["201"] = put_policy["responses"]["200"]
    return {
        "/v1/policies": {"get": _op("List policies.", response=PolicyInfo, array=True, admin=True)},
        "/v1/policies/{name}": {
            "get": _op(
                "A policy with its document.", response=PolicyInfo, admin=True, params=[name]
            ),
            "put": put_policy,
            "delete": _op(
                "Delete a policy and its attachments.",
                response=PolicyVersion,
                admin=True,
                params=[name],
            ),
        },
        "/v1/policies/{name}/attachments/{kind}/{target}": {
            method: _op(
                f"{verb} a policy to/from a fleet, group or device.",
                response=PolicyVersion,
                admin=True,
                params=[name, kind, target],
            )
            for method, verb in (("put", "Attach"), ("delete", "Detach"))
        },
        "/v1/policy/history": {
            "get": _op(
                "Policy revisions, newest first.",
                response=PolicyRevisionInfo,
                array=True,
                admin=True,
                params=[_q("name", "Only this policy.")],
            )
        },
        "/v1/policy/version": {
            "get": _op("The global policy version.", response=PolicyVersion, admin=True)
        },
        "/v1/policy/attachments": {
            "get": _op(
                "Policy attachments.",
                response=AttachmentInfo,
                array=True,
                admin=True,
                params=[_q("policy", "Only this policy.")],
            )
        },
        "/v1/policy/explain": {
            "post": _op(
                "Decision, deciding statement and policy version for a device's request.",
                response=ExplainResult,
                body=ExplainRequest,
                admin=True,
            )
        },
        "/v1/devices/{device_id}/attributes": {
            "get": _op(
                "A device's attributes and groups.",
                response=AttributesInfo,
                admin=True,
                params=[_p("device_id")],
            ),
            "put": _op(
                "Replace a device's attributes.",
                response=AttributesInfo,
                body=AttributesPut,
                admin=True,
                params=[_p("device_id")],
            ),
        },
        "/v1/groups": {"get": _op("List groups.", response=GroupInfo, array=True, admin=True)},
        "/v1/groups/{name}": {
            "get": _op("A group and its devices.", response=GroupInfo, admin=True, params=[name]),
            "put": _op(
                "Create a group.",
                ok=201,
                response=PolicyVersion,
                body=GroupPut,
                admin=True,
                params=[name],
            ),
            "delete": _op(
                "Delete a group (memberships and attachments too).",
                response=PolicyVersion,
                admin=True,
                params=[name],
            ),
        },
        "/v1/groups/{name}/members": {
            "post": _op(
                "Add and remove devices.",
                response=PolicyVersion,
                body=GroupMembersPut,
                admin=True,
                params=[name],
            )
        },
    }


@cache
def document() -> dict[str, Any]:
    """The OpenAPI document (built once)."""
    schemas: dict[str, Any] = {}
    for model in _MODELS:
        schema = model.model_json_schema(ref_template=_REF, mode="serialization")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    paths: dict[str, Any] = {
        "/v1/enroll": {
            "post": _op(
                "Enroll a device with a bootstrap token and a CSR.",
                ok=201,
                response=CertificateBundle,
                body=EnrollRequest,
            )
        },
        "/v1/renew": {
            "post": _op(
                "Renew with the current certificate (mutual TLS).",
                ok=201,
                response=CertificateBundle,
                body=RenewRequest,
            )
        },
        "/v1/crl": {
            "get": _op(
                "The CRL of the issuing CA (DER; PEM with ?format=pem).",
                params=[_q("format", "der or pem", {"enum": ["der", "pem"]})],
                content={"application/pkix-crl": {}, "application/x-pem-file": {}},
            )
        },
        "/v1/tokens": {
            "get": _op(
                "List bootstrap tokens.",
                response=TokenInfo,
                array=True,
                admin=True,
                params=[_q("fleet", "Only this fleet.")],
            ),
            "post": _op(
                "Create a bootstrap token (the secret is shown once).",
                ok=201,
                response=TokenCreated,
                body=TokenCreateRequest,
                admin=True,
            ),
        },
        "/v1/tokens/{token_id}": {
            "get": _op("Show a token.", response=TokenInfo, admin=True, params=[_p("token_id")])
        },
        "/v1/tokens/{token_id}/revoke": {
            "post": _op("Revoke a token.", response=TokenInfo, admin=True, params=[_p("token_id")])
        },
        "/v1/devices": {
            "get": _op(
                "List devices.",
                response=DeviceInfo,
                array=True,
                admin=True,
                params=[
                    _q("fleet", "Only this fleet."),
                    _q("status", "active, disabled or revoked."),
                    _LIMIT,
                ],
            )
        },
        "/v1/devices/{device_id}": {
            "get": _op(
                "Show a device and its certificates.",
                response=DeviceDetail,
                admin=True,
                params=[_p("device_id")],
            )
        },
        **{
            f"/v1/devices/{{device_id}}/{action}": {
                "post": _op(
                    f"{action.capitalize()} a device.",
                    response=DeviceInfo,
                    admin=True,
                    params=[_p("device_id")],
                )
            }
            for action in ("disable", "enable", "revoke")
        },
        "/v1/certificates": {
            "get": _op(
                "List certificates.",
                response=CertificateInfo,
                array=True,
                admin=True,
                params=[
                    _q("device", "Only this device."),
                    _q("status", "active, superseded or revoked."),
                    _LIMIT,
                ],
            )
        },
        "/v1/certificates/{serial}/revoke": {
            "post": _op(
                "Revoke a certificate.", response=CertificateInfo, admin=True, params=[_p("serial")]
            )
        },
        "/v1/events": {
            "get": _op(
                "Auth events, newest first, with cursor pagination.",
                response=EventPage,
                admin=True,
                params=[
                    _q("device", "Device id."),
                    _q("since", "Timestamp or duration ago (10m, 7d)."),
                    _q("until", "Timestamp or duration ago."),
                    _q("type", "Event type."),
                    _q("outcome", "allowed or denied."),
                    _q("reason", "Reason code."),
                    _q("peer", "Peer address."),
                    _q("cursor", "next_cursor of the last page."),
                    _LIMIT,
                ],
            )
        },
        **_policy_paths(),
        "/.well-known/est/cacerts": {"get": _op("EST: the CA chain.", content=_PKCS7)},
        "/.well-known/est/simpleenroll": {
            "post": {
                **_op("EST: enroll (bootstrap token as Basic password or Bearer).", content=_PKCS7),
                "requestBody": _PKCS10_BODY,
            }
        },
        "/.well-known/est/simplereenroll": {
            "post": {
                **_op("EST: re-enroll with the current certificate (mutual TLS).", content=_PKCS7),
                "requestBody": _PKCS10_BODY,
            }
        },
        "/healthz": {"get": _op("The process is up.")},
        "/readyz": {"get": _op("The database answers and the CA is loaded.")},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "devicegate provisioning", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "securitySchemes": {
                "adminKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An admin key (dgk_...).",
                }
            },
        },
    }
