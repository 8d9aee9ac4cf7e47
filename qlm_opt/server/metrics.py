"""Prometheus metrics of one app, in a registry of its own (several apps in one process, as in
tests, never share series).

Observed on events (cheap): TTFT and E2E histograms per (class, model), request outcomes per
class, and the RWT estimator's predicted wait against the observed one (placement to first
token) per class. Read at scrape time by a collector (no cost on the request path): queue
length per class, SLO attainment per class, LSO counts from ``runtime.lso_counts``,
per-instance engine gauges (model, state, up, swaps, restarts), the last planning epoch (solve
ms, status, fallback cause, plan size; each new epoch's solve time into a histogram) and every
number of the policy's ``report()``, nested sections included
(``qlm_policy_<section>_<key>``; a map of counts becomes one family with a ``key`` label).
"""

from __future__ import annotations

import math
from collections import Counter
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from qlm_opt.core.queue import SchedInfo
from qlm_opt.domain import Request

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
        # the gateway whose queues, backend and policy the collector reads at scrape time
        # (``bind``); not imported here, so that the gateway can depend on this module
        self.gateway = None
        # The RWT estimator's prediction of a request's wait (placement to first token)
        # against the wait observed, per class: how far the planner can trust it.
        self.wait_predicted = Histogram(
            "qlm_wait_predicted_seconds", "Predicted wait from placement to first token",
            ["slo_class"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.wait_observed = Histogram(
            "qlm_wait_observed_seconds", "Observed wait from placement to first token (of "
            "requests with a prediction)", ["slo_class"], buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.wait_abs_error = Histogram(
            "qlm_wait_abs_error_seconds", "|observed - predicted| wait",
            ["slo_class"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self._wait_children: dict[str, tuple] = {}
        # planning epochs already observed into qlm_solver_seconds (index into solve_ms)
        self.solver_seconds = Histogram(
            "qlm_solver_seconds", "Planning epoch time (model build + solve), per epoch",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=self.registry,
        )
        self._epochs_seen = 0

    def bind(self, gateway) -> None:
        self.gateway = gateway
        self.registry.register(_LiveCollector(self))

    # -- event hooks --------------------------------------------------------------------------
    def on_first_token(self, req: Request) -> None:
        key = (req.slo_class, req.model)
        h = self._ttft_children.get(key)
        if h is None:
            h = self._ttft_children[key] = self.ttft.labels(*key)
        h.observe(req.first_token_at - req.arrived_at)
        info = req._sched
        if isinstance(info, SchedInfo):  # a policy with a global queue predicted its wait
            pred = info.pred_mean_s
            placed = info.placed_at
            if pred is not None and placed is not None:
                ch = self._wait_children.get(req.slo_class)
                if ch is None:
                    c = req.slo_class
                    ch = self._wait_children[c] = (self.wait_predicted.labels(c),
                                                   self.wait_observed.labels(c),
                                                   self.wait_abs_error.labels(c))
                obs = max(0.0, req.first_token_at - placed)
                ch[0].observe(max(0.0, pred))
                ch[1].observe(obs)
                ch[2].observe(abs(obs - pred))

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
        self._observe_epochs()
        return generate_latest(self.registry)

    def _observe_epochs(self) -> None:
        """Planning epochs since the last scrape into ``qlm_solver_seconds`` (from the
        policy's ``solve_ms`` list, ms per epoch), before the histogram is written out."""
        gw = self.gateway
        policy = gw.backend.policy if gw is not None else None
        hist = policy.solve_ms if policy is not None else ()
        if len(hist) > self._epochs_seen:
            for v in hist[self._epochs_seen:]:
                self.solver_seconds.observe(float(v) / 1000.0)
            self._epochs_seen = len(hist)


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
        info = GaugeMetricFamily(
            "qlm_instance_info", "1 per instance: the model it holds and its state (READY, "
            "DRAINING, SWAPPING, DOWN)", labels=["instance", "model", "state", "swap_to"],
        )
        up = GaugeMetricFamily("qlm_instance_up", "1 when the instance takes work (READY "
                               "with a model), 0 when draining, swapping or down",
                               labels=["instance"])
        swaps = CounterMetricFamily("qlm_instance_swaps", "Model swaps started per instance",
                                    labels=["instance"])
        downs = CounterMetricFamily("qlm_instance_down", "Times the instance's engine was "
                                    "found dead", labels=["instance"])
        restarts = CounterMetricFamily("qlm_instance_restarts", "Restarts after failures that "
                                       "brought the engine back", labels=["instance"])
        for inst in rt.instances:
            st = inst.engine.stats()
            name = inst.spec.name
            lbl = [name, str(inst.model)]
            running.add_metric(lbl, st.num_running)
            waiting.add_metric(lbl, st.num_waiting)
            kv.add_metric(lbl, st.kv_used_tokens / st.kv_capacity_tokens
                          if st.kv_capacity_tokens else 0.0)
            info.add_metric([name, str(inst.model), inst.state.name, str(inst.swap_to or "")],
                            1)
            up.add_metric([name], 1 if inst.ready else 0)
            swaps.add_metric([name], inst.num_swaps)
            downs.add_metric([name], inst.engine.num_downs)
            restarts.add_metric([name], inst.engine.num_restarts)
        yield running
        yield waiting
        yield kv
        yield info
        yield up
        yield swaps
        yield downs
        yield restarts
        yield from _epoch_gauges(backend.policy)
        yield from _policy_gauges(backend.policy)


def _metric_name(k: object) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in str(k))


def _number(v) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, int | float):
        return float(v)
    return None


def _epoch_gauges(policy):
    """The last planning epoch, read from the policy's ``last_plan`` (a ``Plan``): solve time,
    status, fallback cause and plan size (``ServerMetrics.render`` puts every epoch's time into
    ``qlm_solver_seconds``)."""
    plan = policy.last_plan if policy is not None else None
    ms = GaugeMetricFamily("qlm_solver_ms", "Last planning epoch: model build + solve, ms")
    status = GaugeMetricFamily(
        "qlm_solver_status", "Last planning epoch's solver status (1 for the current one)",
        labels=["status"],
    )
    cause = GaugeMetricFamily(
        "qlm_solver_fallback", "Last planning epoch: why its plan is not the solver's (1 for "
        "the current cause; 'none' when the solver's plan was used)", labels=["cause"],
    )
    size = GaugeMetricFamily("qlm_plan_groups", "Groups placed by the last plan")
    if plan is None:
        ms.add_metric([], math.nan)
        status.add_metric(["none"], 1)
        cause.add_metric(["none"], 1)
        size.add_metric([], 0)
    else:
        ms.add_metric([], float(plan.solve_ms) + float(plan.build_ms))
        status.add_metric([str(plan.status)], 1)
        cause.add_metric([str(plan.fallback_cause or "none")], 1)
        size.add_metric([], sum(len(ip.group_ids) for ip in plan.instances))
    yield ms
    yield status
    yield cause
    yield size


def _policy_gauges(policy):
    """Every number of ``policy.report()``: ``qlm_policy_<key>`` at the top level,
    ``qlm_policy_<section>_<key>`` in a nested section (the ``qlm`` policy reports
    ``{"qlm": {...}, "solver": {...}}``), a map of numbers inside a section (status counts,
    fallback causes) as ``qlm_policy_<section>_<key>{key="..."}``, and a string as
    ``qlm_policy_<path>_info{value="..."} 1``. A failing report is skipped, never the scrape."""
    rep = {}
    if policy is not None:
        try:
            rep = policy.report() or {}
        except Exception:  # a scrape must not fail because a policy's report did
            rep = {}
    if not isinstance(rep, dict):
        return
    yield from _report_families("qlm_policy", rep, top=True)


def _report_families(prefix: str, d: dict, top: bool):
    for k, v in sorted(d.items(), key=lambda kv: str(kv[0])):
        name = f"{prefix}_{_metric_name(k)}"
        x = _number(v)
        if x is not None:
            g = GaugeMetricFamily(name, f"policy.report(): {name[len('qlm_policy_'):]}")
            g.add_metric([], x)
            yield g
        elif isinstance(v, str):
            g = GaugeMetricFamily(name + "_info", f"policy.report(): {k} = value",
                                  labels=["value"])
            g.add_metric([v], 1)
            yield g
        elif isinstance(v, dict):
            nums = {kk: _number(vv) for kk, vv in v.items()}
            if not top and all(x is not None for x in nums.values()):
                g = GaugeMetricFamily(name, f"policy.report(): {k} by key", labels=["key"])
                for kk, x in sorted(nums.items(), key=lambda kv: str(kv[0])):
                    g.add_metric([str(kk)], x)
                yield g
            else:
                yield from _report_families(name, v, top=False)
