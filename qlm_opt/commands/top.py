"""``qlm-opt top``: a live terminal view of a running ``qlm-opt serve``.

Every ``--interval`` seconds it reads the server's Prometheus ``/metrics`` and
``/admin/fleet`` (with the admin key) and shows, with rich:

- per SLO class: queued, in flight, finished, rejected and dropped requests, SLO attainment,
  TTFT p50/p99 (from the histogram), and the RWT estimator's mean predicted against mean
  observed wait;
- per instance: GPU, model, state (READY, DRAINING, SWAPPING, DOWN), running and waiting
  requests, KV use, swaps and restarts;
- the planner: epochs, the last epoch's time, status, fallback cause and plan size, and the
  LSO counts; request and token rates are differences between two reads.

``--once`` prints one view and exits (scripts, tests). Errors (server unreachable, wrong admin
key) end it with a one-line message and exit status 2.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command()(top)


class TopError(Exception):
    """The server could not be read (a one-line reason)."""


# -- reading -------------------------------------------------------------------------------------
@dataclass(slots=True)
class Snapshot:
    """One read of the server: samples of ``/metrics`` and the ``/admin/fleet`` document."""

    at_s: float  # time.monotonic() of the read
    samples: dict[tuple[str, tuple], float]
    fleet: dict
    histograms: dict[tuple[str, tuple], list[tuple[float, float]]] = field(default_factory=dict)

    def value(self, name: str, **labels) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def by_label(self, name: str, label: str) -> dict[str, float]:
        """``{label value: sample}`` of every sample of ``name``."""
        out: dict[str, float] = {}
        for (n, lbls), v in self.samples.items():
            if n == name:
                d = dict(lbls)
                if label in d:
                    out[d[label]] = out.get(d[label], 0.0) + v
        return out

    def quantile(self, name: str, q: float, **match) -> float:
        """Quantile ``q`` of histogram ``name`` over the label sets that contain ``match``
        (buckets summed), interpolated within the bucket as Prometheus does; NaN when
        empty."""
        buckets: dict[float, float] = {}
        for (n, lbls), pts in self.histograms.items():
            d = dict(lbls)
            if n == name and all(d.get(k) == v for k, v in match.items()):
                for le, c in pts:
                    buckets[le] = buckets.get(le, 0.0) + c
        return _hist_quantile(sorted(buckets.items()), q)


def _hist_quantile(cum: list[tuple[float, float]], q: float) -> float:
    if not cum or cum[-1][1] <= 0:
        return math.nan
    total = cum[-1][1]
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in cum:
        if c >= rank:
            if math.isinf(le):
                return prev_le
            if c == prev_c:
                return le
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return prev_le


def parse_metrics(text: str) -> tuple[dict, dict]:
    """(samples, histograms) of a Prometheus text exposition: samples keyed by (name, sorted
    labels); histograms keyed by (family name, labels without ``le``) -> [(le, count)]."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[tuple[str, tuple], float] = {}
    hists: dict[tuple[str, tuple], list[tuple[float, float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.endswith("_bucket") and "le" in s.labels:
                lbls = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
                hists.setdefault((fam.name, lbls), []).append((float(s.labels["le"]), s.value))
            else:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    for pts in hists.values():
        pts.sort()
    return samples, hists


def read(client, admin_key: str | None) -> Snapshot:
    """One read of ``/metrics`` and ``/admin/fleet``. Raises TopError."""
    import httpx

    try:
        m = client.get("/metrics")
        headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
        f = client.get("/admin/fleet", headers=headers)
    except httpx.HTTPError as e:
        raise TopError(f"cannot reach {client.base_url}: {e}") from None
    if m.status_code != 200:
        raise TopError(f"GET /metrics answered {m.status_code}")
    if f.status_code == 401:
        raise TopError("GET /admin/fleet needs the admin key (--admin-key or $QLM_ADMIN_KEY)")
    if f.status_code != 200:
        raise TopError(f"GET /admin/fleet answered {f.status_code}")
    samples, hists = parse_metrics(m.text)
    return Snapshot(time.monotonic(), samples, f.json(), hists)


# -- rendering -----------------------------------------------------------------------------------
def _num(x: float, fmt: str = "{:.0f}") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _secs(x: float) -> str:
    if x is None or math.isnan(x):
        return "-"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


_STATE_STYLE = {"READY": "green", "DRAINING": "yellow", "SWAPPING": "cyan", "DOWN": "bold red"}


def render(snap: Snapshot, prev: Snapshot | None = None):
    """The view of ``snap`` as a rich renderable (rates from ``prev`` when given)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    fleet = snap.fleet
    dt = (snap.at_s - prev.at_s) if prev is not None else 0.0
    fin = snap.by_label("qlm_requests_total", "outcome").get("finished", 0.0)
    rate = "-"
    if prev is not None and dt > 0:
        pf = prev.by_label("qlm_requests_total", "outcome").get("finished", 0.0)
        rate = f"{(fin - pf) / dt:.1f} req/s"
    head = Text.assemble(
        ("qlm-opt top", "bold"), "  backend ", (str(fleet.get("backend")), "bold"),
        "  policy ", (str(fleet.get("policy")), "bold"),
        f"  outstanding {fleet.get('num_outstanding', 0)}  finished {fin:.0f}  ({rate})",
    )

    classes = Table(title="SLO classes", expand=True)
    for col in ("class", "queued", "in flight", "finished", "rejected", "dropped",
                "attainment", "TTFT p50", "TTFT p99", "wait pred", "wait obs"):
        classes.add_column(col, justify="left" if col == "class" else "right")
    for c in fleet.get("classes", {}):
        out = {dict(lbls).get("outcome"): v for (n, lbls), v in snap.samples.items()
               if n == "qlm_requests_total" and dict(lbls).get("slo_class") == c}
        att = snap.value("qlm_slo_attainment", slo_class=c)
        pc = snap.value("qlm_wait_predicted_seconds_count", slo_class=c)
        oc = snap.value("qlm_wait_observed_seconds_count", slo_class=c)
        pred = snap.value("qlm_wait_predicted_seconds_sum", slo_class=c) / pc if pc else math.nan
        obs = snap.value("qlm_wait_observed_seconds_sum", slo_class=c) / oc if oc else math.nan
        classes.add_row(
            c, _num(snap.value("qlm_queue_length", slo_class=c)),
            _num(snap.value("qlm_requests_in_flight", slo_class=c)),
            _num(out.get("finished", 0.0)), _num(out.get("rejected", 0.0)),
            _num(out.get("dropped", 0.0)), _num(att * 100, "{:.1f}%"),
            _secs(snap.quantile("qlm_ttft_seconds", 0.5, slo_class=c)),
            _secs(snap.quantile("qlm_ttft_seconds", 0.99, slo_class=c)),
            _secs(pred), _secs(obs),
        )

    insts = Table(title="Instances", expand=True)
    for col in ("instance", "gpu", "model", "state", "running", "waiting", "KV", "swaps",
                "restarts"):
        insts.add_column(col, justify="right" if col in ("running", "waiting", "KV", "swaps",
                                                           "restarts") else "left")
    for i in fleet.get("instances", []):
        st = i.get("stats") or {}
        cap = st.get("kv_capacity_tokens") or 0
        kv = (st.get("kv_used_tokens") or 0) / cap * 100 if cap else math.nan
        state = i.get("state", "?")
        if i.get("swap_to") and state != "READY":
            state_txt = Text(f"{state} -> {i['swap_to']}", style=_STATE_STYLE.get(state, ""))
        else:
            state_txt = Text(state, style=_STATE_STYLE.get(state, ""))
        health = i.get("health") or {}
        insts.add_row(str(i.get("name")), str(i.get("gpu")), str(i.get("model")), state_txt,
                      _num(st.get("num_running", 0)), _num(st.get("num_waiting", 0)),
                      _num(kv, "{:.0f}%"), str(i.get("num_swaps", 0)),
                      str(health.get("num_restarts", 0)))

    plan = Table(title="Planner", expand=True, show_header=False)
    plan.add_column("what")
    plan.add_column("value", justify="right")
    status = next((dict(l)["status"] for (n, l), v in snap.samples.items()
                   if n == "qlm_solver_status" and v == 1), "none")
    cause = next((dict(l)["cause"] for (n, l), v in snap.samples.items()
                  if n == "qlm_solver_fallback" and v == 1), "none")
    epochs = snap.value("qlm_policy_solver_num_epochs")
    plan.add_row("epochs", _num(epochs))
    plan.add_row("last epoch", f"{_num(snap.value('qlm_solver_ms'), '{:.1f}')} ms, {status}, "
                 f"fallback: {cause}, {_num(snap.value('qlm_plan_groups'))} groups")
    plan.add_row("epoch time p50 / p95",
                 f"{_secs(snap.quantile('qlm_solver_seconds', 0.5))} / "
                 f"{_secs(snap.quantile('qlm_solver_seconds', 0.95))}")
    lso = snap.by_label("qlm_lso_total", "lso")
    plan.add_row("LSOs", "  ".join(f"{k} {v:.0f}" for k, v in sorted(lso.items())) or "-")
    return Group(head, classes, insts, plan)


def run_top(url: str, admin_key: str | None, console, interval_s: float = 2.0,
            iterations: int | None = None, live: bool = True) -> int:
    """Read and show the server ``iterations`` times (forever when None). Returns the number
    of views shown. Raises TopError."""
    import httpx

    shown = 0
    prev = None
    with httpx.Client(base_url=url.rstrip("/"), timeout=max(5.0, interval_s)) as client:
        if not live:
            while iterations is None or shown < iterations:
                if shown:
                    time.sleep(interval_s)
                snap = read(client, admin_key)
                console.print(render(snap, prev))
                prev, shown = snap, shown + 1
            return shown
        from rich.live import Live

        snap = read(client, admin_key)
        with Live(render(snap), console=console, auto_refresh=False, screen=False) as view:
            shown = 1
            prev = snap
            while iterations is None or shown < iterations:
                time.sleep(interval_s)
                snap = read(client, admin_key)
                view.update(render(snap, prev), refresh=True)
                prev, shown = snap, shown + 1
    return shown


def top(
    url: Annotated[str, typer.Option(help="Base URL of a running qlm-opt serve.")] =
        "http://127.0.0.1:8000",
    admin_key: Annotated[
        str | None, typer.Option(help="Admin key for /admin/fleet (default: $QLM_ADMIN_KEY).")
    ] = None,
    interval: Annotated[float, typer.Option(help="Seconds between reads.", min=0.1)] = 2.0,
    once: Annotated[bool, typer.Option(help="Print one view and exit.")] = False,
) -> None:
    """Live terminal view of a running server: classes, instances, planner (reads /metrics
    and /admin/fleet)."""
    from rich.console import Console

    key = admin_key or os.environ.get("QLM_ADMIN_KEY")
    console = Console()
    try:
        run_top(url, key, console, interval, iterations=1 if once else None, live=not once)
    except TopError as e:
        typer.echo(f"qlm-opt: error: {e}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        pass
