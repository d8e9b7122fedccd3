"""``devicegate enroll`` and ``devicegate renew``: the device side.

The HTTP and crypto modules are imported inside the commands: ``--help`` and the refusals
below answer at once, also on a small device.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from provisioning.agent.layout import KEY_FILE, KeyType
from provisioning.commands.common import console, fail, run

if TYPE_CHECKING:
    from schemas.api import CertificateBundle

JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


def register(app: typer.Typer) -> None:
    app.command("enroll")(enroll)
    app.command("renew")(renew)


def _report(bundle: CertificateBundle, directory: Path, json_output: bool) -> None:
    if json_output:
        record = bundle.model_dump(mode="json", exclude={"certificate", "chain"})
        print(json.dumps({**record, "dir": str(directory)}, sort_keys=True))
        return
    console.print(
        f"{bundle.device_id} (fleet {bundle.fleet}): certificate {bundle.serial} valid until "
        f"{bundle.not_after.isoformat()}, written to {directory}",
        highlight=False,
    )


def enroll(
    url: Annotated[str, typer.Option(help="Provisioning service, e.g. https://host:8443.")],
    out: Annotated[Path, typer.Option(help="Directory for device.key, device.crt, chain.pem.")],
    token: Annotated[
        str | None, typer.Option(help="Bootstrap token (dgt_...).", envvar="DEVICEGATE_TOKEN")
    ] = None,
    idevid_cert: Annotated[
        Path | None,
        typer.Option(help="Manufacturer certificate (IDevID) to enroll with instead of a token."),
    ] = None,
    idevid_key: Annotated[
        str | None,
        typer.Option(
            help="The IDevID's private key: a PEM file, or the pkcs11: URI of a key in a "
            "token or secure element (docs/secure-element.md)."
        ),
    ] = None,
    channel_binding: Annotated[
        bool, typer.Option(help="Bind the CSR to the TLS connection (RFC 9266; IDevID only).")
    ] = True,
    hardware_id: Annotated[str | None, typer.Option(help="Stable id of this hardware.")] = None,
    ca_cert: Annotated[
        Path | None, typer.Option(help="CA file to trust for the service (default: system).")
    ] = None,
    key_type: Annotated[KeyType, typer.Option(help="Key to make.")] = KeyType.P256,
    force: Annotated[
        bool, typer.Option(help="Replace the identity already in --out (its key is lost).")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Make a key on this device, enroll with a bootstrap token or the manufacturer
    certificate (IDevID, mutual TLS), write the files."""
    if (token is None) == (idevid_cert is None):
        fail("give one of --token or --idevid-cert (with --idevid-key)", code=2)
    if (idevid_cert is None) != (idevid_key is None):
        fail("--idevid-cert and --idevid-key go together", code=2)
    if (out / KEY_FILE).exists() and not force:
        # An enrolled device renews; enrolling again would orphan its key and certificate.
        fail(
            f"{out} already holds a device identity ({KEY_FILE}): use `devicegate renew "
            f"--dir {out}` to renew it, or pass --force to replace it"
        )
    from provisioning.agent import device

    if idevid_cert is not None:
        assert idevid_key is not None
        if hardware_id is not None:
            fail("--hardware-id goes with --token (an IDevID names its hardware)", code=2)
        bundle = run(
            device.enroll_idevid(
                url=url, idevid_cert=idevid_cert, out_dir=out,
                idevid_key=idevid_key if idevid_key.startswith("pkcs11:") else Path(idevid_key),
                ca_cert=ca_cert, key_type=key_type, channel_binding=channel_binding,
            )
        )  # fmt: skip
        _report(bundle, out, json_output)
        return
    assert token is not None
    bundle = run(
        device.enroll(
            url=url,
            token=token,
            out_dir=out,
            hardware_id=hardware_id,
            ca_cert=ca_cert,
            key_type=key_type,
        )
    )
    _report(bundle, out, json_output)


def renew(
    dir: Annotated[Path, typer.Option("--dir", help="The device directory (from enroll).")],
    url: Annotated[str, typer.Option(help="Provisioning service, e.g. https://host:8443.")],
    ca_cert: Annotated[
        Path | None, typer.Option(help="CA file to trust (default: DIR/chain.pem).")
    ] = None,
    key_type: Annotated[
        KeyType | None, typer.Option(help="New key type (default: the current one's).")
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Renew this device's certificate with its current one, for a new key."""
    from provisioning.agent import device

    bundle = run(device.renew(url=url, directory=dir, ca_cert=ca_cert, key_type=key_type))
    _report(bundle, dir, json_output)
