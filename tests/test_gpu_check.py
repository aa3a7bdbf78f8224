"""benchmarks/gpu_check.py --cpu_smoke: the GPU check's whole code path (DeepSpeedTeacher, ZeRO-2 engines per method,
cached and live teacher, plain loop, memory, JSON) on CPU with tiny models, in a subprocess like the real run."""

import json
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("kd", "ad2-dkd-k1-fast", "ad2-dkd-k1-naive", "ad2-k1-fast")
MEMORY_KEYS = {"static", "step_peak", "teacher_side", "alone_estimate", "build_peak", "build_reserved"}
UNITS = {"kd": 3, "ad2-dkd-k1-fast": 7, "ad2-dkd-k1-naive": 8, "ad2-k1-fast": 7}  # as step_cost counts them


def run_check(out_dir, *flags):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=REPO)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OUT"):
        env.pop(key, None)  # a one-rank job of its own
    return subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--cpu_smoke", "--out_dir", str(out_dir), *flags],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_gpu_check_cpu_smoke(tmp_path):
    proc = run_check(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ratio_to_kd" in proc.stdout.splitlines()[-1]
    result = json.loads((tmp_path / "gpu_check.json").read_text())

    assert result["mode"] == "cpu_smoke" and result["complete"] and not result["skipped_phases"]
    assert result["errors"] == {}
    assert result["teacher"]["class"] == "DeepSpeedTeacher" and result["teacher"]["tp_size"] == 1
    assert result["teacher"]["weights_mib"] > 0
    for key in ("torch", "deepspeed", "transformers", "python", "nvidia_smi", "deepspeed_file"):
        assert key in result["environment"]
    assert result["setup"]["memory_backend"] == "rss"
    assert set(result["memory_mib"]) == {"max_allocated", "max_reserved"}
    assert set(result["phases"]) == {"bf16", "fp32"}
    steps = result["setup"]["rounds"] * result["setup"]["steps"]

    for precision, phase in result["phases"].items():
        rows = {r["name"]: r for r in phase["results"]}
        expected = {f"{m}/{t}/engine" for m in METHODS for t in ("cached", "live")}
        expected |= {"kd/cached/plain", "ad2-dkd-k1-fast/cached/plain"}
        assert set(rows) == expected
        for name, r in rows.items():
            assert r["precision"] == precision
            assert len(r["times_ms"]) == steps
            assert all(math.isfinite(t) and t > 0 for t in r["times_ms"]), name
            assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0
            assert r["samples_per_s"] > 0
            assert r["ratio_to_kd"] > 0 and r["per_round_ratio_min"] <= r["per_round_ratio_max"]
            assert r["passes"]["units"] == UNITS[r["method"]], (name, r["passes"])
            mem = r["memory_mib"]
            assert set(mem) == MEMORY_KEYS
            for key in ("static", "step_peak", "teacher_side", "alone_estimate"):
                assert isinstance(mem[key], float), (name, key, mem)
            if r["teacher"] == "live":
                assert mem["teacher_side"] == result["teacher"]["weights_mib"]
            if r["method"] == "kd":
                assert r["ratio_to_kd"] == 1.0 and r["delta_applied"] is None
            else:
                assert r["config"]["epsilon"] == 1e-2 and r["config"]["step_size"] == 1e-2
                assert 0 < r["delta_applied"] <= 1, (name, r["delta_applied"])
                if precision == "fp32":
                    assert r["delta_applied"] > 0.99  # nothing rounds away in fp32
        assert rows["ad2-k1-fast/cached/engine"]["config"]["w_hidden"] == 1.0
        assert rows["ad2-dkd-k1-naive/cached/engine"]["config"]["fast_pga"] is False
        assert {v["method"] for v in phase["engine_vs_plain"]} == {"kd", "ad2-dkd-k1-fast"}
        assert all(v["engine_over_plain"] > 0 for v in phase["engine_vs_plain"])
        ds = phase["ds_config"]
        assert "optimizer" not in ds and "scheduler" not in ds and ds["zero_allow_untested_optimizer"]
        assert ds["zero_optimization"]["stage"] == 2 and ds["train_micro_batch_size_per_gpu"] == 4
        for m in METHODS:
            state = phase["engines"][m]
            assert state["zero_stage"] == 2 and state["bf16"] == (precision == "bf16") and not state["fp16"]
            assert state["skipped_steps"] == 0 and state["global_steps"] >= steps
        assert phase["cached_outputs_mib"]["deep"] > phase["cached_outputs_mib"]["logits_only"]
        assert set(phase["memory_mib"]) == {"max_allocated", "max_reserved"}

    checks = result["teacher_checks"]  # issue 14: the sharded loader and a decoder teacher, in the same call
    assert "errors" not in checks and checks["decoder_params_m"] > 0
    for name in ("bert_from_pretrained", "decoder"):
        row = checks[name]
        assert row["tp_size"] == 1 and row["sharded_load"] is False  # one rank: the whole-model path
        assert row["finite_logits"] and row["forward_ms"] > 0 and row["load_s"] > 0 and row["weights_mib"] > 0
    assert checks["bert_from_pretrained"]["max_abs_diff_vs_usual_build"] == 0.0  # same weights, same dtype cast


def test_gpu_check_keeps_the_phases_that_ran_when_one_fails(tmp_path):
    # fp16 is GPU-only: its phase fails on CPU at the DeepSpeed JSON check; fp32 still runs and is written
    proc = run_check(tmp_path, "--precisions", "fp16,fp32", "--methods", "kd", "--rounds", "1", "--no_plain")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert not result["complete"] and set(result["errors"]) == {"fp16"}
    assert "fp16, which this machine's CPU cannot run" in result["errors"]["fp16"]
    assert [r["name"] for r in result["phases"]["fp32"]["results"]] == ["kd/cached/engine", "kd/live/engine"]


def test_gpu_check_phases_run_as_processes_of_their_own_add_to_one_json(tmp_path):
    # as benchmarks/gpu_check.sh runs them: one process per phase, by name, each adding its part to gpu_check.json
    proc = run_check(tmp_path, "--phases", "steps", "--precisions", "fp32", "--methods", "kd", "--rounds", "1",
                     "--no_plain")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(first["phases_run"]) == ["steps"] and not first["complete"]  # teacher_checks has not run yet
    assert "teacher_checks" not in first and not list(tmp_path.glob("teacher-*"))  # nothing saved for it
    proc = run_check(tmp_path, "--phases", "teacher_checks")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(result["phases_run"]) == ["steps", "teacher_checks"] and result["complete"]
    assert result["phases"] == first["phases"]  # the first process's figures, kept
    assert result["teacher_checks"]["bert_from_pretrained"]["max_abs_diff_vs_usual_build"] == 0.0
    assert result["wall_s"] > first["wall_s"] and not list(tmp_path.glob("teacher-*"))  # its weights removed after
    assert run_check(tmp_path, "--phases", "steps,nope").returncode == 2  # an unknown phase: a usage error
