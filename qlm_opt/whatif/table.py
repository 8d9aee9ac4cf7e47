"""The what-if comparison table (rich)."""

from __future__ import annotations

from rich.table import Table


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _s(x) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.0f}ms" if x < 1 else f"{x:.1f}s"


def render_table(report: dict) -> Table:
    pols = report["policies"]
    classes: list[str] = []
    for m in pols.values():
        for c in m["per_class"]:
            if c not in classes:
                classes.append(c)
    sim = report["sim"]
    t = Table(
        title=f"what-if: {sim['num_requests']} requests, workload {sim['workload']}, "
        f"fleet {sim['fleet']} ({sim['num_instances']} instances)"
    )
    bound = report.get("bound")
    t.add_column("policy")
    t.add_column("SLO att.", justify="right")
    if bound:
        t.add_column("gap to U", justify="right")
    for c in classes:
        t.add_column(c, justify="right")
    for col in ("TTFT p50", "TTFT p99", "E2E p50", "E2E p99", "tok/s", "GPU util",
                "swaps", "evict", "done", "dropped"):
        t.add_column(col, justify="right")
    has_rwt = any("rwt" in m for m in pols.values())
    if has_rwt:
        t.add_column("RWT MdAPE", justify="right")
        t.add_column("RWT cov90", justify="right")
    for name, m in pols.items():
        row = [name, _pct(m["slo_attainment"])]
        if bound:
            g = m.get("gap_to_bound")
            row.append("-" if g is None else f"{100 * g:.1f} pt")
        row += [_pct(m["per_class"].get(c, {}).get("slo_attainment")) for c in classes]
        row += [
            _s(m["ttft_s"]["p50"]), _s(m["ttft_s"]["p99"]),
            _s(m["e2e_s"]["p50"]), _s(m["e2e_s"]["p99"]),
            f"{m['throughput_tokens_per_s']:.0f}", _pct(m["gpu_utilization"]),
            str(m["num_swaps"]), str(m["num_evictions"]),
            str(m["num_completed"]), str(m["num_dropped"]),
        ]
        if has_rwt:
            r = m.get("rwt") or {}
            e = r.get("median_abs_pct_error")
            row += ["-" if e is None else f"{e:.1f}%", _pct(r.get("coverage_90"))]
        t.add_row(*row)
    if bound:
        # U: no policy can attain more (qlm_opt/whatif/bound.py); the other columns do not apply
        row = ["bound U", _pct(bound["slo_attainment"]), "-"]
        row += [_pct((bound["per_class"].get(c) or {}).get("slo_attainment")) for c in classes]
        row += ["-"] * (len(t.columns) - len(row))
        t.add_row(*row, end_section=False)
    return t
