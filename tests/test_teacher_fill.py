"""The sharded loader reads each rank's shards slice by slice into the storage it keeps (ad2_ds/teachers/fill.py):
no piece larger than the chunk, every element read once, no whole checkpoint file loaded, and the same teacher as
DeepSpeed's own loader."""

import pytest
import torch
from test_teacher_sharded import save_split

from ad2_ds import dist
from ad2_ds.teachers import fill
from ad2_ds.testing import launch

from conftest import random_batch, tiny_bert


def _write(tmp_path, **tensors):
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "t.safetensors"))
    return str(tmp_path / "t.safetensors")


@pytest.mark.parametrize("shard", [fill.Shard(), fill.Shard(0, 100, 150, 300), fill.Shard(1, 250, 500, 1000)])
def test_a_shard_is_read_in_pieces_no_larger_than_the_chunk_and_cast_in_place(tmp_path, shard, monkeypatch):
    from safetensors import safe_open

    full = torch.randn(300, 1000)
    path = _write(tmp_path, w=full)
    want = full if shard.dim is None else full.narrow(shard.dim, shard.start, shard.length)
    dst = torch.empty(want.shape, dtype=torch.bfloat16)
    pieces = []
    copy = fill.copy_chunk
    monkeypatch.setattr(fill, "copy_chunk", lambda d, s: (pieces.append(s.numel() * s.element_size()), copy(d, s)))
    with safe_open(path, framework="pt") as f:
        fill.read_into(dst, f.get_slice("w"), shard, "w", chunk_bytes=64 * 1024)
    assert torch.equal(dst, want.to(torch.bfloat16))  # the same rounding as casting the whole tensor
    assert max(pieces) <= 64 * 1024 and len(pieces) > 1
    assert sum(pieces) == want.numel() * 4  # every element of the shard read once, nothing else


def test_a_checkpoint_tensor_of_another_shape_is_one_clear_line(tmp_path):
    from safetensors import safe_open

    path = _write(tmp_path, w=torch.zeros(4, 6), s=torch.tensor(2.0))
    with safe_open(path, framework="pt") as f:
        with pytest.raises(ValueError, match=r"checkpoint's w has shape \[4, 6\], the model expects \[4, 8\]"):
            fill.read_into(torch.empty(4, 4), f.get_slice("w"), fill.Shard(1, 0, 4, 8), "w")
        scalar = torch.empty(())
        fill.read_into(scalar, f.get_slice("s"), fill.Shard(), "s")
    assert scalar.item() == 2.0


def _filled_in_chunks(rank, world_size, path):
    import safetensors.torch
    from transformers import AutoModelForSequenceClassification

    from ad2_ds.teachers.ds_inference import DeepSpeedTeacher

    dist.init_distributed()
    batch = random_batch(batch_size=3, seq_len=7, seed=rank)
    whole = DeepSpeedTeacher(AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="eager"),
                             tp_size=2, output_hidden_states=True)  # fmt: skip
    same = whole(batch)

    def whole_file(*a, **k):
        raise AssertionError("a checkpoint file was loaded whole")

    load_file = safetensors.torch.load_file
    safetensors.torch.load_file = whole_file  # DeepSpeed's own loader reads every file through it
    pieces, copy = [], fill.copy_chunk
    fill.copy_chunk = lambda d, s: (pieces.append(s.numel() * s.element_size()), copy(d, s))
    fill.CHUNK_BYTES = 256
    tp = DeepSpeedTeacher.from_pretrained(path, tp_size=2, output_hidden_states=True, attn_implementation="eager")
    out = tp(batch)
    held = sum(p.numel() for p in tp.engine.module.parameters())  # BERT's buffers are not in the checkpoint
    safetensors.torch.load_file = load_file

    def unsupported(layer, name):  # as for a layer AutoTP splits another way (fused QKV)
        raise fill.UnsupportedLayout("not a plain split")

    fill.shard_of = unsupported
    fallback = DeepSpeedTeacher.from_pretrained(path, tp_size=2, output_hidden_states=True,
                                                attn_implementation="eager")  # fmt: skip
    return same, out, tp.loaded, pieces, held, fallback(batch), fallback.loaded


def test_from_pretrained_fills_the_shards_in_chunks_and_equals_deepspeeds_loader(tmp_path):
    path = save_split(tiny_bert(num_labels=3), tmp_path / "bert")
    for same, out, loaded, pieces, held, fallback, fallback_loaded in launch(
        _filled_in_chunks, 2, args=(str(path),), timeout_s=240
    ):
        assert loaded == "shards" and fallback_loaded == "shards"
        assert pieces and max(pieces) <= 256
        assert sum(pieces) == held * 4  # fp32 file: each kept element read once, no whole tensor of another rank
        assert torch.equal(out.logits, same.logits)
        assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, same.hidden_states))
        assert torch.equal(fallback.logits, same.logits)  # DeepSpeed's loader, when a layer is not a plain split
