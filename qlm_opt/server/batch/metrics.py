"""Prometheus metrics of the Batch API, registered in the app's own registry.

- ``qlm_batch_jobs{status}``: jobs by status (read from the store about once a second);
- ``qlm_batch_lines_total{outcome}``: lines whose result was committed, ``completed`` (output
  file) or ``failed`` (error file, validation errors and expired/cancelled lines included);
- ``qlm_batch_lines_in_flight``: lines admitted into the global queue and not yet ended;
- ``qlm_batch_completion_window_fraction``: time from creation to completion over the window
  length, per completed job (below 1.0: inside the window).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from qlm_opt.server.batch.store import STATUSES

_FRACTION_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 0.9, 1.0)


class BatchMetrics:
    """Counters fed by the batch runner; see the module docstring."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.lines = Counter("qlm_batch_lines", "Batch lines with a committed result",
                             ["outcome"], registry=registry)
        self.window_fraction = Histogram(
            "qlm_batch_completion_window_fraction",
            "Creation to completion of a batch job, as a fraction of its completion window",
            buckets=_FRACTION_BUCKETS, registry=registry)
        self.jobs_by_status: dict[str, int] = {}
        self.lines_in_flight = 0
        registry.register(_Collector(self))


class _Collector:
    def __init__(self, m: BatchMetrics) -> None:
        self.m = m

    def describe(self):
        return []

    def collect(self):
        jobs = GaugeMetricFamily("qlm_batch_jobs", "Batch jobs by status", labels=["status"])
        for s in STATUSES:
            jobs.add_metric([s], self.m.jobs_by_status.get(s, 0))
        yield jobs
        fl = GaugeMetricFamily("qlm_batch_lines_in_flight",
                               "Batch lines admitted into the global queue and not yet ended")
        fl.add_metric([], self.m.lines_in_flight)
        yield fl
