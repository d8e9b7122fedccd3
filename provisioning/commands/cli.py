"""The ``devicegate`` command: one entry point for operators, factory lines and devices.

Each command group lives in ``provisioning/commands/``; this module holds the global options.
`provisioning.commands.root.RootGroup` loads the groups lazily, accepts the global options
after the subcommand too, and turns failures into one line (a traceback under ``--debug``).
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from provisioning.commands.root import RootGroup


class LogFormat(StrEnum):
    json = "json"
    text = "text"


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


app = typer.Typer(
    name="devicegate",
    cls=RootGroup,
    rich_markup_mode=None,  # plain help: `devicegate --help` does not load rich
    help="Zero-trust device identity gateway: provisioning CA, mTLS MQTT bridge, audit log.\n\n"
    "The options below go before or after the command; a failure is one error: line "
    "(--debug adds the traceback).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    ctx: typer.Context,
    config: Annotated[
        Path | None, typer.Option("--config", help="TOML file with settings.")
    ] = None,
    database_url: Annotated[
        str | None, typer.Option(help="PostgreSQL URL (env DEVICEGATE_DATABASE_URL).")
    ] = None,
    pki_dir: Annotated[
        Path | None, typer.Option(help="PKI directory (env DEVICEGATE_PKI_DIR).")
    ] = None,
    metrics_listen: Annotated[
        str | None,
        typer.Option(
            help="HOST:PORT of /metrics, or off (env DEVICEGATE_METRICS_LISTEN); "
            "gateway worker i serves on PORT + i."
        ),
    ] = None,
    log_format: Annotated[
        LogFormat | None,
        typer.Option(help="Log lines: json or text (env DEVICEGATE_LOG_FORMAT)."),
    ] = None,
    log_level: Annotated[
        LogLevel | None,
        typer.Option(help="Lowest level logged (env DEVICEGATE_LOG_LEVEL)."),
    ] = None,
    debug: Annotated[
        bool, typer.Option("--debug", help="Print the traceback of a failure.")
    ] = False,
) -> None:
    from provisioning.commands.common import Context

    ctx.obj = Context(
        config,
        {
            "database_url": database_url,
            "pki_dir": pki_dir,
            "metrics_listen": metrics_listen,
            "log_format": log_format.value if log_format is not None else None,
            "log_level": log_level.value if log_level is not None else None,
        },
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
