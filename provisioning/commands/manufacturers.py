"""``devicegate fleet trust-manufacturer|distrust-manufacturer|manufacturers|import-manifest``
and ``devicegate idevid block|unblock|list``: manufacturer trust (IDevID enrollment)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from provisioning.commands.common import console, fail, run
from provisioning.commands.records import CLI_ACTOR, show, with_connection

fleet_group = typer.Typer(
    help="Manufacturer CAs a fleet trusts (IDevID) and its manifests.", no_args_is_help=True
)
idevid_group = typer.Typer(
    help="Block, unblock and list manufacturer certificates (IDevIDs).", no_args_is_help=True
)

COLUMNS = [
    "fleet", "ca_fingerprint", "subject", "intermediates", "require_allowlist",
    "require_channel_binding", "crl",
]  # fmt: skip
BLOCK_COLUMNS = ["fleet", "kind", "value", "note", "created_at"]

FleetOption = Annotated[str, typer.Option(help="The fleet.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def register(app: typer.Typer) -> None:
    app.add_typer(fleet_group, name="fleet")
    app.add_typer(idevid_group, name="idevid")


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        fail(f"{what} {path}: {exc.strerror or exc}", code=2)


@fleet_group.command("trust-manufacturer")
def trust_manufacturer(
    ctx: typer.Context,
    fleet: FleetOption,
    ca: Annotated[Path, typer.Option(help="The manufacturer's root CA certificate (PEM or DER).")],
    intermediate: Annotated[
        list[Path] | None,
        typer.Option(help="An intermediate CA between the root and IDevIDs (repeatable)."),
    ] = None,
    require_allowlist: Annotated[
        bool, typer.Option(help="Enroll only IDevIDs listed by the fleet's manifest.")
    ] = False,
    require_channel_binding: Annotated[
        bool,
        typer.Option(help="Require the RFC 9266 tls-exporter value in the CSR (TLS 1.3)."),
    ] = False,
    crl: Annotated[
        Path | None, typer.Option(help="The manufacturer's CRL file (PEM or DER), stored.")
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Trust a manufacturer CA for a fleet: devices with its IDevIDs enroll without a token.

    Running it again for the same CA replaces its options, intermediates and CRL.
    """
    from provisioning.enrollment import manufacturers

    settings = context_settings(ctx)
    root = manufacturers.load_certificates(_read(ca, "--ca"), "--ca")
    if len(root) != 1:
        fail("--ca: give exactly one certificate (the manufacturer's root)", code=2)
    intermediates = [
        cert
        for path in intermediate or []
        for cert in manufacturers.load_certificates(_read(path, "--intermediate"), str(path))
    ]
    loaded_crl = manufacturers.load_crl(_read(crl, "--crl")) if crl is not None else None
    info = with_connection(
        settings,
        lambda conn: manufacturers.trust_manufacturer(
            conn,
            fleet=fleet,
            root=root[0],
            intermediates=intermediates,
            require_allowlist=require_allowlist,
            require_channel_binding=require_channel_binding,
            crl=loaded_crl,
            actor=CLI_ACTOR,
            instance=settings.instance_id,
        ),
    )
    show([info], json_output=json_output, title="trusted", columns=COLUMNS)


def context_settings(ctx: typer.Context) -> Any:
    from provisioning.commands.common import context

    return context(ctx).settings()


@fleet_group.command("distrust-manufacturer")
def distrust_manufacturer(
    ctx: typer.Context,
    fleet: FleetOption,
    ca_fingerprint: Annotated[
        str | None, typer.Option(help="SPKI SHA-256 of the CA (from `fleet manufacturers`).")
    ] = None,
    ca: Annotated[Path | None, typer.Option(help="Or the CA certificate itself.")] = None,
) -> None:
    """Stop trusting a manufacturer CA in a fleet (enrolled devices keep their certificates)."""
    from provisioning.enrollment import idevid, manufacturers

    settings = context_settings(ctx)
    if (ca_fingerprint is None) == (ca is None):
        fail("give one of --ca-fingerprint or --ca", code=2)
    if ca is not None:
        fingerprint = idevid.spki_sha256(
            manufacturers.load_certificates(_read(ca, "--ca"), "--ca")[0]
        )
    else:
        assert ca_fingerprint is not None
        fingerprint = ca_fingerprint.lower().replace(":", "")
    with_connection(
        settings,
        lambda conn: manufacturers.distrust_manufacturer(
            conn, fleet=fleet, ca_fingerprint=fingerprint, actor=CLI_ACTOR,
            instance=settings.instance_id,
        ),
    )  # fmt: skip
    console.print(f"fleet {fleet} no longer trusts CA {fingerprint}", highlight=False)


@fleet_group.command("manufacturers")
def list_manufacturers(
    ctx: typer.Context,
    fleet: Annotated[str | None, typer.Option(help="Only this fleet.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """List the manufacturer CAs fleets trust."""
    from provisioning.enrollment import manufacturers

    settings = context_settings(ctx)
    found = with_connection(
        settings, lambda conn: manufacturers.list_manufacturers(conn, fleet=fleet)
    )
    show(found, json_output=json_output, title="manufacturer CAs", columns=COLUMNS)


def progress_bar() -> tuple[Callable[[int], None], Callable[[], None]]:
    """(update(entries), finish()) drawing a bar on stderr, quiet when it is not a terminal."""
    if not sys.stderr.isatty():
        return (lambda entries: None), (lambda: None)
    started = time.monotonic()

    def update(entries: int) -> None:
        rate = entries / max(time.monotonic() - started, 1e-6)
        sys.stderr.write(f"\rimporting: {entries:,} entries staged ({rate:,.0f}/s)")
        sys.stderr.flush()

    def finish() -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()

    return update, finish


@fleet_group.command("import-manifest")
def import_manifest(
    ctx: typer.Context,
    fleet: FleetOption,
    manifest: Annotated[
        Path, typer.Argument(help="CSV: serial and/or spki_sha256, optional model, site, line.")
    ],
    json_output: JsonOption = False,
) -> None:
    """Load a manifest of IDevIDs (the fleet's allowlist); all rows or none."""
    from provisioning.db import connect
    from provisioning.enrollment import manufacturers
    from provisioning.enrollment.manifest import ManifestError, parse

    settings = context_settings(ctx)
    update, finish = progress_bar()

    async def _run() -> tuple[int, int]:
        conn = await connect(settings.database_url)
        try:
            with manifest.open(newline="", encoding="utf-8-sig") as handle:
                return await manufacturers.import_manifest(
                    conn, fleet=fleet, entries=parse(handle), source=manifest.name,
                    actor=CLI_ACTOR, instance=settings.instance_id, progress=update,
                )  # fmt: skip
        finally:
            await conn.close()

    try:
        inserted, updated = run(_run())
    except ManifestError as exc:
        finish()
        fail(f"{manifest}: {exc} (nothing imported)")
    except (OSError, UnicodeDecodeError) as exc:
        finish()
        fail(f"{manifest}: {getattr(exc, 'strerror', None) or exc}")
    finish()
    if json_output:
        print(json.dumps({"fleet": fleet, "inserted": inserted, "updated": updated}))
        return
    console.print(
        f"fleet {fleet}: {inserted:,} IDevIDs added, {updated:,} updated", highlight=False
    )


def _identity(serial: str | None, fingerprint: str | None) -> tuple[str, str]:
    from provisioning.enrollment.manifest import ManifestError, normalise_hex

    if (serial is None) == (fingerprint is None):
        fail("give one of --serial or --fingerprint", code=2)
    try:
        if serial is not None:
            return "serial", normalise_hex(serial, 0, "serial")
        assert fingerprint is not None
        return "spki", normalise_hex(fingerprint, 0, "fingerprint")
    except ManifestError as exc:
        fail(str(exc).removeprefix("line 0: "), code=2)


SerialOption = Annotated[str | None, typer.Option(help="The IDevID's serial number (hex).")]
FingerprintOption = Annotated[
    str | None, typer.Option(help="SHA-256 of the IDevID's SubjectPublicKeyInfo (hex).")
]


@idevid_group.command("block")
def block(
    ctx: typer.Context,
    fleet: FleetOption,
    serial: SerialOption = None,
    fingerprint: FingerprintOption = None,
    note: Annotated[str | None, typer.Option(help="Why (kept with the block).")] = None,
) -> None:
    """Refuse enrollment of one IDevID in a fleet (revoke its device separately)."""
    from provisioning.enrollment import manufacturers

    settings = context_settings(ctx)
    kind, value = _identity(serial, fingerprint)
    changed = with_connection(
        settings,
        lambda conn: manufacturers.block(
            conn, fleet=fleet, kind=kind, value=value, note=note, actor=CLI_ACTOR,
            instance=settings.instance_id,
        ),
    )  # fmt: skip
    console.print(
        f"{kind} {value} {'blocked' if changed else 'was already blocked'} in fleet {fleet}",
        highlight=False,
    )


@idevid_group.command("unblock")
def unblock(
    ctx: typer.Context,
    fleet: FleetOption,
    serial: SerialOption = None,
    fingerprint: FingerprintOption = None,
) -> None:
    """Lift a block."""
    from provisioning.enrollment import manufacturers

    settings = context_settings(ctx)
    kind, value = _identity(serial, fingerprint)
    changed = with_connection(
        settings,
        lambda conn: manufacturers.block(
            conn, fleet=fleet, kind=kind, value=value, note=None, actor=CLI_ACTOR,
            instance=settings.instance_id, unblock=True,
        ),
    )  # fmt: skip
    console.print(
        f"{kind} {value} {'unblocked' if changed else 'was not blocked'} in fleet {fleet}",
        highlight=False,
    )


@idevid_group.command("list")
def list_blocks(
    ctx: typer.Context,
    fleet: Annotated[str | None, typer.Option(help="Only this fleet.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """List blocked IDevIDs."""
    from provisioning.enrollment import manufacturers

    settings = context_settings(ctx)
    found = with_connection(settings, lambda conn: manufacturers.list_blocks(conn, fleet=fleet))
    show(found, json_output=json_output, title="blocked IDevIDs", columns=BLOCK_COLUMNS)
