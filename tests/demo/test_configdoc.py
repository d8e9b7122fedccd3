"""docs/configuration.md is generated from the Settings model and must not be stale."""

from __future__ import annotations

from typing import Any

import typer.main

from provisioning.commands.cli import app
from schemas import configdoc
from schemas.settings import Settings


def test_configuration_reference_is_fresh() -> None:
    assert configdoc.OUTPUT.read_text() == configdoc.render(), (
        "docs/configuration.md is stale: run `python -m schemas.configdoc`"
    )


def test_every_setting_is_documented() -> None:
    text = configdoc.render()
    for name, field in Settings.model_fields.items():
        assert f"`DEVICEGATE_{name.upper()}`" in text
        assert field.description, f"{name} has no description"


def _option_names(command: Any) -> set[str]:
    return {opt for param in command.params for opt in getattr(param, "opts", [])}


def test_documented_flags_exist() -> None:
    # Typer bundles its own click: walk the tree by duck typing.
    root = typer.main.get_command(app)
    for field, flag in configdoc.FLAGS.items():
        assert field in Settings.model_fields, field
        *path, option = flag.split()
        command: Any = root
        for name in path:
            command = command.commands[name]
        assert option in _option_names(command), f"{flag} is not an option of devicegate"
