"""PNG plots of a what-if report (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def plot_report(report: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: list[Path] = []
    series = report.get("series", {})
    if not series:
        return files

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, s in series.items():
        att = s["attainment"]
        xs = [x for x, y in zip(att["bin_start_s"], att["overall"]) if y is not None]
        ys = [100 * y for y in att["overall"] if y is not None]
        ax.plot(xs, ys, label=name, linewidth=1.5)
    bound = report.get("bound")
    if bound and bound.get("slo_attainment") is not None:
        # U bounds the whole run's attainment (not each bin's): drawn for scale
        ax.axhline(100 * bound["slo_attainment"], color="black", linestyle="--", linewidth=1.2,
                   label=f"bound U (whole run) {100 * bound['slo_attainment']:.1f}%")
    ax.set_xlabel("arrival time (s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(-2, 102)
    files.append(_save(plt, fig, ax, "SLO attainment over time", out_dir / "attainment.png"))

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, s in series.items():
        q = s["queue"]
        ax.plot(q["at_s"], q["queued"], label=name, linewidth=1.2)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("queued requests (not yet running)")
    files.append(_save(plt, fig, ax, "Queue length", out_dir / "queue.png"))
    return files


def _save(plt, fig, ax, title: str, path: Path) -> Path:
    """Title, grid and legend, then write the PNG and free the figure."""
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
