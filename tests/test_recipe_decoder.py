"""A decoder LLM classifier (Qwen2-shaped, tiny) as a tensor-parallel teacher for a BERT student with its own
tokenizer: recipes/distill_glue.py on two gloo ranks with logit KD + AD² and with a pooled-state match (PKD) through
a learned projection."""

import json
from pathlib import Path

import pytest

from ad2_ds.testing import launch

from conftest import decoder_tokenizer, recipe_rank_loads, save_tiny_teacher, tiny_decoder, write_glue_fixture

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def decoder_dirs(tmp_path_factory):
    from conftest import SPECIAL, WORDS

    tmp = tmp_path_factory.mktemp("decoder")
    vocab = tmp / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + WORDS + [chr(ord("a") + i) for i in range(26)]) + "\n")
    data = write_glue_fixture(tmp / "glue")
    # hidden 48 (student: 32) so the pooled-state match needs a projection; no pad token: the eos pads
    teacher = tiny_decoder("Qwen2", seed=3, pad_token_id=None, num_labels=2, hidden_size=48)
    teacher.save_pretrained(tmp / "teacher")
    decoder_tokenizer(padding_side="left").save_pretrained(tmp / "teacher")
    student = save_tiny_teacher(tmp / "student", vocab, layers=2)
    cfg = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    cfg["train_micro_batch_size_per_gpu"] = 4
    cfg["gradient_accumulation_steps"] = 1
    cfg["csv_monitor"] = {"enabled": True, "output_path": str(tmp / "monitor"), "job_name": "run"}
    ds = tmp / "ds.json"
    ds.write_text(json.dumps(cfg))
    return tmp, data, tmp / "teacher", student, ds


@pytest.mark.parametrize("method", ["ad2-dkd", "pkd"])
def test_decoder_teacher_at_tp2_distils_into_a_bert_student(decoder_dirs, method):
    import torch

    tmp, data, teacher, student, ds = decoder_dirs
    out = tmp / method
    cfg = json.loads(ds.read_text())
    cfg["csv_monitor"]["job_name"] = method
    ds = tmp / f"ds_{method}.json"
    ds.write_text(json.dumps(cfg))
    argv = ["--deepspeed", str(ds), "--task", "sst2", "--data_dir", str(data), "--teacher", str(teacher), "--student",
            str(student), "--max_seq_length", "16", "--output_dir", str(out), "--no_progress", "--num_train_epochs",
            "1", "--method", method, "--teacher_tp_size", "2", "--epsilon", "1e-2", "--step_size", "1e-2"]  # fmt: skip
    ranks = launch(recipe_rank_loads, 2, args=(argv,), timeout_s=400)
    assert [rc for rc, _ in ranks] == [0, 0]
    for _, loaded in ranks:  # the student and the best student scored on test are loaded whole; the teacher never
        assert str(student) in loaded and str(teacher) not in loaded
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["history"]
    assert results["teacher_load"] == "shards"  # DeepSpeedTeacher.from_pretrained: each rank read its own shards
    assert "accuracy" in results["teacher_scores"]
    terms = {p.name for p in (tmp / "monitor" / method).iterdir()}  # DeepSpeed's monitor gets every loss term
    ckpt = out / "checkpoints"
    state = torch.load(ckpt / (ckpt / "latest").read_text().strip() / "mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)["module"]  # fmt: skip
    if method == "ad2-dkd":
        assert {"train_kd.csv", "train_ada.csv"} <= terms  # clean KD and AD²'s adversarial KD
    else:
        assert "train_pkd.csv" in terms  # student [CLS] <-> the teacher's last real token, through a projection
        assert state["projections.1.weight"].shape == (48, 32)
