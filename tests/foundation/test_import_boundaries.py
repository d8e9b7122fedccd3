"""The import boundaries the layout stands for (docs/architecture.md, each package's __init__).

Every module of ``gateway``, ``provisioning`` and ``schemas`` is parsed (not imported) and
each import it makes, at module level or inside a function, absolute or relative, or through
``importlib.import_module("...")`` with a constant name, is checked against `RULES`.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("gateway", "provisioning", "schemas")

# The registry modules at the top of provisioning/, below every subpackage.
_REGISTRY = tuple(
    f"provisioning.{name}"
    for name in ("admin", "db", "errors", "eventlog", "policies", "store", "telemetry", "tokens")
)
_SURFACES = (
    "provisioning.http",
    "provisioning.console",
    "provisioning.commands",
    "provisioning.demo",
)


# The session state machine and its pure steps (gateway/connection.py's invariants): no
# event loop, no sockets, no TLS objects, none of the modules that hold them.
_SANS_IO = tuple(
    f"gateway.{name}"
    for name in ("connection", "admission", "codes", "actions", "downstream", "fastpath", "denials")
)
_IO = (
    "asyncio",
    "socket",
    "ssl",
    "selectors",
    "gateway.bridge",
    "gateway.upstream",
    "gateway.server",
    "gateway.tls",
)


@dataclass(frozen=True)
class Rule:
    """Modules under any of ``scope`` must not import any of ``forbidden``, except what is
    under ``allowed``; the modules in ``exempt`` are not checked against this rule."""

    name: str
    scope: tuple[str, ...]
    forbidden: tuple[str, ...]
    allowed: tuple[str, ...] = ()
    exempt: tuple[str, ...] = ()

    def applies_to(self, module: str) -> bool:
        return _under(module, self.scope) and module not in self.exempt

    def refuses(self, target: str) -> bool:
        return _under(target, self.forbidden) and not _under(target, self.allowed)


RULES = (
    Rule("the data plane never imports the control plane", ("gateway",), ("provisioning",)),
    Rule("schemas imports neither plane", ("schemas",), ("gateway", "provisioning")),
    Rule(
        "the control plane imports the gateway only to serve it",
        ("provisioning",),
        ("gateway",),
        # serve runs the gateway; policy (and policy_engine, for the API and console)
        # explains with gateway.policy's own decision (a copy of the rules could disagree
        # with the gateway that enforces them).
        exempt=(
            "provisioning.commands.serve",
            "provisioning.commands.policy",
            "provisioning.policy_engine",
        ),
    ),
    Rule(
        "the policy command imports only the gateway's pure policy",
        ("provisioning.commands.policy", "provisioning.policy_engine"),
        ("gateway",),
        allowed=("gateway.policy",),
    ),
    Rule(
        "the device agent imports only schemas",
        ("provisioning.agent",),
        ("provisioning", "gateway"),
        allowed=("provisioning.agent",),
    ),
    Rule(
        "the registry, pki, enrollment and audit never import the surfaces",
        (*_REGISTRY, "provisioning.pki", "provisioning.enrollment", "provisioning.audit"),
        _SURFACES,
    ),
    Rule(
        "the registry imports only schemas",
        _REGISTRY,
        ("provisioning", "gateway"),
        allowed=_REGISTRY,
    ),
    Rule(
        "the demo drives the product from outside",
        ("provisioning.demo",),
        ("provisioning.http", "provisioning.console", "provisioning.enrollment"),
    ),
    Rule(
        "only the commands import the demo",
        ("provisioning",),
        ("provisioning.demo",),
        allowed=("provisioning.demo",),
        exempt=("provisioning.commands.demo",),
    ),
    Rule(
        "the MQTT codec imports only itself",
        ("gateway.mqtt",),
        ("gateway", "schemas", "provisioning"),
        allowed=("gateway.mqtt",),
    ),
    Rule("the session state machine is sans-IO", _SANS_IO, _IO),
    Rule(
        "the event sink imports only schemas and gateway.database",
        ("gateway.events",),
        ("gateway",),
        allowed=("gateway.events", "gateway.database"),
    ),
)


@dataclass(frozen=True)
class Violation:
    rule: str
    module: str
    line: int
    target: str

    def __str__(self) -> str:
        return f"{self.module}:{self.line} imports {self.target} ({self.rule})"


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def _module_name(root: Path, path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def _imports(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """(line, imported name) for every import in ``tree``; ``from a import b`` yields ``a.b``
    (b may be a submodule, and a name in ``a`` is under ``a`` anyway)."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.lineno, node.args[0].value


def violations(root: Path) -> list[Violation]:
    """Every import under ``root``'s packages that breaks one of `RULES`."""
    found: list[Violation] = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            module, is_package = _module_name(root, path)
            rules = [rule for rule in RULES if rule.applies_to(module)]
            if not rules:
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            seen: set[tuple[str, int]] = set()  # one finding per rule and statement
            for line, target in _imports(tree, module, is_package):
                for rule in rules:
                    if rule.refuses(target) and (rule.name, line) not in seen:
                        seen.add((rule.name, line))
                        found.append(Violation(rule.name, module, line, target))
    return found


def test_the_tree_keeps_its_boundaries() -> None:
    assert [str(v) for v in violations(ROOT)] == []


def test_every_package_says_what_it_may_import() -> None:
    for package in PACKAGES:
        for init in (ROOT / package).rglob("__init__.py"):
            doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
            assert doc and "import" in doc, f"{init.relative_to(ROOT)}: no import rule stated"


def _write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


@pytest.mark.parametrize(
    ("relative", "source", "rule"),
    [
        (
            "gateway/bridge.py",
            "from provisioning.store import get_device\n",
            "the data plane never imports the control plane",
        ),
        (
            "gateway/events/sink.py",
            "def later():\n    import provisioning.http.server\n",
            "the data plane never imports the control plane",
        ),
        ("schemas/events.py", "from gateway.mqtt import topics\n", "schemas imports neither plane"),
        (
            "schemas/api.py",
            "import importlib\nimportlib.import_module('provisioning.store')\n",
            "schemas imports neither plane",
        ),
        (
            "provisioning/demo/stack.py",
            "from gateway import policy\n",
            "the control plane imports the gateway only to serve it",
        ),
        (
            "provisioning/commands/policy.py",
            "from gateway.server import GatewayServer\n",
            "the policy command imports only the gateway's pure policy",
        ),
        (
            "provisioning/agent/device.py",
            "from ..pki.ca import fingerprint\n",
            "the device agent imports only schemas",
        ),
        (
            "provisioning/pki/crl.py",
            "from provisioning import console\n",
            "the registry, pki, enrollment and audit never import the surfaces",
        ),
        (
            "gateway/mqtt/codec.py",
            "from schemas.events import Reason\n",
            "the MQTT codec imports only itself",
        ),
        (
            "gateway/events/spool.py",
            "from gateway.identity import DeviceIdentity\n",
            "the event sink imports only schemas and gateway.database",
        ),
        (
            "gateway/admission.py",
            "import asyncio\n",
            "the session state machine is sans-IO",
        ),
        (
            "gateway/connection.py",
            "from gateway.upstream import dial\n",
            "the session state machine is sans-IO",
        ),
    ],
)
def test_a_forbidden_import_is_found(tmp_path: Path, relative: str, source: str, rule: str) -> None:
    _write(tmp_path, relative, '"""A module."""\n\n' + source)
    (found,) = violations(tmp_path)
    assert found.rule == rule
    assert found.module == relative.removesuffix(".py").replace("/", ".")


def test_allowed_imports_pass(tmp_path: Path) -> None:
    _write(tmp_path, "gateway/events/sink.py", "from gateway.database import DB_ERRORS\n")
    _write(tmp_path, "provisioning/commands/serve.py", "def f():\n    import gateway.serve\n")
    _write(tmp_path, "provisioning/commands/policy.py", "from gateway.policy import explain\n")
    _write(tmp_path, "provisioning/agent/device.py", "from . import keys\nimport schemas.api\n")
    _write(tmp_path, "provisioning/http/server.py", "from provisioning import console\n")
    _write(tmp_path, "schemas/api.py", "from schemas.events import AuthEvent\n")
    assert violations(tmp_path) == []
