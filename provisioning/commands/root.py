"""The root command group: lazy subcommands, global options anywhere, one line per failure.

* Lazy: a command's module is imported when that command runs (or its ``--help`` is
  asked), never for ``devicegate --help``, which prints `COMMANDS` in plain text.
* Global options (``--database-url``, ``--metrics-listen``, ``--debug``...) are accepted
  after the subcommand too: `hoist_global_options` moves them in front of it, the one place
  click parses them, so every command takes them the same way.
* Failures: any exception a command lets out becomes one ``error:`` line on stderr that
  names what is wrong and what to do (`provisioning.commands.failures.explain`); the
  traceback is printed only under ``--debug``. Commands need no try/except of their own.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import typer
from typer.core import TyperGroup

from provisioning.commands import COMMANDS


class _LazyCommands(MutableMapping[str, Any]):
    """``group.commands`` that imports a command's module on first lookup."""

    def __init__(self) -> None:
        self._loaded: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._loaded:
            if name not in COMMANDS:
                raise KeyError(name)
            self._loaded.update(_load(COMMANDS[name][0]))
        return self._loaded[name]

    def __setitem__(self, name: str, command: Any) -> None:
        self._loaded[name] = command

    def __delitem__(self, name: str) -> None:
        del self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(COMMANDS)

    def __len__(self) -> int:
        return len(COMMANDS)


def _load(module_name: str) -> Mapping[str, Any]:
    """The click commands that module ``provisioning.commands.<module_name>`` registers."""
    module = importlib.import_module(f"provisioning.commands.{module_name}")
    holder = typer.Typer()
    holder.callback()(lambda: None)  # always a group, even for a module of one command
    module.register(holder)
    group = typer.main.get_command(holder)
    assert isinstance(group, TyperGroup)
    return dict(group.commands)


def hoist_global_options(args: list[str], options: Mapping[str, bool]) -> list[str]:
    """Move global options given after the subcommand in front of it.

    ``options`` maps each global option name to whether it takes a value. Nothing after a
    ``--`` moves: it is an argument by the usual rule.
    """
    index = 0
    while index < len(args) and args[index].startswith("-") and args[index] != "--":
        name = args[index].split("=", 1)[0]
        index += 2 if options.get(name) and "=" not in args[index] else 1
    front, rest, moved = list(args[: index + 1]), list(args[index + 1 :]), []
    position = 0
    while position < len(rest) and rest[position] != "--":
        token = rest[position]
        name = token.split("=", 1)[0]
        if name in options:
            width = 2 if options[name] and "=" not in token else 1
            moved += rest[position : position + width]
            del rest[position : position + width]
        else:
            position += 1
    if not moved:
        return list(args)
    return front[:index] + moved + front[index:] + rest


class RootGroup(TyperGroup):
    """``devicegate``: see the module docstring."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        self.commands = _LazyCommands()

    def list_commands(self, ctx: Any) -> list[str]:
        return list(COMMANDS)

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, short) for name, (_, short) in COMMANDS.items()])

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        options = {
            name: not getattr(param, "is_flag", False)
            for param in self.params
            for name in (*param.opts, *param.secondary_opts)
        }
        return super().parse_args(ctx, hoist_global_options(args, options))

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            if type(exc).__module__.startswith("typer") or ctx.params.get("debug"):
                raise  # typer's and click's own exits and usage errors; --debug: everything
            from provisioning.commands.failures import explain

            code, message = explain(exc, ctx.obj)
            sys.stderr.write(f"error: {message}\n")
            sys.stderr.flush()
            raise typer.Exit(code) from None
