"""Loading solver presets; every error names the file and the field."""

from __future__ import annotations

import pytest

from qlm_opt.errors import ConfigError
from qlm_opt.planner.presets import PRESET_NAMES, load_preset, preset_dir

GOOD = """
time_limit_s = 0.1
num_workers = 2
max_groups = 256
horizon_s = 3600
deadline_levels = 12
candidates_per_group = 4
[objective]
on_time = 1000
swap_penalty = 50
completion_penalty = 1
"""


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_shipped_presets_load(name):
    p = load_preset(name)
    assert p.name == name and p.num_workers <= 2 and p.time_limit_s > 0


def test_load_by_path(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text(GOOD)
    p = load_preset(f)
    assert p.name == "mine" and p.weights.swap_penalty == 50 and p.formulation == "auto"


@pytest.mark.parametrize(
    "text, field",
    [
        (GOOD.replace("num_workers = 2\n", ""), "num_workers"),
        (GOOD.replace("time_limit_s = 0.1", "time_limit_s = -1"), "time_limit_s"),
        (GOOD.replace("max_groups = 256", "max_groups = 'many'"), "max_groups"),
        ('formulation = "magic"\n' + GOOD, "formulation"),
        (GOOD.replace("swap_penalty = 50", "swap_penalty = -5"), "objective.swap_penalty"),
        ("surprise = 1\n" + GOOD, "surprise"),
    ],
)
def test_errors_name_file_and_field(tmp_path, text, field):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_preset(f)
    msg = str(exc.value)
    assert str(f) in msg and f"'{field}'" in msg


def test_not_toml(tmp_path):
    f = tmp_path / "broken.toml"
    f.write_text("time_limit_s = = 1")
    with pytest.raises(ConfigError, match="broken.toml: not valid TOML"):
        load_preset(f)


def test_unknown_name():
    with pytest.raises(ConfigError, match="no such solver preset"):
        load_preset("does-not-exist")
    assert preset_dir().name == "solver"
