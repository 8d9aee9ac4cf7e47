import subprocess
import sys

from qlm_opt.planner import load_preset


def test_tune_writes_a_loadable_best_preset(tmp_path):
    out = tmp_path / "tuned.toml"
    r = subprocess.run(
        [sys.executable, "-m", "qlm_opt.cli", "tune", "--presets", "fast", "--swap-penalty",
         "10,500", "--duration", "30", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "fast swap=10" in r.stdout and "fast swap=500" in r.stdout
    p = load_preset(out)
    assert p.weights.swap_penalty in (10, 500)
    assert p.time_limit_s == load_preset("fast").time_limit_s
    assert out.read_text().startswith("# Written by `qlm-opt tune`")


def test_tune_bad_input(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "qlm_opt.cli", "tune", "--swap-penalty", "x", "--out",
         str(tmp_path / "t.toml")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--swap-penalty" in r.stderr
