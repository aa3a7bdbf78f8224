"""LocalTeacher equals its model; the tensor-parallel DeepSpeedTeacher equals the unsharded one (2 gloo ranks)."""

import pytest
import torch

from ad2_ds import dist
from ad2_ds.teachers.local import LocalTeacher
from ad2_ds.testing import launch

from conftest import random_batch, tiny_bert


def test_local_teacher_logits_equal_the_model():
    model = tiny_bert(num_labels=3)
    batch = random_batch(num_labels=3, seed=3)
    with torch.no_grad():
        ref = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
            output_hidden_states=True,
            output_attentions=True,
        )
    out = LocalTeacher(model, output_hidden_states=True, output_attentions=True)(batch)
    assert out.logits.dtype == torch.float32 and not out.logits.requires_grad
    assert torch.equal(out.logits, ref.logits)
    assert len(out.hidden_states) == 3 and all(torch.equal(a, b) for a, b in zip(out.hidden_states, ref.hidden_states))
    assert all(torch.equal(a, b) for a, b in zip(out.attentions, ref.attentions))
    assert all(not p.requires_grad for p in model.parameters()) and not model.training


def test_local_teacher_outputs_can_be_loss_targets():
    teacher = LocalTeacher(tiny_bert())
    logits_t = teacher(random_batch())
    logits_s = torch.randn(4, 2, requires_grad=True)
    torch.nn.functional.mse_loss(logits_s, logits_t.logits).backward()  # inference tensors would fail here
    assert logits_s.grad is not None


def test_local_teacher_uses_teacher_keys_and_drops_unaccepted_inputs():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    cfg = DistilBertConfig(vocab_size=80, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64)
    model = DistilBertForSequenceClassification(cfg).eval()
    t = random_batch(seed=5, vocab_size=80)
    batch = dict(
        random_batch(seed=6), **{"teacher_" + k: t[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    )
    with torch.no_grad():
        ref = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
    assert torch.equal(LocalTeacher(model)(batch).logits, ref)


def test_local_teacher_refuses_attentions_with_sdpa():
    model = tiny_bert()
    model.config._attn_implementation = "sdpa"
    with pytest.raises(ValueError, match='attn_implementation="eager"'):
        LocalTeacher(model, output_attentions=True)


def _rank_batch(rank):
    # ragged across ranks: different rows, lengths and padding
    return random_batch(batch_size=4 if rank == 0 else 3, seq_len=8 if rank == 0 else 11, seed=10 + rank)


def _tp_vs_unsharded(rank, world_size, dtype):
    from ad2_ds.teachers.ds_inference import DeepSpeedTeacher

    dist.init_distributed()
    batch = _rank_batch(rank)
    ref = LocalTeacher(tiny_bert(num_labels=3), output_hidden_states=True, output_attentions=True)(batch)
    tp = DeepSpeedTeacher(
        tiny_bert(num_labels=3), tp_size=2, dtype=dtype, output_hidden_states=True, output_attentions=True
    )
    layer = tp.engine.module.bert.encoder.layer[0].attention.self.query
    assert layer.weight.shape[0] == 16, "AutoTP did not shard the query projection"
    out = tp(batch)
    return ref, out


def test_tp2_teacher_equals_unsharded_teacher():
    for ref, out in launch(_tp_vs_unsharded, world_size=2, args=(torch.float32,), timeout_s=120):
        assert out.logits.shape == ref.logits.shape and out.logits.dtype == torch.float32
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
        assert len(out.hidden_states) == len(ref.hidden_states) == 3
        for h, h_ref in zip(out.hidden_states, ref.hidden_states):
            torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
        for a, a_ref in zip(out.attentions, ref.attentions):
            assert a.shape == a_ref.shape  # all 4 heads, gathered
            torch.testing.assert_close(a, a_ref, atol=1e-5, rtol=1e-5)


def _no_gather(rank, world_size, verify):
    from ad2_ds.teachers.ds_inference import DeepSpeedTeacher

    dist.init_distributed()
    batch = random_batch(seed=20 + rank)  # same shape, different tokens per rank
    ref = LocalTeacher(tiny_bert(), output_hidden_states=True)(batch)
    tp = DeepSpeedTeacher(tiny_bert(), tp_size=2, gather_inputs=False, verify_inputs=verify, output_hidden_states=True)
    out = tp(batch)
    # a random tiny BERT's logits barely depend on the input; the last hidden state shows the mixing clearly
    return (out.hidden_states[-1] - ref.hidden_states[-1]).abs().max().item()


def test_without_gather_tp_ranks_mix_examples_and_the_check_catches_it():
    errs = launch(_no_gather, world_size=2, args=(False,), timeout_s=120)
    assert min(errs) > 1e-3, f"different batches per TP rank should give wrong outputs, max errors {errs}"
    with pytest.raises(RuntimeError, match="different inputs"):
        launch(_no_gather, world_size=2, args=(True,), timeout_s=120)


def _bad_config(rank, world_size, kwargs):
    from ad2_ds.teachers.ds_inference import DeepSpeedTeacher

    dist.init_distributed()
    DeepSpeedTeacher(tiny_bert(**kwargs.pop("model", {})), **kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"dtype": torch.float16}, "bfloat16"),
        ({"tp_size": 3}, "divide the world size"),
        ({"tp_size": 2, "model": {"heads": 1}}, "attention heads"),
    ],
)
def test_tp_teacher_config_errors(kwargs, match):
    world = 1 if kwargs.get("tp_size") != 2 else 2
    with pytest.raises(RuntimeError, match=match):
        launch(_bad_config, world_size=world, args=(kwargs,), timeout_s=60)


def _tp2_of_4(rank, world_size):
    from ad2_ds.teachers.ds_inference import DeepSpeedTeacher

    dist.init_distributed()
    batch = random_batch(batch_size=2 + rank % 2, seq_len=6 + rank, seed=30 + rank)
    ref = LocalTeacher(tiny_bert(), output_hidden_states=True)(batch)
    tp = DeepSpeedTeacher(tiny_bert(), tp_size=2, output_hidden_states=True)
    out = tp(batch)
    members = [None, None]
    torch.distributed.all_gather_object(members, rank, group=tp.group)
    err_hidden = (out.hidden_states[-1] - ref.hidden_states[-1]).abs().max().item()
    return members, (out.logits - ref.logits).abs().max().item(), err_hidden


def test_two_tp_groups_of_two_in_a_world_of_four():
    # DeepSpeed alone would build a single TP group over ranks [0, tp_size); the teacher makes one group per block
    results = launch(_tp2_of_4, world_size=4, timeout_s=120)
    assert [r[0] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    for _, err_logits, err_hidden in results:
        assert err_logits < 1e-5 and err_hidden < 1e-5


def test_tp2_teacher_in_bf16_is_close_to_fp32():
    for ref, out in launch(_tp_vs_unsharded, world_size=2, args=(torch.bfloat16,), timeout_s=120):
        assert out.logits.dtype == torch.float32 and out.hidden_states[-1].dtype == torch.bfloat16
        torch.testing.assert_close(out.logits, ref.logits, atol=3e-2, rtol=3e-2)
        torch.testing.assert_close(out.hidden_states[-1].float(), ref.hidden_states[-1], atol=1e-1, rtol=5e-2)
