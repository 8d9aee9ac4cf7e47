import json
import subprocess
import sys

from qlm_opt.planner.synthetic import random_instance


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "qlm_opt.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_plan_snapshot_json(tmp_path):
    snap = tmp_path / "s.json"
    snap.write_text(random_instance(20, 4, seed=3).to_json())
    r = _cli("plan", "--snapshot", str(snap), "--preset", "fast", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["valid"] is True
    assert out["status"] in ("OPTIMAL", "FEASIBLE", "FALLBACK")
    placed = [g for i in out["instances"] for g in i["groups"]]
    assert sorted(placed) == sorted(f"g{k}" for k in range(20))


def test_plan_zero_time_limit_falls_back(tmp_path):
    snap = tmp_path / "s.json"
    snap.write_text(random_instance(10, 3, seed=1).to_json())
    r = _cli("plan", "--snapshot", str(snap), "--time-limit", "0", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"] == "FALLBACK"


def test_plan_bad_snapshot(tmp_path):
    snap = tmp_path / "bad.json"
    snap.write_text('{"groups": 5}')
    r = _cli("plan", "--snapshot", str(snap))
    assert r.returncode == 2
    assert r.stderr.strip().startswith("qlm-opt: error:") and "bad.json" in r.stderr
    snap.write_text(random_instance(3, 2, seed=1).to_json())
    r = _cli("plan", "--snapshot", str(snap), "--preset", "nope")
    assert r.returncode == 2 and "nope" in r.stderr
