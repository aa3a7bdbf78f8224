"""benchmarks/ad2_selection.py: the selection arithmetic (no runs)."""

import os

import ad2_selection  # benchmarks/ is on pytest's pythonpath
import pytest


def test_summary_differences_and_medians_in_points():
    scores = {
        "kd": {"a": 0.80, "b": 0.90, "c": 0.70},
        "eps0": {"a": 0.81, "b": 0.90, "c": 0.70},
        "x": {"a": 0.83, "b": 0.89, "c": 0.72},
    }
    s = ad2_selection.summarise(scores)
    assert s["x"]["minus_kd"] == {"a": 3.0, "b": -1.0, "c": 2.0}
    assert s["x"]["median_minus_kd"] == 2.0
    assert s["x"]["median_minus_eps0"] == 2.0  # 2, -1, 2
    assert s["kd"]["median_minus_kd"] == 0.0


@pytest.mark.parametrize("setting", list(ad2_selection.SETTINGS))
def test_every_setting_is_a_valid_run(setting, tmp_path):
    from recipes import distill_glue

    ds = os.path.join(ad2_selection.ROOT, "ds_configs", "zero2.json")
    flags = ["--deepspeed", ds, "--output_dir", str(tmp_path)]
    cfg = distill_glue.parse_args(flags + ad2_selection.SETTINGS[setting]).objective  # the RunConfig checks itself
    assert cfg.adversarial == (setting != "kd") and not cfg.deep_kd  # one logits-only teacher cache per task
    assert cfg.zero_delta == (setting == "eps0") and cfg.random_direction == setting.endswith("-random")
