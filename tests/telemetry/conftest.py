"""In-memory readers and exporters over the real SDK setup."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from schemas.telemetry import setup_telemetry


class Harness:
    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.spans = InMemorySpanExporter()
        self.telemetry = setup_telemetry(
            service_name="test", instance_id="test/w0", prometheus=True, otlp=False,
            readers=[self.reader], record_spans=True,
        )  # fmt: skip
        self.telemetry.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))

    def points(self, name: str) -> dict[tuple[tuple[str, Any], ...], Any]:
        """Attributes -> value (sum/gauge) or (count, sum) (histogram) of one metric."""
        data = self.reader.get_metrics_data()
        found: dict[tuple[tuple[str, Any], ...], Any] = {}
        for rm in data.resource_metrics if data is not None else ():
            for scope in rm.scope_metrics:
                for metric in scope.metrics:
                    if metric.name != name:
                        continue
                    points: list[Any] = list(metric.data.data_points)
                    for point in points:
                        key = tuple(sorted((point.attributes or {}).items()))
                        value = getattr(point, "value", None)
                        found[key] = value if value is not None else (point.count, point.sum)
        return found


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.telemetry.shutdown()
