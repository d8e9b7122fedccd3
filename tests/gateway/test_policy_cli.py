"""``devicegate policy check|explain`` and the policy file's validation, through the CLI.

Real files in tmp_path; ``explain`` is compared with `gateway.policy`'s decision itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway.policy import Action, PolicyError, compile_for, load_policy
from provisioning.commands.cli import app

POLICY = """\
# the plant's policy
[default]
publish = ["devices/{device_id}/#"]

[fleets.lab]
publish = ["labs/{device_id}/#", "shared/+/in"]
subscribe = ["labs/{device_id}/#", "fleets/{fleet}/+", "$SYS/broker/clients/+"]
client_ids = ["{device_id}-*"]
"""


@dataclass(frozen=True)
class Who:
    device_id: str
    fleet: str


def devicegate(*args: str, code: int) -> tuple[str, str]:
    """The real command in its own process: (stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVICEGATE_")}
    done = subprocess.run(
        [sys.executable, "-m", "provisioning.commands.cli", *args],
        capture_output=True,
        text=True,
        env={**env, "COLUMNS": "60"},  # narrow: a problem must still be one line
        timeout=60,
        check=False,
    )
    assert done.returncode == code, (args, done.stdout, done.stderr)
    return done.stdout, done.stderr


def test_a_typo_placeholder_is_refused_with_file_line_and_names(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY.replace('"labs/{device_id}/#", "shared', '"labs/{devce_id}/#", "shared'))
    _, err = devicegate("policy", "check", str(path), code=1)
    assert err.splitlines() == [
        f"{path}:6: fleets.lab.publish[0]: unknown placeholder {{devce_id}}; "
        "the placeholders are {device_id} and {fleet}"
    ]
    with pytest.raises(PolicyError):  # the gateway refuses it the same way at start
        load_policy(path)


def test_a_misspelt_key_is_refused_with_file_line_and_names(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text(
        json.dumps(
            {"fleets": {"lab": {"publish": ["labs/{device_id}/#"], "subscibe": []}}, "defualt": {}},
            indent=2,
        )
    )
    _, err = devicegate("policy", "check", str(path), code=1)
    assert err.splitlines() == [
        f"{path}:7: fleets.lab: unknown key 'subscibe'; the keys are publish, subscribe, "
        "client_ids, drop_denied_publish_v3",
        f"{path}:10: unknown key 'defualt'; the keys are default, fleets",
    ]
    assert "pydantic" not in err and "http" not in err


def test_a_bad_filter_and_bad_syntax_name_their_line(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('\n[fleets.lab]\npublish = ["labs/#/x"]\n')
    _, err = devicegate("policy", "check", str(path), code=1)
    assert err.startswith(f"{path}:3: fleets.lab.publish[0]: '#' must be alone")
    path.write_text("[fleets.lab]\npublish = \n")
    _, err = devicegate("policy", "check", str(path), code=1)
    assert err.startswith(f"{path}:2: not valid TOML")


def test_a_valid_policy_passes(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    out, err = devicegate("policy", "check", str(path), code=0)
    assert out == f"{path}: valid (fleets: lab; others use default)\n"
    assert err == ""


CASES = [
    (Action.PUBLISH, "labs/d1/temp"),
    (Action.PUBLISH, "labs/d1"),
    (Action.PUBLISH, "labs/d2/temp"),
    (Action.PUBLISH, "shared/x/in"),
    (Action.PUBLISH, "shared/x/y/in"),
    (Action.PUBLISH, "devices/d1/x"),
    (Action.PUBLISH, "$SYS/broker/clients/connected"),
    (Action.PUBLISH, "labs/+/temp"),
    (Action.SUBSCRIBE, "labs/d1/#"),
    (Action.SUBSCRIBE, "labs/d1/+/x"),
    (Action.SUBSCRIBE, "labs/+/x"),
    (Action.SUBSCRIBE, "fleets/lab/+"),
    (Action.SUBSCRIBE, "fleets/lab/#"),
    (Action.SUBSCRIBE, "fleets/other/x"),
    (Action.SUBSCRIBE, "#"),
    (Action.SUBSCRIBE, "+/#"),
    (Action.SUBSCRIBE, "$SYS/#"),
    (Action.SUBSCRIBE, "$SYS/broker/clients/+"),
    (Action.SUBSCRIBE, "$SYS/broker/clients/connected"),
    (Action.SUBSCRIBE, "$share/g/labs/d1/#"),
    (Action.SUBSCRIBE, "$share/g/#"),
    (Action.SUBSCRIBE, "labs/d1/#/x"),
]


@pytest.mark.parametrize("fleet", ["lab", "plant"])
def test_explain_decides_as_the_gateway_does(tmp_path: Path, fleet: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    policy = compile_for(load_policy(path), Who("d1", fleet))
    runner = CliRunner()
    for action, topic in CASES:
        args = ["policy", "explain", "--policy", str(path), "--device", "d1", "--fleet", fleet]
        result = runner.invoke(app, [*args, f"--{action.value}", topic], env={"COLUMNS": "250"})
        decision = policy.decide(action, topic)
        allowed = decision.allowed
        assert result.exit_code == (0 if allowed else 1), (action, topic, result.output)
        first, statement, why, source = result.output.splitlines()
        verdict = "allowed" if allowed else "denied"
        assert first == f"{verdict}: device 'd1' (fleet {fleet!r}) {action.value} {topic!r}"
        assert statement == f"statement: {decision.statement} (policy version 0)"
        section = "fleets.lab" if fleet == "lab" else "default"
        assert decision.statement == (f"{section}/{action.value}" if allowed else "default-deny")
        assert source == f"policy: {path}"
        assert ("of Allow statement" in why) is allowed, why


def test_explain_names_the_template(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    args = ("policy", "explain", "--policy", str(path), "--device", "d1", "--fleet", "lab")
    out, _ = devicegate(*args, "--subscribe", "$share/g/labs/d1/+", code=0)
    assert out.splitlines()[1:3] == [
        "statement: fleets.lab/subscribe (policy version 0)",
        "why: '$share/g/labs/d1/+' is contained in 'labs/d1/#' ('labs/{device_id}/#') "
        "of Allow statement 'fleets.lab/subscribe'",
    ]
    out, _ = devicegate(*args, "--subscribe", "$SYS/#", code=1)
    assert out.splitlines()[1:3] == [
        "statement: default-deny (policy version 0)",
        "why: no Allow statement covers subscribe '$SYS/#' (deny by default)",
    ]


def test_explain_without_a_policy_file_uses_the_built_in_default() -> None:
    args = ("policy", "explain", "--device", "d1", "--fleet", "plant", "--publish")
    out, _ = devicegate(*args, "devices/d1/up", code=0)
    assert "policy: the built-in default policy" in out
    assert "statement: default/publish (policy version 0)" in out


def test_the_fleet_rule_is_said_in_plain_words() -> None:
    args = ("--device", "d1", "--fleet", "Line A/1", "--publish", "x")
    _, err = devicegate("policy", "explain", *args, code=2)
    want = (
        "error: --fleet: must be lower-case letters, digits and '-', starting with a letter "
        "or digit, at most 63 characters (got 'Line A/1')"
    )
    assert " ".join(err.split()) == want
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVICEGATE_")}
    env["DEVICEGATE_DATABASE_URL"] = "postgresql://nobody@127.0.0.1:1/none"  # not reached
    result = CliRunner().invoke(app, ["token", "create", "--fleet", "Line A/1"], env=env)
    assert result.exit_code == 2
    assert "must be lower-case letters, digits and '-'" in " ".join(result.output.split())
    assert "{0,62}" not in result.output and "pattern" not in result.output
