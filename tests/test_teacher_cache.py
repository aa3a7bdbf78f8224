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
    # first batch: rows of 8, 6, 4 and 8 real tokens; 6.5 x 2 x 32 x 2 + id 8 + crc 4 + logits 12 + offset 8 = 864
    assert "about 864 bytes per example (first batch: 6.5 real tokens x 2 layers x H 32 x 2 B + logits)" in printed
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
            real = int(src["attention_mask"][i % 4].sum())
            for layer in (0, 2):
                h = out.hidden_states[layer][row]
                assert h.shape == (7, 32) and h.dtype == torch.float32
                n = min(7, real)
                torch.testing.assert_close(h[:n], live.hidden_states[layer][0, :n], atol=tol * 4, rtol=tol)
                assert (h[n:] == 0).all()  # only real tokens are stored: past them, zeros


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
    mask = src["attention_mask"].bool()  # real tokens only; the fp32 teacher's states are stored in fp32: exact
    assert torch.equal(out.hidden_states[2][mask], live.hidden_states[2][mask])
    assert (out.hidden_states[2][~mask] == 0).all()


def _build(tmp_path, model, **kw):
    teacher = LocalTeacher(model, output_hidden_states=True)
    return build_teacher_cache(teacher, _batches(), tmp_path, _fp(model), num_examples=10, **kw)


def test_cache_stores_only_real_tokens_in_the_teachers_precision(tmp_path):
    model = tiny_bert(num_labels=3)
    _build(tmp_path / "deep", model, hidden_layers=[0, 2])  # dtype None: the fp32 teacher's own precision
    _build(tmp_path / "logits", model)
    meta = json.loads((tmp_path / "deep" / "meta.json").read_text())
    assert meta["dtype"] == "float32"
    real = sum(int(b["attention_mask"].sum()) for b in _batches())
    padded = sum(b["input_ids"].numel() for b in _batches())
    assert real < padded  # the fixture pads, so storing padding would show
    assert (tmp_path / "deep" / "shard-00000.hidden.bin").stat().st_size == real * 2 * 32 * 4  # tokens x L x H x 4
    assert meta["bytes_per_example"] == pytest.approx((10 * (8 + 4 + 12 + 8) + 8 + real * 2 * 32 * 4) / 10)
    logits_only = json.loads((tmp_path / "logits" / "meta.json").read_text())
    assert logits_only["bytes_per_example"] == 8 + 4 + 3 * 4  # id, crc32, 3 fp32 logits
    cached = CachedTeacher(tmp_path / "deep", _fp(model))
    teacher = LocalTeacher(model, output_hidden_states=True)
    for batch in _batches():
        out, live = cached(batch), teacher(batch)
        mask = batch["attention_mask"].bool()
        for layer in (0, 2):
            assert torch.equal(out.hidden_states[layer][mask], live.hidden_states[layer][mask])  # fp32: exact
            assert (out.hidden_states[layer][~mask] == 0).all()


def test_a_truncated_shard_is_refused_then_rebuilt(tmp_path, capsys):
    model = tiny_bert(num_labels=3)
    _build(tmp_path, model, hidden_layers=[2], dtype=torch.bfloat16)
    hidden = tmp_path / "shard-00000.hidden.bin"
    size = hidden.stat().st_size
    with open(hidden, "r+b") as f:
        f.truncate(size - 64)
    with pytest.raises(ValueError, match=r"damaged cache .*shard-00000.hidden.bin has \d+ bytes, not the"):
        CachedTeacher(tmp_path, _fp(model))
    _build(tmp_path, model, hidden_layers=[2], dtype=torch.bfloat16)  # same fingerprint: rebuilt, not reused
    assert "rebuilding the cache" in capsys.readouterr().out and hidden.stat().st_size == size
    CachedTeacher(tmp_path, _fp(model))(_batches()[0])


def test_a_corrupted_row_is_refused_never_returned(tmp_path):
    model = tiny_bert(num_labels=3)
    _build(tmp_path, model, hidden_layers=[2], dtype=torch.float16)
    tokens = np.fromfile(tmp_path / "shard-00000.tokens.bin", np.int64)
    index = np.load(tmp_path / "index.npy")
    row_of_5 = int(index[index[:, 0] == 5][0, 2])
    with open(tmp_path / "shard-00000.hidden.bin", "r+b") as f:  # flip one byte inside example 5's hidden states
        f.seek(int(tokens[row_of_5]) * 32 * 2 + 7)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x40]))
    cached = CachedTeacher(tmp_path, _fp(model))  # same sizes: opens
    batch = random_batch(batch_size=2)
    batch["idx"] = torch.tensor([4, 6])
    cached(batch)  # other rows are fine
    batch["idx"] = torch.tensor([4, 5])
    with pytest.raises(ValueError, match=r"corrupted cache .* fails its crc32 check"):
        cached(batch)


def test_building_a_cache_leaves_the_random_state_as_it_was(tmp_path):
    """The first run of a sweep builds the cache, the others read it: the build must not move torch's RNG (a
    DataLoader draws its base seed from it when it starts), or the first run's dropout masks differ from the rest."""
    model = tiny_bert(num_labels=3)
    loader = torch.utils.data.DataLoader(_batches(), batch_size=None)
    torch.manual_seed(0)
    build_teacher_cache(LocalTeacher(model), loader, tmp_path, _fp(model), num_examples=10)
    after_build = torch.rand(4)
    torch.manual_seed(0)
    CachedTeacher(tmp_path, _fp(model))(_batches()[0])
    assert torch.equal(torch.rand(4), after_build)


class _SlowTeacher(LocalTeacher):
    def __call__(self, batch):
        import time

        time.sleep(0.2)
        return super().__call__(batch)


def _build_alone(cache_dir, start_together):
    """One job (no process group) building the cache: (did it build, did it wait for another job). Both jobs pass
    ``start_together`` first, so that one process's slower start cannot let it arrive after the other has finished."""
    import contextlib
    import io

    model = tiny_bert(num_labels=3)
    printed = io.StringIO()
    start_together.wait(timeout=120)
    with contextlib.redirect_stdout(printed):
        build_teacher_cache(_SlowTeacher(model), _batches(), cache_dir, _fp(model), num_examples=10)
    out = printed.getvalue()
    return "bytes per example" in out, "waiting for it" in out


def test_two_jobs_building_one_cache_take_turns_and_the_second_reuses_it(tmp_path):
    """Two runs of a sweep started together on one --teacher_cache: one builds it while the other waits, then reads
    it (before, both wrote the same shard files at once)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    spawn = multiprocessing.get_context("spawn")
    with spawn.Manager() as manager, ProcessPoolExecutor(2, mp_context=spawn) as pool:
        start_together = manager.Barrier(2)
        jobs = [pool.submit(_build_alone, str(tmp_path), start_together) for _ in range(2)]
        results = sorted(job.result(timeout=120) for job in jobs)
    assert results == [(False, True), (True, False)]  # one built; the other waited and built nothing
    model = tiny_bert(num_labels=3)
    batch = _batches()[1]
    torch.testing.assert_close(CachedTeacher(tmp_path, _fp(model))(batch).logits, LocalTeacher(model)(batch).logits)
