"""Teachers bigger than one device: DeepSpeedTeacher.from_pretrained loads only each rank's shards from safetensors;
decoder classifiers (Llama, Qwen2, Mistral) and MPNet run tensor-parallel; all equal the unsharded teacher."""

import json

import pytest
import torch

from ad2_ds import dist
from ad2_ds.teachers import sharded
from ad2_ds.teachers.local import LocalTeacher
from ad2_ds.testing import launch

from conftest import decoder_tokenizer, random_batch, tiny_bert, tiny_decoder


def tiny_mpnet(seed=0):
    from transformers import MPNetConfig, MPNetForSequenceClassification

    torch.manual_seed(seed)
    cfg = MPNetConfig(vocab_size=80, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      num_labels=3)  # fmt: skip
    model = MPNetForSequenceClassification(cfg).eval()
    with torch.no_grad():  # a bias large enough that a wrong head slice shows in the logits
        model.mpnet.encoder.relative_attention_bias.weight.normal_(0, 2.0)
    return model


def decoder_batch(rank, pad_token_id=1, vocab_size=80):
    """Right-padded rows of different lengths (ragged across ranks), no token equal to the pad id."""
    g = torch.Generator().manual_seed(40 + rank)
    B, T = (3, 9) if rank == 0 else (2, 6)
    ids = torch.randint(2, vocab_size, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(B):
        n = T - 2 * b
        ids[b, n:], mask[b, n:] = pad_token_id, 0
    return {"input_ids": ids, "attention_mask": mask, "idx": torch.arange(B)}


def save_split(model, path):
    """A sharded safetensors checkpoint (index + files of a few tensors each in state-dict order), as save_pretrained
    writes with a small max_shard_size, except that some module's tensors land in two files (real checkpoints do that
    when a file fills up between a weight and its bias)."""
    from safetensors.torch import save_file

    model.save_pretrained(path)  # config.json and the single file
    (path / sharded.SAFE_SINGLE).unlink()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    keys = list(state)
    for per_file in range(3, 10):
        chunks = [keys[i : i + per_file] for i in range(0, len(keys), per_file)]
        if sharded._split_modules([(str(n), c) for n, c in enumerate(chunks)]):
            break
    weight_map = {}
    for n, chunk in enumerate(chunks):
        name = f"model-{n + 1:05d}-of-{len(chunks):05d}.safetensors"
        save_file({k: state[k] for k in chunk}, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in chunk})
    (path / sharded.SAFE_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def _from_pretrained_vs_unsharded(rank, world_size, path, tp_size, dtype, kind):
    from transformers import AutoModelForSequenceClassification

    from ad2_ds.teachers.ds_inference import DeepSpeedTeacher

    dist.init_distributed()
    if kind == "decoder":
        batch = decoder_batch(rank)
    else:
        batch = random_batch(batch_size=3 + rank, seq_len=7 + rank, seed=rank)
    whole = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="eager").eval()
    ref = LocalTeacher(whole, output_hidden_states=True)(batch)  # unsharded, fp32
    tp = DeepSpeedTeacher.from_pretrained(path, tp_size=tp_size, dtype=dtype, output_hidden_states=True,
                                          attn_implementation="eager")  # fmt: skip
    out = tp(batch)
    # the same TP sharding built from the whole model (today's path) must agree bit for bit
    same = DeepSpeedTeacher(AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="eager"),
                            tp_size=tp_size, dtype=dtype, output_hidden_states=True)(batch)  # fmt: skip
    shard_rows = [p.shape[0] for n, p in tp.engine.module.named_parameters() if n.endswith("q_proj.weight")
                  or n.endswith("query.weight") or n.endswith("attn.q.weight")]  # fmt: skip
    return ref, out, same, shard_rows


@pytest.mark.parametrize("arch", ["Bert", "Qwen2", "Llama", "Mistral", "MPNet"])
def test_sharded_load_equals_the_unsharded_teacher_on_two_ranks(arch, tmp_path):
    model = {"Bert": lambda: tiny_bert(num_labels=3), "MPNet": tiny_mpnet}.get(arch, lambda: tiny_decoder(arch))()
    path = save_split(model, tmp_path / arch)
    files = sharded.checkpoint_files(path)
    assert len(files) > 2
    # Llama and Mistral have no biases: one tensor per module, nothing to split
    assert sharded._split_modules(files) or arch in ("Llama", "Mistral"), "no module split over two files"
    kind = "decoder" if arch not in ("Bert", "MPNet") else "encoder"
    for ref, out, same, rows in launch(
        _from_pretrained_vs_unsharded, 2, args=(str(path), 2, torch.float32, kind), timeout_s=180
    ):
        assert rows and all(r == 16 for r in rows), f"query projections not sharded: {rows}"
        torch.testing.assert_close(out.logits, ref.logits, atol=2e-6, rtol=1e-5)
        for h, h_ref in zip(out.hidden_states, ref.hidden_states):
            torch.testing.assert_close(h, h_ref, atol=2e-6, rtol=1e-5)
        assert torch.equal(out.logits, same.logits)


def test_sharded_load_in_bf16_is_bit_identical_to_sharding_the_whole_model(tmp_path):
    path = save_split(tiny_decoder("Qwen2"), tmp_path / "qwen2")
    for ref, out, same, _ in launch(
        _from_pretrained_vs_unsharded, 2, args=(str(path), 2, torch.bfloat16, "decoder"), timeout_s=180
    ):
        assert out.hidden_states[-1].dtype == torch.bfloat16
        assert torch.equal(out.logits, same.logits)
        assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, same.hidden_states))
        torch.testing.assert_close(out.logits, ref.logits, atol=5e-2, rtol=5e-2)


def test_sharded_load_at_tp4_and_tp2_of_four_ranks(tmp_path):
    path = save_split(tiny_bert(num_labels=3), tmp_path / "bert")
    for tp_size in (4, 2):
        results = launch(_from_pretrained_vs_unsharded, 4, args=(str(path), tp_size, torch.float32, "enc"),
                         timeout_s=240)  # fmt: skip
        for ref, out, _, rows in results:
            assert rows == [32 // tp_size] * 2  # this rank's heads of each layer's query
            torch.testing.assert_close(out.logits, ref.logits, atol=2e-6, rtol=1e-5)
            torch.testing.assert_close(out.hidden_states[-1], ref.hidden_states[-1], atol=2e-6, rtol=1e-5)


def _mpnet_model_path(rank, world_size):
    from ad2_ds.teachers import DeepSpeedTeacher

    dist.init_distributed()
    batch = random_batch(batch_size=3, seq_len=8, seed=rank)
    batch.pop("token_type_ids")
    ref = LocalTeacher(tiny_mpnet(), output_hidden_states=True)(batch)
    tp = DeepSpeedTeacher(tiny_mpnet(), tp_size=2, output_hidden_states=True)
    bias = tp.engine.module.mpnet.encoder.relative_attention_bias.weight
    return ref, tp(batch), tuple(bias.shape)


def test_mpnet_at_tp2_slices_its_relative_position_bias_to_the_ranks_heads():
    for ref, out, bias_shape in launch(_mpnet_model_path, 2, timeout_s=180):
        assert bias_shape == (32, 2)  # 32 buckets x this rank's 2 of 4 heads
        torch.testing.assert_close(out.logits, ref.logits, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(out.hidden_states[-1], ref.hidden_states[-1], atol=2e-6, rtol=1e-5)


def _decoder_padding(rank, world_size, arch):
    from ad2_ds.teachers import DeepSpeedTeacher

    dist.init_distributed()
    tp = DeepSpeedTeacher(tiny_decoder(arch), tp_size=2)
    batch = decoder_batch(rank)
    out = tp(batch).logits
    alone = []
    rows = len(batch["input_ids"])
    for b in range(3):  # each rank of a TP group must call the teacher as often as the others: 3 calls on both
        b = min(b, rows - 1)
        n = int(batch["attention_mask"][b].sum())
        row = {k: batch[k][b : b + 1, :n] for k in ("input_ids", "attention_mask")}
        alone.append(tp(row).logits)
    left = {k: v.flip(1) if k != "idx" else v for k, v in batch.items()}
    try:
        tp(left)
        refused = ""
    except ValueError as e:
        refused = str(e)
    return out, torch.cat(alone[:rows]), refused


@pytest.mark.parametrize("arch", ["Qwen2", "Llama", "Mistral"])
def test_decoder_teacher_pools_the_last_real_token_of_right_padded_rows(arch):
    for out, alone, refused in launch(_decoder_padding, 2, args=(arch,), timeout_s=180):
        torch.testing.assert_close(out, alone, atol=2e-6, rtol=1e-5)  # padding changes nothing
        assert "left-padded" in refused


def test_prepare_decoder_teacher_sets_right_padding_and_a_pad_id():
    from ad2_ds.teachers.decoder import prepare_decoder_teacher

    tok = decoder_tokenizer(padding_side="left")
    config = tiny_decoder("Llama", pad_token_id=None).config
    assert config.pad_token_id is None and tok.pad_token_id is None
    pad = prepare_decoder_teacher(tok, config)
    assert pad == tok.eos_token_id == config.pad_token_id and tok.padding_side == "right"
    enc = tok(["good movie", "bad"], padding=True)
    assert enc["attention_mask"][1][0] == 1 and enc["input_ids"][1][-1] == pad
    config.pad_token_id = pad + 1
    with pytest.raises(ValueError, match="must agree"):
        prepare_decoder_teacher(tok, config)


def _decoder_without_pad(rank, world_size):
    from ad2_ds.teachers import DeepSpeedTeacher

    dist.init_distributed()
    try:
        DeepSpeedTeacher(tiny_decoder("Qwen2", pad_token_id=None), tp_size=2)
    except ValueError as e:
        return str(e)
    return "built"


def test_decoder_teacher_without_a_pad_id_is_refused():
    assert all("prepare_decoder_teacher" in m for m in launch(_decoder_without_pad, 2, timeout_s=120))


def test_bin_checkpoints_and_missing_keys_are_refused(tmp_path):
    model = tiny_bert()
    (tmp_path / "bin").mkdir()
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"\.bin weights .* safetensors"):
        sharded.checkpoint_files(tmp_path / "bin")
    path = save_split(model, tmp_path / "split")
    files = sharded.checkpoint_files(path)
    skeleton = sharded.empty_classifier(path)
    sharded.check_keys_cover(skeleton, files)  # complete: no error
    index = json.loads((path / sharded.SAFE_INDEX).read_text())
    del index["weight_map"]["classifier.bias"]
    (path / sharded.SAFE_INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"lacks 1 of the model's .* \['classifier.bias'\]"):
        sharded.check_keys_cover(skeleton, sharded.checkpoint_files(path), path)
    assert all(p.is_meta for p in skeleton.parameters())
    assert not any(b.is_meta for b in skeleton.buffers())  # position_ids & co. stay real (include_buffers=False)


def test_a_parameter_outside_loadable_modules_blocks_the_sharded_path():
    class Gate(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(4))
            self.proj = torch.nn.Linear(4, 4)

    assert sharded.sharded_load_blocker(tiny_bert()) is None
    assert "scale is held by a Gate" in sharded.sharded_load_blocker(torch.nn.Sequential(Gate()))
    with torch.device("meta"):
        m = torch.nn.Linear(2, 2)
    assert sharded.meta_tensors(m) == ["weight", "bias"]


def test_pooled_state_is_cls_for_encoders_and_the_last_real_token_for_decoders():
    from ad2_ds.teachers.decoder import pooled_state, pools_last_token

    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert torch.equal(pooled_state(hidden, mask, last=False), hidden[:, 0])
    assert torch.equal(pooled_state(hidden, mask, last=True), torch.stack([hidden[0, 2], hidden[1, 3]]))
    qwen = tiny_decoder("Qwen2").config
    qwen.architectures = ["Qwen2ForSequenceClassification"]
    bert = tiny_bert().config
    bert.architectures = ["BertForSequenceClassification"]
    assert pools_last_token(qwen) and not pools_last_token(bert)


def _deberta_tp2(rank, world_size):
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    from ad2_ds.teachers import DeepSpeedTeacher

    dist.init_distributed()
    cfg = DebertaV2Config(vocab_size=80, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64)  # fmt: skip
    try:
        DeepSpeedTeacher(DebertaV2ForSequenceClassification(cfg), tp_size=2)
    except ValueError as e:
        return str(e)
    return "built"


def test_deberta_v2_whose_autotp_sharding_differs_is_refused_at_tp2():
    assert all("tp_size=1" in m and "does not match" in m for m in launch(_deberta_tp2, 2, timeout_s=120))


def _factory_live_teacher(rank, world_size, path):
    import numpy as np
    from transformers import AutoModelForSequenceClassification

    from ad2_ds.modeling import accepted_inputs, model_inputs
    from ad2_ds.teachers.factory import TeacherModel, TeacherNeeds, TeacherSource, live_teacher
    from ad2_ds.trainer import predict

    dist.init_distributed()
    live = live_teacher(None, TeacherNeeds(), "fp32", tp_size=2, source=TeacherSource(str(path), num_labels=3))
    rows = [{k: v[i] for k, v in random_batch(batch_size=7, seq_len=9, seed=5).items()} for i in range(7)]

    def collate(examples):
        return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}

    whole = AutoModelForSequenceClassification.from_pretrained(path).eval()
    # predict() gives each rank different rows (r, r + 2, ...): the TP teacher must gather them, not mix them
    got = predict(TeacherModel(live, whole.config), rows, collate, batch_size=2)
    with torch.no_grad():
        ref = whole(**model_inputs(collate(rows), accepted_inputs(whole))).logits.numpy()
    # own data naming the teacher's labels in another order: the sharded head's logits come out in the data's order
    source = TeacherSource(str(path), num_labels=3, label_order=(2, 0, 1))
    reordered = live_teacher(None, TeacherNeeds(), "fp32", tp_size=2, source=source)
    got_reordered = predict(TeacherModel(reordered, whole.config), rows, collate, batch_size=2)
    return (
        live.loaded,
        type(live).__name__,
        bool(np.allclose(got, ref, atol=2e-6, rtol=1e-5)),
        bool(np.allclose(got_reordered, ref[:, [2, 0, 1]], atol=2e-6, rtol=1e-5)),
    )


def test_live_teacher_loads_a_tp_teacher_from_its_source_and_evaluates_it_like_a_model(tmp_path):
    path = save_split(tiny_bert(num_labels=3), tmp_path / "bert")
    for loaded, kind, equal, reordered in launch(_factory_live_teacher, 2, args=(str(path),), timeout_s=180):
        assert (loaded, kind, equal, reordered) == ("shards", "DeepSpeedTeacher", True, True)


@pytest.mark.parametrize("arch", ["Bert", "Qwen2"])
def test_a_student_cut_from_a_checkpoint_equals_one_cut_from_the_loaded_teacher(tmp_path, arch):
    from transformers import AutoModelForSequenceClassification

    from ad2_ds.modeling import student_from_teacher

    model = tiny_bert(num_labels=3, layers=4) if arch == "Bert" else tiny_decoder(arch, num_hidden_layers=4)
    path = save_split(model, tmp_path / arch)
    whole = AutoModelForSequenceClassification.from_pretrained(path)
    for n, strategy in ((2, "skip"), (1, "top"), (3, "bottom")):
        want = student_from_teacher(whole, n, strategy).state_dict()
        got = sharded.student_from_checkpoint(path, n, strategy, num_labels=3).state_dict()
        assert sorted(got) == sorted(want)
        assert not sharded.meta_tensors(sharded.student_from_checkpoint(path, n, strategy))
        assert all(torch.equal(got[k], want[k]) for k in want), (arch, n, strategy)
    with pytest.raises(ValueError, match="predicts 3 labels"):
        sharded.student_from_checkpoint(path, 2, "skip", num_labels=2)
