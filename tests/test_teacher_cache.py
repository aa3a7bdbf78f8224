"""The on-disk teacher cache equals the live teacher (fp16/bf16 tolerance), refuses stale caches and missing ids."""

import json

import numpy as np
import pytest
import torch

from ad2_ds import dist
from ad2_ds.teachers.cache import CachedTeacher, build_teacher_cache, fingerprint
from ad2_ds.teachers.local import LocalTeacher
from ad2_ds.testing import launch

from conftest import random_batch, tiny_bert

MAX_LEN = 12


def _batches(n_examples=10, batch_size=4, first_id=0, seed=0):
    """Dynamic padding (a different length per batch) and a ragged last batch; idx are example ids."""
    out = []
    for b, start in enumerate(range(0, n_examples, batch_size)):
        size = min(batch_size, n_examples - start)
        batch = random_batch(batch_size=size, seq_len=(8, 6, 12, 10)[b % 4], seed=seed + b)
        batch["idx"] = torch.arange(first_id + start, first_id + start + size)
        out.append(batch)
    return out


def _fp(model):
    return {"teacher": fingerprint(model), "vocab": "tiny", "data": "random-10", "max_length": MAX_LEN}


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_cached_outputs_equal_live_outputs(tmp_path, capsys, dtype, tol):
    model = tiny_bert(num_labels=3)
    teacher = LocalTeacher(model, output_hidden_states=True)
    batches = _batches()
    build_teacher_cache(teacher, batches, tmp_path, _fp(model), hidden_layers=[0, 2], dtype=dtype, num_examples=10)
    printed = capsys.readouterr().out
    assert f"{10 * MAX_LEN * 32 * 2 * 2} bytes = N 10 x T {MAX_LEN} x H 32 x layers 2 x 2" in printed
    cached = CachedTeacher(tmp_path, _fp(model), require_hidden_layers=[2])
    assert len(cached) == 10 and cached.num_labels == 3
    # look up in another order and grouping than the build, with a sequence length the build never saw
    for order in (torch.tensor([9, 0, 5]), torch.tensor([8, 9])):
        batch = random_batch(batch_size=len(order), seq_len=7)
        batch["idx"] = order
        out = cached(batch)
        assert out.hidden_states[1] is None and len(out.hidden_states) == 3
        for row, i in enumerate(order.tolist()):
            src = batches[i // 4]
            live = teacher({k: v[i % 4 : i % 4 + 1] for k, v in src.items()})
            torch.testing.assert_close(out.logits[row], live.logits[0], atol=1e-6, rtol=0)  # logits stay fp32
            T = src["input_ids"].shape[1]
            for layer in (0, 2):
                h = out.hidden_states[layer][row]
                assert h.shape == (7, 32) and h.dtype == torch.float32
                n = min(7, T)
                torch.testing.assert_close(h[:n], live.hidden_states[layer][0, :n], atol=tol * 4, rtol=tol)
                assert (h[n:] == 0).all()  # positions past the example's batch length are zero


def test_cached_teacher_pads_past_the_stored_length(tmp_path):
    model = tiny_bert()
    build_teacher_cache(
        LocalTeacher(model, output_hidden_states=True),
        _batches(),
        tmp_path,
        _fp(model),
        hidden_layers=[1],
        num_examples=10,
    )
    batch = random_batch(batch_size=2, seq_len=MAX_LEN + 3)
    h = CachedTeacher(tmp_path, _fp(model))(batch).hidden_states[1]
    assert h.shape == (2, MAX_LEN + 3, 32) and (h[:, MAX_LEN:] == 0).all()


def test_stale_fingerprint_and_missing_ids_are_refused(tmp_path):
    model = tiny_bert()
    build_teacher_cache(LocalTeacher(model), _batches(), tmp_path, _fp(model), num_examples=10)
    other = dict(_fp(model), teacher=fingerprint(tiny_bert(seed=1)))
    with pytest.raises(ValueError, match=r"stale cache.*\['teacher'\]"):
        CachedTeacher(tmp_path, other)
    with pytest.raises(ValueError, match="stale cache"):
        CachedTeacher(tmp_path, fingerprint(other))
    with pytest.raises(ValueError, match=r"hidden layers \[1\]"):
        CachedTeacher(tmp_path, _fp(model), require_hidden_layers=[1])
    cached = CachedTeacher(tmp_path, fingerprint(_fp(model)))
    batch = random_batch(batch_size=2)
    batch["idx"] = torch.tensor([3, 42])
    with pytest.raises(KeyError, match=r"\[42\]"):
        cached(batch)


def test_a_build_without_meta_is_not_a_cache_and_rebuild_replaces_stale(tmp_path):
    model = tiny_bert()
    build_teacher_cache(LocalTeacher(model), _batches(), tmp_path, _fp(model), num_examples=10)
    (tmp_path / "meta.json").unlink()  # as if the build died before its last write
    with pytest.raises(FileNotFoundError, match="no complete cache"):
        CachedTeacher(tmp_path, _fp(model))
    new = tiny_bert(seed=1)
    build_teacher_cache(LocalTeacher(new), _batches(), tmp_path, _fp(new), num_examples=10)
    out = CachedTeacher(tmp_path, _fp(new))(_batches()[0])
    torch.testing.assert_close(out.logits, LocalTeacher(new)(_batches()[0]).logits)
    assert not list(tmp_path.glob("*.tmp-*"))


def test_fingerprint_is_stable_and_sensitive():
    a, b = tiny_bert(), tiny_bert()
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint({"x": 1, "y": [a]}) == fingerprint({"y": [b], "x": 1})
    with torch.no_grad():
        b.classifier.bias[0] += 1e-6
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint(torch.ones(2, dtype=torch.bfloat16)) != fingerprint(torch.ones(2))


def _build_sharded(rank, world_size, cache_dir):
    dist.init_distributed()
    model = tiny_bert(num_labels=3)
    # rank 0: ids 0..9, rank 1: ids 10..16 (fewer, ragged last batch) plus id 9 again (a padded sampler repeats ids)
    batches = _batches(10, first_id=0, seed=0) if rank == 0 else _batches(7, first_id=10, seed=100)
    if rank == 1:
        extra = random_batch(batch_size=1, seq_len=5, seed=7)
        extra["idx"] = torch.tensor([9])
        batches.append(extra)
    build_teacher_cache(
        LocalTeacher(model, output_hidden_states=True),
        batches,
        cache_dir,
        _fp(model),
        hidden_layers=[2],
        num_examples=16,
    )
    return None


def test_sharded_build_on_two_ranks(tmp_path):
    launch(_build_sharded, world_size=2, args=(str(tmp_path),), timeout_s=120)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["shard_rows"] == [10, 8] and meta["num_examples"] == 17
    index = np.load(tmp_path / "index.npy")
    assert index[9].tolist() == [9, 0, 9]  # the first occurrence wins
    model = tiny_bert(num_labels=3)
    teacher = LocalTeacher(model, output_hidden_states=True)
    cached = CachedTeacher(tmp_path, _fp(model))
    src = _batches(7, first_id=10, seed=100)[-1]  # ids 14..16, written by rank 1
    out, live = cached(src), teacher(src)
    torch.testing.assert_close(out.logits, live.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.hidden_states[2], live.hidden_states[2], atol=8e-3, rtol=2e-3)
