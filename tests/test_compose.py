"""AD2 on top of --augment_copies: δ on the originals and on the edited copies, the teacher (live or its cache)
labelling both; and MixKD's mixup on the same data."""

import json
from pathlib import Path

import pytest
import torch

from ad2_ds.objective import AD2Objective
from ad2_ds.perturb import per_example_norm

from conftest import tiny_bert, write_ds_config, write_glue_fixture, write_tiny_wordnet

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN, COPIES, EPSILON = 40, 2, 1e-3  # the fixture's 40 sentences, ids 0..39: copy k of id i has id i + 40 k


@pytest.fixture
def world(tmp_path, tiny_vocab):
    data = write_glue_fixture(tmp_path / "glue", n_train=N_TRAIN)
    from transformers import BertTokenizer

    teacher = tmp_path / "teacher"  # wide random weights: its logits move with the words, so copies are told apart
    tiny_bert(seed=1, layers=2, initializer_range=0.5).save_pretrained(teacher)
    BertTokenizer(vocab=str(tiny_vocab)).save_pretrained(teacher)
    ds = write_ds_config(tmp_path / "ds.json", train_micro_batch_size_per_gpu=8)
    return data, teacher, ds, write_tiny_wordnet(tmp_path / "wordnet")


def _argv(world, out, *extra):
    data, teacher, ds, wordnet = world
    return ["--deepspeed", str(ds), "--task", "sst2", "--data_dir", str(data), "--teacher", str(teacher),
            "--student_layers", "bottom:1", "--max_seq_length", "16", "--output_dir", str(out), "--no_progress",
            "--num_train_epochs", "1", "--method", "ad2", "--epsilon", str(EPSILON), "--augment_copies", str(COPIES),
            "--augment_alpha", "0.5", "--wordnet_dir", str(wordnet), *extra]  # fmt: skip


@pytest.fixture
def recorded(monkeypatch):
    """Every training forward of the objective: the batch's ids, the teacher logits it got, its loss terms, and the
    per-example norms of its δ."""
    calls, forward = [], AD2Objective.forward

    def spy(self, batch, teacher_output=None):
        out = forward(self, batch, teacher_output)
        norms = per_example_norm(self.last_delta).tolist() if "ada" in out else None
        calls.append(dict(idx=batch["idx"].tolist(), logits_t=teacher_output.logits.detach().cpu().clone(),
                          terms=set(out), delta_norms=norms))  # fmt: skip
        self.last_delta = None
        return out

    monkeypatch.setattr(AD2Objective, "forward", spy)
    return calls


def _teacher_logits_on_the_edited_text(world):
    """The teacher's logits, example by example, on the training text as the run reads it (originals and copies)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ad2_ds.run import DataConfig, load_data

    data, teacher_dir, _, wordnet = world
    _, splits = load_data(DataConfig(task="sst2", data_dir=str(data), augment_copies=COPIES, augment_alpha=0.5,
                                     wordnet_dir=str(wordnet)), rank_zero_first=False)  # fmt: skip
    train = splits["train"]
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    with torch.no_grad():
        logits = {i: teacher(**tok(t, truncation=True, max_length=16, return_tensors="pt")).logits[0]
                  for i, t in zip(train["idx"], train["text_a"])}  # fmt: skip
    return logits, dict(zip(train["idx"], train["text_a"]))


def test_ad2_on_the_edited_copies_with_a_teacher_cache_built_then_reused(world, tmp_path, recorded, no_dist_left):
    from recipes import distill_glue

    cache = tmp_path / "cache"
    assert distill_glue.main(_argv(world, tmp_path / "a", "--teacher_cache", str(cache))) == 0
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    assert a["train_examples"] == (COPIES + 1) * N_TRAIN
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["num_examples"] == (COPIES + 1) * N_TRAIN  # the copies are cached too, each under its own id
    expected, text = _teacher_logits_on_the_edited_text(world)
    edited = [i for i in range(N_TRAIN, (COPIES + 1) * N_TRAIN) if text[i] != text[i % N_TRAIN]]
    assert len(edited) > N_TRAIN  # most copies differ from their original: the test below can tell them apart
    seen = {}
    for call in recorded:
        assert {"ce", "kd", "ada"} <= call["terms"]
        for row, i in enumerate(call["idx"]):
            seen[i] = call["logits_t"][row]
            # δ was computed for this row, copies included: one L2 ball of radius ε per sentence, reached
            assert call["delta_norms"][row] == pytest.approx(EPSILON, rel=1e-4)
    assert sorted(seen) == list(range((COPIES + 1) * N_TRAIN))  # one epoch: every original and every copy
    for i, logits in seen.items():  # the cache served the teacher's logits on the edited text
        assert torch.allclose(logits, expected[i], atol=1e-5), (i, text[i])
    assert any(not torch.allclose(expected[i], expected[i % N_TRAIN], atol=1e-4) for i in edited)

    stamp, first = (cache / "meta.json").stat().st_mtime_ns, list(recorded)
    recorded.clear()
    assert distill_glue.main(_argv(world, tmp_path / "b", "--teacher_cache", str(cache))) == 0
    assert (cache / "meta.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert b["history"] == a["history"]
    assert [c["idx"] for c in recorded] == [c["idx"] for c in first]
    assert all(torch.equal(x["logits_t"], y["logits_t"]) for x, y in zip(recorded, first))

    recorded.clear()  # the live teacher gives the same targets as its cache
    assert distill_glue.main(_argv(world, tmp_path / "live")) == 0
    assert all(torch.allclose(x["logits_t"], y["logits_t"], atol=1e-5) for x, y in zip(recorded, first))


def test_mixup_composes_with_ad2_and_the_edited_copies(world, tmp_path, recorded, no_dist_left):
    from recipes import distill_glue

    assert distill_glue.main(_argv(world, tmp_path / "mix", "--mixup_alpha", "0.4")) == 0
    results = json.loads((tmp_path / "mix" / "results.json").read_text())
    assert results["train_examples"] == (COPIES + 1) * N_TRAIN
    assert results["config"]["mixup_alpha"] == 0.4 and results["args"]["mixup_weight"] == 1.0
    assert all({"ce", "kd", "ada", "mix"} <= c["terms"] for c in recorded)
    assert any(i >= N_TRAIN for c in recorded for i in c["idx"])


def test_ad2_with_copies_and_mixup_resumes_after_a_kill_to_the_same_weights(world, tmp_path):
    """The pairs and λ come from torch's CPU generator, which the checkpoint saves: killed and resumed, the run draws
    the same mixes and ends on the same weights, bit for bit."""
    from test_recipe import _final_weights, _run

    extra = ["--mixup_alpha", "0.4", "--eval_steps", "2"]
    full = _run(_argv(world, tmp_path / "full", *extra))
    assert full.returncode == 0, full.stderr[-2000:]
    hit = _run(_argv(world, tmp_path / "run", *extra), "kill@7")
    assert hit.returncode == -9 and not (tmp_path / "run" / "results.json").exists()
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "global_step6"
    resumed = _run(_argv(world, tmp_path / "run", *extra, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    (tag_a, a), (tag_b, b) = _final_weights(tmp_path / "full"), _final_weights(tmp_path / "run")
    assert tag_a == tag_b == "global_step15"  # 120 examples, micro-batches of 8
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    history = json.loads((tmp_path / "full" / "results.json").read_text())["history"]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["history"] == history
