"""Prometheus text exposition (format 0.0.4) without ``prometheus_client``.

`PrometheusReader` is a pull OTel `MetricReader` (collect on scrape) and
`render_prometheus` writes the text; `prometheus_names` says under which sample names a
`MetricSpec` appears, which the dashboards and alert rules use.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any, Final

from opentelemetry.sdk.metrics.export import Gauge, Metric, MetricReader, MetricsData, Sum
from opentelemetry.sdk.metrics.export import Histogram as HistogramData

from schemas.metrics import MetricSpec

__all__ = ["CONTENT_TYPE", "PrometheusReader", "prometheus_names", "render_prometheus"]

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

_INVALID_NAME = re.compile(r"[^a-zA-Z0-9_:]")
_INVALID_LABEL = re.compile(r"[^a-zA-Z0-9_]")
_UNIT_SUFFIX: Final = {"s": "seconds", "ms": "milliseconds", "By": "bytes"}


def _base_name(name: str, unit: str) -> str:
    """``devicegate.upstream.dial.duration``, ``s`` -> ``..._upstream_dial_duration_seconds``."""
    base = _INVALID_NAME.sub("_", name)
    if base[:1].isdigit():
        base = "_" + base
    suffix = _UNIT_SUFFIX.get(unit)
    if suffix and not base.endswith("_" + suffix):
        base = f"{base}_{suffix}"
    return base


def prometheus_names(spec: MetricSpec) -> tuple[str, ...]:
    """The sample names ``spec`` appears under on ``/metrics`` (what PromQL may use)."""
    base = _base_name(spec.name, spec.unit)
    if spec.kind in ("counter", "observable_counter"):
        return (f"{base}_total",)
    if spec.kind == "histogram":
        return (f"{base}_bucket", f"{base}_sum", f"{base}_count")
    return (base,)


def _label_value(value: object) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (list, tuple)):
        text = json.dumps(list(value))
    else:
        text = str(value)
    return text.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _labels(pairs: Iterable[tuple[str, object]]) -> str:
    parts = [f'{_INVALID_LABEL.sub("_", key)}="{_label_value(value)}"' for key, value in pairs]
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def render_prometheus(
    data: MetricsData | None, const_labels: Mapping[str, str] | None = None
) -> str:
    """Prometheus text format 0.0.4 for collected OTel metrics.

    Monotonic sums become ``counter`` families named ``<name>_total``; other sums and gauges
    become ``gauge``; explicit-bucket histograms become ``histogram`` with cumulative
    ``_bucket{le=...}``, ``_sum`` and ``_count``. Dots (and anything else Prometheus does not
    allow) become underscores, and the unit is appended (``_seconds``, ``_bytes``).
    ``const_labels`` (e.g. ``worker``) come first on every sample. Only cumulative data is
    rendered (the reader asks for cumulative temporality).
    """
    const = list((const_labels or {}).items())
    families: dict[str, list[str]] = {}
    for resource_metrics in data.resource_metrics if data is not None else ():
        for scope in resource_metrics.scope_metrics:
            for metric in scope.metrics:
                lines = _family(metric, const)
                if lines is None:
                    continue
                name, body = lines
                if name in families:
                    families[name].extend(body[2:])  # same family from another scope
                else:
                    families[name] = body
    return "".join(line + "\n" for body in families.values() for line in body)


def _family(metric: Metric, const: list[tuple[str, str]]) -> tuple[str, list[str]] | None:
    base = _base_name(metric.name, metric.unit or "")
    data = metric.data
    if isinstance(data, Sum) and data.is_monotonic:
        name, kind = f"{base}_total", "counter"
    elif isinstance(data, (Sum, Gauge)):
        name, kind = base, "gauge"
    elif isinstance(data, HistogramData):
        name, kind = base, "histogram"
    else:  # exponential histograms are not used here
        return None
    lines = [f"# HELP {name} {_help(metric.description or '')}", f"# TYPE {name} {kind}"]

    def order(point: Any) -> list[tuple[str, str]]:
        return sorted((k, str(v)) for k, v in (point.attributes or {}).items())

    if isinstance(data, HistogramData):
        for hpoint in sorted(data.data_points, key=order):
            pairs = const + sorted((hpoint.attributes or {}).items())
            running = 0
            bounds = [*hpoint.explicit_bounds, math.inf]
            for bound, count in zip(bounds, hpoint.bucket_counts, strict=True):
                running += count
                labels = _labels([*pairs, ("le", _number(float(bound)))])
                lines.append(f"{base}_bucket{labels} {running}")
            lines.append(f"{base}_sum{_labels(pairs)} {_number(hpoint.sum)}")
            lines.append(f"{base}_count{_labels(pairs)} {hpoint.count}")
    else:
        for npoint in sorted(data.data_points, key=order):
            pairs = const + sorted((npoint.attributes or {}).items())
            lines.append(f"{name}{_labels(pairs)} {_number(npoint.value)}")
    return name, lines


class PrometheusReader(MetricReader):
    """A pull reader: each `render` collects (running observable callbacks) and renders.

    Args:
        const_labels: labels added to every sample (the gateway adds ``worker``).
    """

    def __init__(self, *, const_labels: Mapping[str, str] | None = None) -> None:
        super().__init__()  # cumulative temporality for every kind: the SDK default
        self._const = dict(const_labels or {})
        self._lock = threading.Lock()
        self._latest: MetricsData | None = None

    def _receive_metrics(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> None:
        self._latest = metrics_data

    def render(self) -> str:
        """Collect now and return the text exposition."""
        with self._lock:
            self._latest = None
            self.collect()
            return render_prometheus(self._latest, self._const)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._latest = None
