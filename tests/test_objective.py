"""The AD2 objective on tiny random BERTs: terms, δ, fast path, gradients, presets, errors."""

import copy
import dataclasses

import pytest
import torch

from ad2_ds import AD2Config, AD2Objective, TeacherOutput
from ad2_ds.losses import kd_loss
from ad2_ds.modeling import EmbeddingTap, find_embedding_module
from ad2_ds.perturb import per_example_norm, unit_norm

from conftest import random_batch, tiny_bert


def teacher_out(model, batch, scale=1.0):
    with torch.no_grad():
        o = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
            output_hidden_states=True,
            output_attentions=True,
        )
    return TeacherOutput(o.logits * scale, o.hidden_states, o.attentions)


@pytest.fixture
def setup():
    teacher = tiny_bert(seed=1, layers=4)
    student = tiny_bert(seed=2, layers=2)
    batch = random_batch(batch_size=6, seq_len=10)
    return teacher, student, batch, teacher_out(teacher, batch, scale=20.0)


def test_zero_kd_and_ada_when_student_equals_teacher():
    teacher = tiny_bert(seed=1)
    batch = random_batch()
    t = teacher_out(teacher, batch)
    obj = AD2Objective(copy.deepcopy(teacher), AD2Config(method="ad2-paper"), teacher_config=teacher.config)
    losses = obj(batch, t)
    assert losses["kd"].abs() < 1e-6
    assert losses["ada"].abs() < 1e-8  # ε = 1e-5 moves the output by O(ε²) in KL
    assert losses["hidden"].abs() < 1e-8 and losses["attention"].abs() < 1e-6


def test_delta_within_ball_per_example_and_zero_on_padding(setup):
    teacher, student, batch, t = setup
    obj = AD2Objective(student, AD2Config(method="ad2-dkd", epsilon=0.5, step_size=0.2, pga_steps=4), teacher.config)
    losses = obj(batch, t)
    delta = obj.last_delta
    norms = per_example_norm(delta)
    assert torch.all(norms <= 0.5 + 1e-6) and torch.all(norms > 0)
    assert losses["delta_norm_max"] == pytest.approx(norms.max().item())
    pad = batch["attention_mask"] == 0
    assert pad.any() and torch.all(delta[pad] == 0)


def _adv_kl(obj, batch, t, delta):
    tap = obj._tap
    tap.delta = delta
    try:
        with torch.no_grad():
            logits = obj.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    finally:
        tap.delta = None
    return kd_loss(logits, t.logits).item()


def test_ascent_increases_adversarial_kl(setup):
    teacher, student, batch, t = setup
    obj = AD2Objective(student, AD2Config(method="ad2-dkd", epsilon=1.0, step_size=1.0), teacher.config)
    delta = obj.perturbation(batch, t)
    clean = _adv_kl(obj, batch, t, torch.zeros_like(delta))
    assert _adv_kl(obj, batch, t, delta) > clean > _adv_kl(obj, batch, t, -delta)


def test_fast_path_equals_naive_path(setup):
    teacher, student, batch, t = setup  # models are in eval mode: no dropout
    for steps in (1, 3):
        cfg = dict(method="ad2-paper", epsilon=0.05, step_size=0.02, pga_steps=steps)
        fast = AD2Objective(student, AD2Config(**cfg, fast_pga=True), teacher.config)
        naive = AD2Objective(student, AD2Config(**cfg, fast_pga=False), teacher.config)
        l_fast, l_naive = fast(batch, t), naive(batch, t)
        assert torch.allclose(fast.last_delta, naive.last_delta, atol=1e-7, rtol=1e-5)
        assert torch.allclose(l_fast["loss"], l_naive["loss"], atol=1e-6)
        fast._tap.remove(), naive._tap.remove()


def test_fast_path_runs_fewer_student_forwards(setup):
    teacher, student, batch, t = setup
    calls = []
    handle = student.register_forward_pre_hook(lambda *a: calls.append(1))
    for fast, expected in ((True, 2), (False, 3)):
        obj = AD2Objective(student, AD2Config(method="ad2-paper", fast_pga=fast), teacher.config)
        calls.clear()  # count the step's forwards, not the construction's attention probe
        obj(batch, t)
        obj._tap.remove()
        assert len(calls) == expected
    handle.remove()


def test_perturbation_leaves_student_grads_untouched(setup):
    teacher, student, batch, t = setup
    obj = AD2Objective(student, AD2Config(method="ad2-paper", epsilon=0.1, step_size=0.1), teacher.config)
    losses = obj(batch, t)  # the ascent has run, the caller has not called backward yet
    assert all(p.grad is None for p in student.parameters())
    losses["loss"].backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)

    # Reference: the same loss with δ fixed from outside; its gradients must equal the objective's exactly.
    delta = obj.last_delta
    ref = AD2Objective(student, AD2Config(method="ad2-paper", alpha=0.0), teacher.config)
    clean = ref(batch, t)["loss"]
    with EmbeddingTap(find_embedding_module(student)) as tap:
        tap.delta = delta
        out = student(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
            output_hidden_states=True,
            output_attentions=True,
        )
    adv = kd_loss(out.logits, t.logits) + ref._add_deep(
        {}, ref._deep_terms(out, t, batch["attention_mask"], True), 1.0
    )
    (clean + adv).backward()
    for n, p in student.named_parameters():
        if n in grads:
            assert torch.allclose(grads[n], p.grad, atol=1e-6), n


@pytest.mark.parametrize(
    "method, keys, absent",
    [
        ("finetune", {"ce"}, {"kd", "ada", "hidden", "pkd"}),
        ("kd", {"ce", "kd"}, {"ada", "hidden", "attention", "pkd"}),
        ("pkd", {"ce", "kd", "pkd", "cls/1-2"}, {"ada", "hidden"}),
        ("ad2", {"ce", "kd", "ada", "delta_norm_max"}, {"hidden", "attention", "ada_hidden", "pkd"}),
        (
            "ad2-paper",
            {
                "ce",
                "kd",
                "ada",
                "hidden",
                "attention",
                "ada_hidden",
                "ada_attention",
                "hidden/2-4",
                "attention/1-2",
                "delta_norm_max",
            },
            {"pkd"},
        ),
        ("ad2-dkd", {"ce", "kd", "ada", "delta_norm_max"}, {"hidden", "attention"}),
        ("ad2-kd", {"ce", "ada"}, {"kd", "hidden"}),
    ],
)
def test_preset_terms(setup, method, keys, absent):
    teacher, student, batch, t = setup
    obj = AD2Objective(student, AD2Config(method=method), teacher.config)
    needs_t = AD2Config(method=method).needs_teacher
    losses = obj(batch, t if needs_t else None)
    assert keys <= set(losses) and not (absent & set(losses))
    assert torch.isfinite(losses["loss"])
    expected = sum(
        w * losses[k]
        for k, w in (
            ("ce", 1.0),
            ("kd", 1.0),
            ("ada", 1.0),
            ("hidden", 1.0),
            ("attention", 1.0),
            ("ada_hidden", 1.0),
            ("ada_attention", 1.0),
            ("pkd", 1.0),
        )
        if k in losses
    )
    assert losses["loss"].item() == pytest.approx(float(expected), rel=1e-5)


def test_ad2_kd_uses_labels_not_teacher(setup):
    teacher, student, batch, _ = setup
    obj = AD2Objective(student, AD2Config(method="ad2-kd", epsilon=0.0))
    losses = obj(batch, None)
    # ε = 0 → the adversarial sample is the clean one; eval mode → ada equals ce
    assert losses["ada"].item() == pytest.approx(losses["ce"].item(), rel=1e-6)


def test_the_default_ad2_is_the_setting_chosen_on_dev_and_the_paper_keeps_its_own():
    """ad2 (the default method) is frozen at what the selection chose (docs/RESULTS.md): no deep KD, one L2 ball of
    radius 1 per sentence on the embedding output, eta 1, one step; ad2-paper is the paper as written."""
    ad2, paper = AD2Config(), AD2Config(method="ad2-paper")
    assert ad2.method == "ad2" and (ad2.w_ce, ad2.w_kd, ad2.alpha, ad2.w_hidden, ad2.w_attention) == (1, 1, 1, 0, 0)
    assert (ad2.perturbation, ad2.perturb_norm, ad2.perturb_size, ad2.perturb_place) == (
        "pga", "example-l2", "absolute", "output"
    )  # fmt: skip
    assert (ad2.epsilon, ad2.step_size, ad2.pga_steps) == (1.0, 1.0, 1) and not ad2.deep_kd
    assert (paper.epsilon, paper.step_size, paper.pga_steps, paper.w_hidden, paper.w_attention) == (
        1e-5,
        1e-3,
        1,
        1,
        1,
    )
    assert AD2Config(method="ad2-dkd") == dataclasses.replace(ad2, method="ad2-dkd")  # the same, by its old name


def test_preset_overridable_term_by_term():
    cfg = AD2Config(method="ad2-paper", w_attention=0.0, alpha=0.5, w_kd=2.0)
    assert (cfg.w_attention, cfg.alpha, cfg.w_kd, cfg.w_hidden) == (0.0, 0.5, 2.0, 1.0)
    assert not cfg.needs_attentions and cfg.needs_hidden_states


def test_regression_objective():
    teacher, student = tiny_bert(num_labels=1, seed=1), tiny_bert(num_labels=1, seed=2)
    batch = random_batch(num_labels=1)
    t = teacher_out(teacher, batch)
    losses = AD2Objective(student, AD2Config(method="ad2-dkd", epsilon=0.0), teacher.config)(batch, t)
    with torch.no_grad():
        pred = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert losses["ce"].item() == pytest.approx(((pred.squeeze(-1) - batch["labels"]) ** 2).mean().item(), rel=1e-5)
    assert losses["kd"].item() == pytest.approx(((pred - t.logits) ** 2).mean().item(), rel=1e-5)
    assert losses["ada"].item() == pytest.approx(losses["kd"].item(), rel=1e-5)


def test_deterministic_under_fixed_seed(setup):
    teacher, _, batch, t = setup
    results = []
    for _ in range(2):
        student = tiny_bert(seed=2, layers=2).train()  # dropout on
        obj = AD2Objective(student, AD2Config(method="ad2-paper", random_start=True, epsilon=0.1), teacher.config)
        torch.manual_seed(123)
        losses = obj(batch, t)
        losses["loss"].backward()
        results.append((losses["loss"].item(), obj.last_delta, student.classifier.weight.grad.clone()))
    assert results[0][0] == results[1][0]
    assert torch.equal(results[0][1], results[1][1]) and torch.equal(results[0][2], results[1][2])


def test_width_and_head_mismatch(setup):
    teacher, _, batch, t = setup
    student = tiny_bert(seed=3, layers=2, hidden=16, heads=2)
    obj = AD2Objective(student, AD2Config(method="ad2-paper"), teacher.config)
    losses = obj(batch, t)
    losses["loss"].backward()
    assert set(obj.projections) == {"0", "1", "2"}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in obj.projections.parameters())
    with pytest.raises(ValueError, match="attention heads"):
        AD2Objective(student, AD2Config(method="ad2-paper", head_mismatch="error"), teacher.config)(batch, t)
    with pytest.raises(ValueError, match="teacher_config"):
        AD2Objective(student, AD2Config(method="ad2-paper"))(batch, t)  # widths differ, no projections built


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(epsilon=-1.0), "epsilon"),
        (dict(method="nope"), "unknown method"),
        (dict(temperature=0.0), "temperature"),
        (dict(pga_steps=0), "pga_steps"),
        (dict(alpha=-0.1), "alpha"),
        (dict(layer_map="1-2"), "layer_map"),
        (dict(method="finetune", w_ce=0.0), "nothing to optimise"),
    ],
)
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AD2Config(**kwargs)


def test_bad_inputs_raise_clear_errors(setup):
    teacher, student, batch, t = setup
    with pytest.raises(ValueError, match="labels"):
        AD2Objective(student, AD2Config(method="kd"), teacher_config=tiny_bert(num_labels=3).config)
    obj = AD2Objective(student, AD2Config(method="ad2-paper"), teacher.config)
    with pytest.raises(ValueError, match="hidden states"):
        obj(batch, TeacherOutput(t.logits, None, t.attentions))
    with pytest.raises(ValueError, match="needs teacher outputs"):
        obj(batch, None)
    with pytest.raises(ValueError, match="3 labels"):
        AD2Objective(student, AD2Config(method="kd"))(batch, TeacherOutput(torch.zeros(6, 3)))
    pair = dict(batch, teacher_input_ids=batch["input_ids"])
    with pytest.raises(ValueError, match="share a tokenizer"):
        obj(pair, t)


def test_layer_map_strategies():
    from ad2_ds.matching import layer_pairs

    assert layer_pairs("uniform", 3, 6) == [(1, 2), (2, 4), (3, 6)]
    assert layer_pairs("bottom", 3, 6) == [(1, 1), (2, 2), (3, 3)]
    assert layer_pairs("top", 3, 6) == [(1, 4), (2, 5), (3, 6)]
    assert layer_pairs("1:1,2:6", 2, 6) == [(1, 1), (2, 6)]
    with pytest.raises(ValueError, match="teacher layer 9"):
        AD2Objective(
            tiny_bert(layers=2), AD2Config(method="ad2-paper", layer_map="1:1,2:9"), tiny_bert(layers=4).config
        )


def test_delta_applied_reports_rounding_in_low_precision(setup, caplog):
    teacher, _, batch, t = setup
    student = tiny_bert(seed=2, layers=2)
    fp32 = AD2Objective(student, AD2Config(method="ad2-dkd", epsilon=0.1), teacher.config)(batch, t)
    assert fp32["delta_applied"] > 0.99
    student_bf16 = tiny_bert(seed=2, layers=2).to(torch.bfloat16)
    t16 = TeacherOutput(t.logits.to(torch.bfloat16))
    with caplog.at_level("WARNING"):
        tiny = AD2Objective(student_bf16, AD2Config(method="ad2-dkd", epsilon=1e-5))(batch, t16)
    assert tiny["delta_applied"] < 0.05  # 1e-5 spread over B x T x H vanishes in bf16
    assert "survives" in caplog.text


def _count_forwards(student):
    calls = []
    return calls, student.register_forward_pre_hook(lambda *a: calls.append(1))


def test_epsilon_zero_control_is_kd_on_a_second_view_without_ascent(setup):
    teacher, student, batch, t = setup
    calls, handle = _count_forwards(student)
    for fast in (True, False):
        obj = AD2Objective(student, AD2Config(method="ad2-dkd", epsilon=0.0, fast_pga=fast), teacher.config)
        calls.clear()
        losses = obj(batch, t)
        obj.close()
        assert len(calls) == 2  # clean + adversarial forward, no ascent
        assert torch.all(obj.last_delta == 0)
        assert losses["ada"].item() == pytest.approx(losses["kd"].item(), rel=1e-6)  # eval mode: the same view
    handle.remove()
    student.train()
    torch.manual_seed(0)
    obj = AD2Objective(student, AD2Config(method="ad2-dkd", epsilon=0.0), teacher.config)
    losses = obj(batch, t)  # train mode: a second dropout draw differs from the first
    assert losses["ada"].item() != pytest.approx(losses["kd"].item(), rel=1e-6)
    assert torch.isfinite(losses["loss"])


def test_random_direction_control_keeps_the_norm_and_loses_the_direction(setup):
    teacher, student, batch, t = setup
    cfg = dict(method="ad2-dkd", epsilon=1.0, step_size=1.0)
    adv = AD2Objective(student, AD2Config(**cfg), teacher.config)
    adv(batch, t)
    adv.close()
    torch.manual_seed(0)
    rnd = AD2Objective(student, AD2Config(**cfg, random_direction=True), teacher.config)
    losses = rnd(batch, t)
    rnd.close()
    d_adv, d_rnd = adv.last_delta, rnd.last_delta
    assert torch.allclose(per_example_norm(d_rnd), per_example_norm(d_adv))
    assert abs(((d_adv * d_rnd).sum() / (d_adv.norm() * d_rnd.norm())).item()) < 0.2
    assert losses["delta_cosine"] > 0.999  # the δ asked for is the δ applied, in fp32


@pytest.mark.parametrize("norm", ["token-l2", "token-linf", "example-l2"])
def test_relative_radius_follows_each_tokens_norm(setup, norm):
    teacher, student, batch, t = setup
    cfg = AD2Config(method="ad2-dkd", epsilon=0.1, step_size=0.1, perturb_norm=norm, perturb_size="relative")
    obj = AD2Objective(student, cfg, teacher.config)
    losses = obj(batch, t)
    obj.close()
    emb = obj._tap.reference.float() * batch["attention_mask"].unsqueeze(-1)
    got, bound = unit_norm(obj.last_delta, norm), 0.1 * unit_norm(emb, norm)
    assert torch.all(got <= bound * (1 + 1e-5) + 1e-12)
    assert torch.allclose(got, bound, rtol=1e-4)  # one step of η = ε from 0 ends on the sphere
    if norm == "token-l2":
        assert losses["delta_relative"].item() == pytest.approx(0.1, rel=1e-4)


def test_pre_layernorm_place_adds_delta_before_the_embedding_layernorm(setup):
    teacher, student, batch, t = setup
    const = torch.ones(6, 10, 32) * 3.0  # the same value on every hidden unit: LayerNorm's centring removes it
    logits = {}
    for place in ("output", "pre-ln"):
        obj = AD2Objective(student, AD2Config(method="ad2-dkd", perturb_place=place), teacher.config)
        kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        with torch.no_grad():
            clean = student(**kw).logits
            obj._tap.delta = const
            logits[place] = student(**kw).logits
            obj._tap.delta = None
        obj.close()
        assert torch.isfinite(logits[place]).all()
    moved = {place: (value - clean).abs().max().item() for place, value in logits.items()}
    assert moved["pre-ln"] < 1e-6 and moved["output"] > 1e-4
    obj = AD2Objective(student, AD2Config(method="ad2-dkd", epsilon=0.5, step_size=0.5, perturb_place="pre-ln"))
    losses = obj(batch, t)
    obj.close()
    assert losses["ada"] > losses["kd"] and losses["delta_cosine"] > 0.999


def test_smart_mode_runs_k_ascent_forwards_and_ends_near_unit_linf(setup):
    teacher, student, batch, t = setup
    calls, handle = _count_forwards(student)
    obj = AD2Objective(student, AD2Config(method="ad2-smart", w_attention=0.0, pga_steps=2), teacher.config)
    calls.clear()
    torch.manual_seed(0)
    losses = obj(batch, t)
    handle.remove()
    obj.close()
    assert len(calls) == 4  # clean, 2 ascent steps from noise, adversarial
    linf = unit_norm(obj.last_delta, "token-linf").squeeze(-1)[batch["attention_mask"].bool()]
    assert torch.all(linf > 0.5) and torch.all(linf <= 1.0)
    assert torch.isfinite(losses["loss"]) and torch.all(obj.last_delta[batch["attention_mask"] == 0] == 0)


def test_fast_path_is_exact_for_the_clean_forwards_dropout_sample(setup):
    # Train mode: the fast path's δ comes from the clean forward's graph, i.e. its dropout masks. A naive ascent whose
    # first forward replays the clean forward's RNG state draws the same masks, so it must find the same δ.
    teacher, student, batch, t = setup
    student.train()
    cfg = dict(method="ad2-dkd", epsilon=0.05, step_size=0.05)
    fast = AD2Objective(student, AD2Config(**cfg), teacher.config)
    torch.manual_seed(7)
    fast(batch, t)
    fast.close()
    naive = AD2Objective(student, AD2Config(**cfg, fast_pga=False), teacher.config)
    torch.manual_seed(7)
    replayed = naive.perturbation(batch, t)
    torch.manual_seed(8)
    other = naive.perturbation(batch, t)
    naive.close()
    assert torch.allclose(fast.last_delta, replayed, atol=1e-7, rtol=1e-5)
    assert not torch.allclose(fast.last_delta, other, atol=1e-4)  # another dropout sample gives another δ


def test_delta_applied_is_not_clamped(setup):
    teacher, _, batch, t = setup
    student = tiny_bert(seed=2, layers=2).to(torch.bfloat16)
    t16 = TeacherOutput(t.logits.to(torch.bfloat16))
    obj = AD2Objective(student, AD2Config(method="ad2-dkd", epsilon=0.05, step_size=0.05))
    losses = obj(batch, t16)
    obj.close()
    norms = per_example_norm(obj.last_delta)
    assert losses["delta_applied"].item() == pytest.approx((obj._tap.applied.sum() / norms.sum()).item(), rel=1e-6)
    assert 0.5 < losses["delta_cosine"] < 0.9999  # bf16 rounding bends the δ actually applied
