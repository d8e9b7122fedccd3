"""Every ``devicegate ...`` command line in README.md and docs/*.md names a real command.

Each command found in a code block or an inline code span is walked through the real
command tree (the Typer app, as click sees it): every subcommand must exist, every option
must belong to the group or command it follows, and no command may be given more
positional arguments than it takes. ``--help`` must then succeed for that command, so the
docs cannot drift from the CLI unnoticed.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from provisioning.commands.cli import app

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCED = re.compile(r"^```[a-z]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
INLINE = re.compile(r"`(devicegate [^`]+)`")
# Where a command starts in a shell line: line start, a prompt, $( ... ), after && | ; or
# after environment assignments (NAME=value devicegate ...).
COMMAND = re.compile(r"(?:^|\$ |\$\(|&& |\|\| |; |\| |^(?:[A-Z_]+=\S+ )+)devicegate\b(.*)$")
STOP = set("();<>|&")
PLACEHOLDER = {"...", "…"}


def _shell_lines(text: str) -> list[str]:
    lines: list[str] = []
    for block in FENCED.findall(text):
        lines.extend(block.replace("\\\n", " ").splitlines())
    lines.extend(INLINE.findall(text))
    return lines


def _words(rest: str) -> list[str]:
    lexer = shlex.shlex(rest, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words: list[str] = []
    try:
        for word in lexer:
            if set(word) <= STOP:
                break
            words.append(word)
    except ValueError:  # an unclosed quote in a fragment: check what came before it
        pass
    return words


def doc_commands() -> list[tuple[str, list[str]]]:
    found: list[tuple[str, list[str]]] = []
    for path in DOCS:
        for line in _shell_lines(path.read_text()):
            for match in COMMAND.finditer(line.strip()):
                found.append((f"{path.name}: {line.strip()}", _words(match[1])))
    return found


# Typer ships its own copy of click: its classes are reached through the app, not imported.
Command = Any


def _takes_value(command: Command, word: str, root: Command) -> bool:
    """Whether option ``word`` of ``command`` (or a global option of ``root``, which may
    follow any subcommand) takes a value; AssertionError when unknown."""
    name = word.split("=", 1)[0]
    for param in (*command.params, *root.params):
        if param.param_type_name == "option" and name in (*param.opts, *param.secondary_opts):
            return not (param.is_flag or param.count) and "=" not in word
    assert name in ("--help", "-h"), f"{command.name}: no option {name}"
    return False


def check(words: list[str]) -> list[str]:
    """The subcommand path of ``devicegate <words>``; raises AssertionError when wrong."""
    command: Command = typer.main.get_command(app)
    root = command
    path: list[str] = []
    positional = 0
    words = list(words)
    while words:
        word = words.pop(0)
        if word in PLACEHOLDER:
            break
        if word.startswith("-") and word != "-":
            if _takes_value(command, word, root) and words:
                words.pop(0)
            continue
        if hasattr(command, "commands"):  # a group: the word names a subcommand
            sub = command.commands.get(word)
            assert sub is not None, f"devicegate {' '.join(path)}: no subcommand {word!r}"
            command, positional = sub, 0
            path.append(word)
            continue
        positional += 1
        arguments = [p for p in command.params if p.param_type_name == "argument"]
        unbounded = any(a.nargs == -1 for a in arguments)
        assert unbounded or positional <= sum(a.nargs for a in arguments), (
            f"devicegate {' '.join(path)} takes {len(arguments)} argument(s), not {word!r}"
        )
    return path


COMMANDS = doc_commands()


def test_the_docs_name_many_commands() -> None:
    assert len(COMMANDS) >= 40, COMMANDS
    assert any("README.md" in where for where, _ in COMMANDS)


def test_every_doc_command_exists() -> None:
    wrong: list[str] = []
    paths: dict[tuple[str, ...], str] = {}
    for where, words in COMMANDS:
        try:
            paths.setdefault(tuple(check(words)), where)
        except AssertionError as exc:
            wrong.append(f"{where}\n    -> {str(exc).splitlines()[0]}")
    assert not wrong, "\n".join(wrong)
    runner = CliRunner()
    for path, where in paths.items():  # each command once: --help parses and exits 0
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (where, result.output)


@pytest.mark.parametrize(
    "line",
    ["admin-key create NAME", "admin-key make --name x", "token create --fleet a --usez 3"],
)
def test_a_wrong_command_is_caught(line: str) -> None:
    with pytest.raises(AssertionError):
        check(shlex.split(line))
