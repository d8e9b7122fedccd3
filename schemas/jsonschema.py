"""Generates ``schemas/json/*.schema.json`` from the models; ``python -m schemas.jsonschema``.

A test regenerates them in memory and fails when the committed files are stale.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from schemas import api, certificates, events, policy, settings

MODELS: dict[str, type[BaseModel]] = {
    "auth-event": events.AuthEvent,
    "presented-certificate": certificates.PresentedCertificate,
    "policy": policy.PolicyDocument,
    "policy-file": policy.PolicyFile,
    "policy-cases": policy.PolicyCases,
    "settings": settings.Settings,
    "problem": api.Problem,
    "enroll-request": api.EnrollRequest,
    "certificate-bundle": api.CertificateBundle,
    "renew-request": api.RenewRequest,
    "token-create-request": api.TokenCreateRequest,
    "token-created": api.TokenCreated,
    "token-info": api.TokenInfo,
    "device-info": api.DeviceInfo,
    "device-detail": api.DeviceDetail,
    "certificate-info": api.CertificateInfo,
    "admin-key-created": api.AdminKeyCreated,
    "admin-key-info": api.AdminKeyInfo,
    "event-page": api.EventPage,
}

OUTPUT_DIR = Path(__file__).parent / "json"


def render() -> dict[str, str]:
    """File name -> file text for every model."""
    files = {}
    for name, model in MODELS.items():
        schema = model.model_json_schema(mode="serialization")
        if model is settings.Settings:
            # The default instance id is the host name: not part of the contract.
            schema["properties"]["instance_id"].pop("default", None)
        files[f"{name}.schema.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return files


def main() -> int:
    OUTPUT_DIR.mkdir(exist_ok=True)
    for stale in OUTPUT_DIR.glob("*.schema.json"):
        stale.unlink()
    for name, text in render().items():
        (OUTPUT_DIR / name).write_text(text)
    print(f"wrote {len(MODELS)} schemas to {OUTPUT_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
