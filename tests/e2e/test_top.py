"""``qlm-opt top`` against a live server, rendered on rich's recording console, and the CLI's
errors."""

from __future__ import annotations

import re

import httpx
import pytest
from rich.console import Console
from typer.testing import CliRunner

from qlm_opt.cli import app
from qlm_opt.commands.top import TopError, run_top
from tests.e2e.conftest import ADMIN_KEY, MODEL, auth


def _traffic(srv, n: int = 6) -> None:
    with httpx.Client(base_url=srv.url, headers=auth(), timeout=30) as c:
        for i in range(n):
            r = c.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 4},
                       headers={"x-slo-class": ("interactive", "batch")[i % 2]})
            assert r.status_code == 200


@pytest.mark.parametrize("live", [False, True])
def test_top_shows_the_fleet_and_the_classes(fast, live):
    _traffic(fast)
    fast.wait_until(lambda: not fast.gateway.jobs)
    console = Console(record=True, width=220, force_terminal=False)
    assert run_top(fast.url, ADMIN_KEY, console, interval_s=0.1, iterations=2, live=live) == 2
    text = console.export_text()
    fleet = httpx.get(fast.url + "/admin/fleet", headers=auth(ADMIN_KEY)).json()
    for inst in fleet["instances"]:
        row = next(line for line in text.splitlines() if f" {inst['name']} " in line)
        assert inst["model"] in row and inst["state"] in row and inst["gpu"] in row
    metrics = httpx.get(fast.url + "/metrics").text
    for cls in ("interactive", "batch"):
        m = re.search(rf'qlm_requests_total{{outcome="finished",slo_class="{cls}"}} (\d+)',
                      metrics)
        row = next(line for line in text.splitlines() if line.strip("│ ").startswith(cls))
        cells = [c.strip() for c in row.split("│") if c.strip()]
        assert cells[0] == cls and cells[3] == m.group(1)  # finished, as /metrics says
    assert "policy priority" in text and "Planner" in text


def test_top_errors(fast):
    with pytest.raises(TopError, match="admin key"):
        run_top(fast.url, "sk-wrong-admin-key", Console(record=True), live=False, iterations=1)
    r = CliRunner().invoke(app, ["top", "--url", "http://127.0.0.1:9", "--once"])
    assert r.exit_code == 2
    assert "cannot reach" in r.output
