"""``devicegate ca init|show``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from provisioning.commands.common import (
    console,
    context,
    errors,
    fail,
    print_json_lines,
    print_table,
)
from provisioning.pki import ca, directory
from provisioning.pki.directory import CA_KEYS
from schemas.settings import CRL_PATH

if TYPE_CHECKING:
    from provisioning.pki.pkcs11 import TokenRef

group = typer.Typer(help="Create and inspect the certificate authority.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(group, name="ca")


@group.command("init")
def init(
    ctx: typer.Context,
    key_type: Annotated[
        directory.CAKeyType, typer.Option(help="CA key type: EC P-256 or P-384.")
    ] = directory.CAKeyType.P256,
    server_name: Annotated[
        list[str] | None,
        typer.Option("--server-name", help="DNS name or IP of the listeners (repeatable)."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing CA.")] = False,
    insecure_no_passphrase: Annotated[
        bool, typer.Option(help="Write the CA keys unencrypted (tests and demos only).")
    ] = False,
    pkcs11_module: Annotated[
        Path | None,
        typer.Option(
            help="Generate the CA keys in a PKCS#11 token: path of its module "
            "(e.g. /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so). See docs/hsm.md."
        ),
    ] = None,
    pkcs11_token: Annotated[
        str | None, typer.Option(help="Label of the token (with --pkcs11-module).")
    ] = None,
    pkcs11_pin_file: Annotated[
        Path | None,
        typer.Option(
            help="File holding the token's user PIN, mode 0600 "
            "(env DEVICEGATE_PKCS11_PIN_FILE; with --pkcs11-module)."
        ),
    ] = None,
) -> None:
    """Create the root CA, the issuing CA and the listeners' server certificate."""
    settings = context(ctx).settings()
    token = _token(pkcs11_module, pkcs11_token, pkcs11_pin_file, settings.pkcs11_pin_file)
    passphrase = None if token is not None else settings.ca_passphrase_bytes()
    if token is None and passphrase is None and not insecure_no_passphrase:
        fail(
            "no CA passphrase: set DEVICEGATE_CA_PASSPHRASE or DEVICEGATE_CA_PASSPHRASE_FILE "
            "(or pass --insecure-no-passphrase to write unencrypted keys)",
            code=2,
        )
    if passphrase is not None and len(passphrase) < 8:
        fail("the CA passphrase must have at least 8 characters", code=2)
    names = server_name or ["localhost", "127.0.0.1"]
    crl_url = settings.crl_url
    if crl_url is None:
        # Derived, not refused: the first server name is one clients must use to verify
        # the listeners, so this URL is right unless a load balancer moves the port.
        public_url = ca.derived_public_url(names[0], settings.provisioning_listen)
        crl_url = f"{public_url}{CRL_PATH}"
        errors.print(
            f"[yellow]warning:[/yellow] DEVICEGATE_PUBLIC_URL is not set; certificates will "
            f"name {crl_url} as their CRL distribution point. Set it to the address relying "
            "parties reach provisioning at, then run ca init again.",
            highlight=False,
        )
    summary = directory.init_pki(
        settings.pki_dir,
        passphrase=passphrase,
        key_type=key_type,
        server_names=names,
        crl_url=crl_url,
        force=force,
        token=token,
    )
    console.print(f"CA created in [bold]{summary.directory}[/bold]")
    for name, certificate in (
        ("root", summary.root),
        ("issuing", summary.issuing),
        ("server", summary.server),
        ("audit", summary.audit),
    ):
        console.print(
            f"  {name:8} {certificate.subject.rfc4514_string()}"
            f"  sha256:{ca.fingerprint(certificate)}"
        )
    console.print(f"  CRL      {crl_url}", highlight=False)
    if token is None:
        console.print("Devices and clients trust chain.pem. Move root-ca.key offline when you can.")
    else:
        console.print(
            f"CA keys are in {token} (see {CA_KEYS}). Devices and clients trust chain.pem.",
            highlight=False,
        )


def _token(
    module: Path | None, label: str | None, pin_flag: Path | None, pin_setting: Path | None
) -> TokenRef | None:
    """The token of the --pkcs11-* options, all three or none; the PIN file is checked now
    (``DEVICEGATE_PKCS11_PIN_FILE`` stands for the flag)."""
    if module is None and label is None and pin_flag is None:
        return None
    from provisioning.pki.pkcs11 import TokenRef, read_pin

    pin_file = pin_flag or pin_setting
    if module is None or label is None or pin_file is None:
        fail(
            "--pkcs11-module, --pkcs11-token and --pkcs11-pin-file (or "
            "DEVICEGATE_PKCS11_PIN_FILE) go together",
            code=2,
        )
    read_pin(pin_file)  # a clear line about the file before anything is generated
    return TokenRef(module.absolute(), label, pin_file.absolute())


@group.command("audit-key")
def audit_key(ctx: typer.Context) -> None:
    """Issue a new audit signing key (audit.key, audit.crt) for an existing PKI directory.

    Gateways and provisioning sign the audit log's checkpoints with it; ship it to them
    like server.key. Checkpoints signed with an earlier key keep verifying.
    """
    settings = context(ctx).settings()
    authority = directory.load_ca(
        settings.pki_dir, settings.ca_passphrase_bytes(), pin_file=settings.pkcs11_pin_file
    )
    certificate = directory.issue_audit_signer(authority, settings.pki_dir)
    console.print(
        f"audit signer issued in [bold]{settings.pki_dir}[/bold]: "
        f"sha256:{ca.fingerprint(certificate)}, valid until "
        f"{certificate.not_valid_after_utc.isoformat()}"
    )


@group.command("show")
def show(
    ctx: typer.Context,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Print the CA certificates: subjects, fingerprints, validity."""
    settings = context(ctx).settings()
    certificates = directory.describe_pki(settings.pki_dir)
    records = [
        {
            "file": name,
            "subject": certificate.subject.rfc4514_string(),
            "issuer": certificate.issuer.rfc4514_string(),
            "serial": ca.serial_hex(certificate.serial_number),
            "sha256": ca.fingerprint(certificate),
            "not_before": certificate.not_valid_before_utc.isoformat(),
            "not_after": certificate.not_valid_after_utc.isoformat(),
        }
        for name, certificate in certificates
    ]
    if json_output:
        print_json_lines(records)
        return
    print_table(
        f"PKI in {settings.pki_dir}",
        ["file", "subject", "sha256", "not after"],
        [[r["file"], r["subject"], r["sha256"][:16] + "…", r["not_after"]] for r in records],
    )
