"""benchmarks/step_cost.py on tiny inputs: the rows of the cheaper ascents count their passes (6 units against kd's 3
and today's ad2's 7), ascent free gets its δ store, and the ZeRO-3 phase records the kl ascent's naive path and
clean_grad's refusal."""

import math
from types import SimpleNamespace

import torch

import step_cost  # benchmarks/ is on pytest's pythonpath
from conftest import random_batch, tiny_bert

ROWS = ("kd", "ad2-dkd-k1-fast", "ad2-clean-grad", "ad2-free")


def test_plain_rows_count_the_passes_of_each_ascent(tmp_path):
    out = tmp_path / "step_cost.json"
    argv = ["--threads", "1", "--batch_size", "2", "--seq_len", "8", "--rounds", "1", "--steps", "1",
            "--warmup", "0", "--methods", ",".join(ROWS[1:]), "--json_out", str(out)]  # fmt: skip
    result = step_cost.main(argv)
    rows = {r["method"]: r for r in result["results"]}
    assert list(rows) == list(ROWS)  # kd first: every ratio is to it
    assert {m: rows[m]["passes"]["units"] for m in ROWS} == {
        "kd": 3, "ad2-dkd-k1-fast": 7, "ad2-clean-grad": 6, "ad2-free": 6,
    }  # fmt: skip
    assert all(rows[m]["passes"]["backward_input_only"] == 0 for m in ("ad2-clean-grad", "ad2-free"))
    assert all(math.isfinite(r["ratio_to_kd"]) and r["ratio_to_kd"] > 0 for r in rows.values())
    assert out.is_file()


def test_zero3_phase_counts_the_naive_kl_path_and_records_the_refusal(one_rank, monkeypatch):
    monkeypatch.setattr(step_cost, "init_single_rank_deepspeed", lambda: None)  # the fixture's rank is up already
    args = SimpleNamespace(batch_size=4, ds_rounds=1, rounds=1, steps=1, warmup=0)
    student = tiny_bert().train()
    teacher_out = step_cost.TeacherOutput(torch.randn(4, 2, generator=torch.Generator().manual_seed(1)) * 3)
    rows = step_cost.zero3_phase(args, student, student.config, random_batch(), teacher_out, list(ROWS))
    by = {r["method"]: r for r in rows}
    assert {m: by[m]["passes"]["units"] for m in ("kd", "ad2-dkd-k1-fast", "ad2-free")} == {
        "kd": 3, "ad2-dkd-k1-fast": 8, "ad2-free": 6,
    }  # fmt: skip
    assert by["kd"]["zero3_over_kd"] == 1.0 and by["ad2-free"]["zero3_over_kd"] > 0
    assert "ZeRO-3" in by["ad2-clean-grad"]["refused"] and "passes" not in by["ad2-clean-grad"]
