"""deploy/observability and docs/observability.md against the metric contract."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from schemas.metrics import METRICS
from schemas.prometheus import prometheus_names

ROOT = Path(__file__).resolve().parents[2]
OBSERVABILITY = ROOT / "deploy" / "observability"
DASHBOARD = OBSERVABILITY / "grafana-dashboard.json"
ALERTS = OBSERVABILITY / "alerts.yaml"
ALERT_TESTS = OBSERVABILITY / "alerts.test.yaml"
DOCS = ROOT / "docs" / "observability.md"

METRIC = re.compile(r"\bdevicegate_[a-z0-9_]+")
KNOWN = {name for spec in METRICS for name in prometheus_names(spec)}


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_dashboard_queries_use_only_contract_metrics() -> None:
    exprs = _dashboard_exprs()
    assert exprs
    for expr in exprs:
        used = set(METRIC.findall(expr))
        assert used, expr
        assert used <= KNOWN, f"unknown metric in {expr!r}: {used - KNOWN}"


def test_dashboard_covers_every_metric() -> None:
    used = {name for expr in _dashboard_exprs() for name in METRIC.findall(expr)}
    for spec in METRICS:
        assert used & set(prometheus_names(spec)), f"no panel for {spec.name}"


def test_dashboard_has_a_prometheus_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"


def test_alert_rules_use_only_contract_metrics() -> None:
    yaml: Any = pytest.importorskip("yaml")
    rules = [
        rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]
    ]
    assert {rule["alert"] for rule in rules} == {
        "DevicegateHandshakeFailureSpike",
        "DevicegateEventSpoolGrowing",
        "DevicegateAuthEventsLost",
        "DevicegateDatabaseBehindSpool",
        "DevicegateRevocationStateStale",
        "DevicegateCertificatesExpiring",
    }
    for rule in rules:
        used = set(METRIC.findall(rule["expr"]))
        assert used and used <= KNOWN, rule["alert"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_and_unit_tests_the_rules() -> None:
    check = subprocess.run(
        ["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(
        ["promtool", "test", "rules", ALERT_TESTS.name],
        capture_output=True, text=True, timeout=30, cwd=OBSERVABILITY,
    )  # fmt: skip
    assert unit.returncode == 0, unit.stdout + unit.stderr


def test_docs_list_every_metric() -> None:
    text = DOCS.read_text()
    for spec in METRICS:
        assert f"`{spec.name}`" in text, spec.name
        assert prometheus_names(spec)[0].removesuffix("_bucket") in text, spec.name
