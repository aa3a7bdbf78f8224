"""Embedding discovery and layer selection across encoder families (tiny random models)."""

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    DistilBertConfig,
    ElectraConfig,
    MPNetConfig,
    RobertaConfig,
)

from ad2_ds import AD2Config, AD2Objective, TeacherOutput
from ad2_ds.modeling import find_embedding_module, find_layer_list, select_layers, student_from_teacher

from conftest import random_batch, tiny_bert

SMALL = dict(vocab_size=80, max_position_embeddings=40, num_labels=2)


def _configs():
    return {
        "roberta": RobertaConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, pad_token_id=1, **SMALL
        ),
        "distilbert": DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, **SMALL),
        "mpnet": MPNetConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, **SMALL
        ),
        "electra": ElectraConfig(
            embedding_size=16,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            **SMALL,
        ),
    }


@pytest.mark.parametrize("family", ["roberta", "distilbert", "mpnet", "electra"])
def test_ad2_runs_on_encoder_family(family):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(_configs()[family]).eval()
    emb = find_embedding_module(model)
    assert "Embeddings" in type(emb).__name__
    batch = random_batch(vocab_size=80, seq_len=8)
    teacher = AutoModelForSequenceClassification.from_config(_configs()[family]).eval()
    with torch.no_grad():
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        logits_t = teacher(**inputs).logits * 10
    emb_dim = 16 if family == "electra" else 32  # ELECTRA embeds narrower and projects up afterwards
    for fast in (True, False):
        obj = AD2Objective(model, AD2Config(method="ad2-dkd", epsilon=0.5, step_size=0.5, fast_pga=fast))
        losses = obj(batch, TeacherOutput(logits_t))  # token_type_ids dropped where the model takes none
        losses["loss"].backward()
        obj._tap.remove()
        assert torch.isfinite(losses["loss"]) and losses["delta_norm_max"] > 0
        assert obj.last_delta.shape == (*batch["input_ids"].shape, emb_dim)


@pytest.mark.parametrize("strategy, expected", [("bottom", [0, 1, 2]), ("top", [3, 4, 5]), ("skip", [1, 3, 5])])
def test_student_from_teacher_selects_layers(strategy, expected):
    assert select_layers(6, 3, strategy) == expected
    teacher = tiny_bert(layers=6)
    student = student_from_teacher(teacher, 3, strategy)
    layers_t, layers_s = find_layer_list(teacher), find_layer_list(student)
    assert len(layers_s) == 3 and student.config.num_hidden_layers == 3 and teacher.config.num_hidden_layers == 6
    for i, j in enumerate(expected):
        for p_s, p_t in zip(layers_s[i].parameters(), layers_t[j].parameters()):
            assert torch.equal(p_s, p_t) and p_s.data_ptr() != p_t.data_ptr()  # a copy, not shared storage
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight)
    batch = random_batch()
    out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    assert len(out.hidden_states) == 4


def test_bad_layer_selection():
    with pytest.raises(ValueError, match="cannot be selected"):
        select_layers(4, 6, "bottom")
    with pytest.raises(ValueError, match="unknown layer selection"):
        select_layers(6, 3, "middle")


def test_student_equals_teacher_prefix_for_bottom_full_depth():
    teacher = tiny_bert(layers=2)
    student = student_from_teacher(teacher, 2, "bottom")
    batch = random_batch()
    with torch.no_grad():
        a = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(a, b)


def test_attention_kd_sees_pre_dropout_maps_and_training_is_unchanged():
    from ad2_ds.modeling import use_predropout_attention

    batch = random_batch()
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True)
    eager = tiny_bert(seed=3).train()
    ours = tiny_bert(seed=3).train()
    assert use_predropout_attention(ours) == "interface"
    torch.manual_seed(0)
    a = eager(**inputs)
    torch.manual_seed(0)
    b = ours(**inputs)
    assert torch.equal(a.logits, b.logits)  # same dropout, same outputs: training is unchanged
    rows = b.attentions[0].sum(-1)[batch["attention_mask"].bool().unsqueeze(1).expand(-1, 4, -1)]
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)  # probabilities, not dropped-out weights
    assert a.attentions[0].sum(-1).max() > 1.05  # HF's eager returns post-dropout maps (rows scaled by 1/(1-p))
    ours.eval(), eager.eval()
    with torch.no_grad():
        assert all(torch.equal(x, y) for x, y in zip(eager(**inputs).attentions, ours(**inputs).attentions))


@pytest.mark.parametrize("family", ["distilbert", "mpnet"])
def test_pre_dropout_attention_on_other_families(family):
    from ad2_ds.modeling import _attention_rows_are_distributions, use_predropout_attention

    cfg = _configs()[family]
    cfg._attn_implementation = "eager"
    model = AutoModelForSequenceClassification.from_config(cfg)
    assert use_predropout_attention(model) in ("interface", "no-dropout")
    assert _attention_rows_are_distributions(model)
