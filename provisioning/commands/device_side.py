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
    token: Annotated[
        str, typer.Option(help="Bootstrap token (dgt_...).", envvar="DEVICEGATE_TOKEN")
    ],
    out: Annotated[Path, typer.Option(help="Directory for device.key, device.crt, chain.pem.")],
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
    """Make a key on this device, enroll with a bootstrap token, write the files."""
    if (out / KEY_FILE).exists() and not force:
        # An enrolled device renews; enrolling again would orphan its key and certificate.
        fail(
            f"{out} already holds a device identity ({KEY_FILE}): use `devicegate renew "
            f"--dir {out}` to renew it, or pass --force to replace it"
        )
    from provisioning.agent import device

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
