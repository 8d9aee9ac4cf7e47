"""Prometheus metrics of one app, in a registry of its own (several apps in one process, as in
tests, never share series).

Observed on events (cheap): TTFT and E2E histograms per (class, model), request outcomes per
class. Read at scrape time by a collector (no cost on the request path): queue length per
class, SLO attainment per class, LSO counts from ``runtime.lso_counts``, per-instance engine
gauges, and the policy's ``report()`` (solver ms and status, anything numeric) when it has one.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from qlm_opt.domain import Request

if TYPE_CHECKING:
    from qlm_opt.server.gateway import Gateway

_LATENCY_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 3600.0
)


class ServerMetrics:
    """Counters fed by the gateway; see the module docstring."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.ttft = Histogram(
            "qlm_ttft_seconds", "Time to first token (scheduler clock)",
            ["slo_class", "model"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.e2e = Histogram(
            "qlm_e2e_seconds", "Arrival to last token (scheduler clock)",
            ["slo_class", "model"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self._ttft_children: dict[tuple[str, str], object] = {}
        self._e2e_children: dict[tuple[str, str], object] = {}
        # (class, outcome) -> count; outcome: finished, attained, dropped, cancelled,
        # rejected (queue full)
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.http_errors: Counter[int] = Counter()  # status -> count
        self.gateway: Gateway | None = None

    def bind(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.registry.register(_LiveCollector(self))

    # -- event hooks --------------------------------------------------------------------------
    def on_first_token(self, req: Request) -> None:
        key = (req.slo_class, req.model)
        h = self._ttft_children.get(key)
        if h is None:
            h = self._ttft_children[key] = self.ttft.labels(*key)
        h.observe(req.first_token_at - req.arrived_at)

    def on_finished(self, req: Request) -> None:
        key = (req.slo_class, req.model)
        h = self._e2e_children.get(key)
        if h is None:
            h = self._e2e_children[key] = self.e2e.labels(*key)
        h.observe(req.completed_at - req.arrived_at)
        self.outcomes[(req.slo_class, "finished")] += 1
        if req.attained():
            self.outcomes[(req.slo_class, "attained")] += 1

    def on_dropped(self, req: Request, cancelled: bool) -> None:
        self.outcomes[(req.slo_class, "cancelled" if cancelled else "dropped")] += 1

    def on_rejected(self, slo_class: str) -> None:
        self.outcomes[(slo_class, "rejected")] += 1

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LiveCollector:
    """Gauges read from the gateway, runtime and policy at scrape time."""

    def __init__(self, m: ServerMetrics) -> None:
        self.m = m

    def describe(self):
        return []

    def collect(self):
        m = self.m
        gw = m.gateway
        classes = list(gw.settings.classes)
        q = GaugeMetricFamily(
            "qlm_queue_length", "Admitted requests without a first token, per class",
            labels=["slo_class"],
        )
        for c in classes:
            q.add_metric([c], gw.queued_by_class.get(c, 0))
        yield q
        inflight = GaugeMetricFamily(
            "qlm_requests_in_flight", "Admitted requests not yet ended, per class",
            labels=["slo_class"],
        )
        for c in classes:
            inflight.add_metric([c], gw.inflight_by_class.get(c, 0))
        yield inflight
        out = CounterMetricFamily(
            "qlm_requests", "Requests by class and outcome (finished, attained, dropped, "
            "cancelled, rejected)", labels=["slo_class", "outcome"],
        )
        for (c, o), n in sorted(m.outcomes.items()):
            out.add_metric([c, o], n)
        yield out
        att = GaugeMetricFamily(
            "qlm_slo_attainment", "Attained / (finished + dropped + rejected), per class",
            labels=["slo_class"],
        )
        for c in classes:
            o = m.outcomes
            den = o[(c, "finished")] + o[(c, "dropped")] + o[(c, "rejected")]
            att.add_metric([c], o[(c, "attained")] / den if den else math.nan)
        yield att
        errs = CounterMetricFamily(
            "qlm_http_errors", "Error responses by status", labels=["status"]
        )
        for s, n in sorted(m.http_errors.items()):
            errs.add_metric([str(s)], n)
        yield errs
        backend = gw.backend
        rt = backend.runtime
        if rt is None:
            return
        lso = CounterMetricFamily("qlm_lso", "LSOs issued by kind", labels=["lso"])
        for k in ("pull", "evict", "rebalance", "swap", "drop"):
            lso.add_metric([k], rt.lso_counts.get(k, 0))
        for k, n in sorted(rt.lso_counts.items()):
            if k not in ("pull", "evict", "rebalance", "swap", "drop"):
                lso.add_metric([k], n)
        yield lso
        pq = GaugeMetricFamily("qlm_policy_queued", "Requests held by the policy, in no engine")
        pq.add_metric([], backend.policy.num_queued() if backend.policy else 0)
        yield pq
        running = GaugeMetricFamily(
            "qlm_instance_running", "Requests running per instance", labels=["instance", "model"]
        )
        waiting = GaugeMetricFamily(
            "qlm_instance_waiting", "Requests in the engine's own queue",
            labels=["instance", "model"],
        )
        kv = GaugeMetricFamily(
            "qlm_instance_kv_usage", "KV cache used / capacity", labels=["instance", "model"]
        )
        for inst in rt.instances:
            st = inst.engine.stats()
            lbl = [inst.spec.name, str(inst.model)]
            running.add_metric(lbl, st.num_running)
            waiting.add_metric(lbl, st.num_waiting)
            kv.add_metric(lbl, st.kv_used_tokens / st.kv_capacity_tokens
                          if st.kv_capacity_tokens else 0.0)
        yield running
        yield waiting
        yield kv
        yield from _policy_gauges(backend.policy)


def _policy_gauges(policy):
    """``qlm_solver_ms`` and ``qlm_solver_status`` always (NaN / "none" until a solver policy
    reports), plus ``qlm_policy_<key>`` for every other numeric item of ``policy.report()``."""
    rep = {}
    fn = getattr(policy, "report", None)
    if callable(fn):
        try:
            rep = fn() or {}
        except Exception:  # a scrape must not fail because a policy's report did
            rep = {}
    ms = GaugeMetricFamily("qlm_solver_ms", "Last solve time of the planner, ms")
    v = rep.get("solver_ms", rep.get("solve_ms"))
    ms.add_metric([], float(v) if isinstance(v, int | float) else math.nan)
    yield ms
    status = GaugeMetricFamily(
        "qlm_solver_status", "Last solver status (1 for the current one)", labels=["status"]
    )
    s = rep.get("solver_status", rep.get("status"))
    status.add_metric([str(s) if s is not None else "none"], 1)
    yield status
    for k, v in sorted(rep.items()):
        if k in ("solver_ms", "solve_ms", "solver_status", "status"):
            continue
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        name = "qlm_policy_" + "".join(ch if ch.isalnum() else "_" for ch in k)
        g = GaugeMetricFamily(name, f"policy.report()['{k}']")
        g.add_metric([], float(v))
        yield g
