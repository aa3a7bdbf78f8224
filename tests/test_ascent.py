"""The cheaper ascents (ad2_ds/ascent.py): passes counted, δ's ball, clean_grad's direction and gradients checked
against an independent computation, the free δ store through a kill and --resume, and the store's memory check."""

import json

import pytest
import torch
import torch.nn.functional as F
from test_recipe import _argv, _final_weights, _run, fixture_dirs  # noqa: F401  (fixture_dirs: a fixture)

from ad2_ds import AD2Config, AD2Objective, TeacherOutput
from ad2_ds.ascent import DeltaStore, InjectGrad
from ad2_ds.modeling import find_embedding_module

from conftest import random_batch, tiny_bert
from step_cost import PassCounter  # the benchmark's own counter (benchmarks/ is on pytest's path)


def _objective(ascent, seed=0, train=True, **kw):
    student = tiny_bert(seed=seed).train(train)
    obj = AD2Objective(student, AD2Config(method="ad2", ascent=ascent, **kw))
    if ascent == "free":
        obj.delta_store = DeltaStore(range(4), 8, 32)
    return student, obj


def _teacher(seed=1):
    return TeacherOutput(torch.randn(4, 2, generator=torch.Generator().manual_seed(seed)) * 3)


@pytest.mark.parametrize("ascent, units", [("kl", 7), ("clean_grad", 6), ("free", 6)])
def test_passes_are_counted_per_ascent(ascent, units):
    student, obj = _objective(ascent)
    counter = PassCounter(student)  # after the objective's tap, as the benchmark registers it
    batch, t = random_batch(), _teacher()
    for _ in range(2):  # free's second visit starts from a stored δ: same passes
        counter.reset()
        obj(batch, t)["loss"].backward()
        p = counter.snapshot()
        assert p["units"] == units, p
    assert p["backward_input_only"] == (1 if ascent == "kl" else 0) and p["forward"] == 2


@pytest.mark.parametrize("ascent", ["clean_grad", "free"])
@pytest.mark.parametrize("norm", ["example-l2", "token-l2"])
def test_delta_stays_in_the_ball(ascent, norm):
    eps = 0.3
    student, obj = _objective(ascent, epsilon=eps, step_size=0.2, perturb_norm=norm)
    batch, t = random_batch(), _teacher()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    mask = batch["attention_mask"].bool()
    for _ in range(4):
        opt.zero_grad()
        obj(batch, t)["loss"].backward()
        opt.step()
        delta = obj.delta_store.delta[:, : mask.shape[1]] if ascent == "free" else obj.last_delta
        norms = delta.flatten(1).norm(dim=1) if norm == "example-l2" else delta.norm(dim=-1)
        assert (norms <= eps * (1 + 1e-5)).all() and norms.max() > 0
        assert torch.all(delta[~mask] == 0)  # nothing on padding
    if ascent == "free":  # η < ε: δ grows by at most η per visit until it meets the ball
        assert obj.delta_store.visits.tolist() == [4, 4, 4, 4]


def _clean_loss(student, batch, t, temperature=1.0):
    """ce + kd of the student's clean forward, written out here, and the embedding output it went through."""
    seen = {}

    def keep(module, args, out):
        out.retain_grad()
        seen["emb"] = out

    handle = find_embedding_module(student).register_forward_hook(keep)
    try:
        logits = student(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
        ).logits
    finally:
        handle.remove()
    kd = F.kl_div(
        F.log_softmax(logits / temperature, -1), F.softmax(t.logits / temperature, -1), reduction="batchmean"
    )
    return F.cross_entropy(logits, batch["labels"]) + temperature**2 * kd, seen["emb"]


def test_clean_grad_direction_is_the_normalised_gradient_of_ce_plus_kd():
    student, obj = _objective("clean_grad", train=False, epsilon=0.5, step_size=1.0)  # eval: no dropout draws
    batch, t = random_batch(), _teacher()
    obj(batch, t)
    ref = tiny_bert(seed=0)
    loss, emb = _clean_loss(ref, batch, t)
    loss.backward()
    g = emb.grad * batch["attention_mask"].unsqueeze(-1)
    expected = 0.5 * g / g.flatten(1).norm(dim=1).view(-1, 1, 1)  # one step η=1, projected on ε=0.5
    assert torch.allclose(obj.last_delta, expected, atol=1e-6)
    cos = F.cosine_similarity(obj.last_delta.flatten(), expected.flatten(), dim=0)
    assert cos > 0.99999


def test_clean_grad_gives_the_parameter_gradients_of_clean_plus_adversarial():
    """The injected clean gradients plus the adversarial backward equal one backward of ce + kd + ada at that δ."""
    student, obj = _objective("clean_grad", train=False)
    batch, t = random_batch(), _teacher()
    obj(batch, t)["loss"].backward()
    got = {n: p.grad.clone() for n, p in student.named_parameters()}
    delta = obj.last_delta

    ref = tiny_bert(seed=0)
    loss, _ = _clean_loss(ref, batch, t)
    handle = find_embedding_module(ref).register_forward_hook(lambda m, a, out: out + delta)
    try:
        logits = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     token_type_ids=batch["token_type_ids"]).logits  # fmt: skip
    finally:
        handle.remove()
    ada = F.kl_div(F.log_softmax(logits, -1), F.softmax(t.logits, -1), reduction="batchmean")
    (loss + ada).backward()
    for n, p in ref.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-6, rtol=1e-5), n


def test_clean_grad_without_ce_is_the_kl_ascent():
    """With w_ce = 0 the clean loss is the adversarial KL at δ = 0: both ascents give the same δ."""
    _, a = _objective("clean_grad", train=False, w_ce=0.0)
    _, b = _objective("kl", train=False, w_ce=0.0)
    batch, t = random_batch(), _teacher()
    a(batch, t), b(batch, t)
    assert torch.allclose(a.last_delta, b.last_delta, atol=1e-6)


def test_inject_grad_scales_and_adds():
    p = torch.ones(3, requires_grad=True)
    g = torch.tensor([2.0, 4.0, 8.0])
    out = InjectGrad.apply(0.5, 1, p, g)
    assert out.item() == 0.0
    (3 * out + p.sum()).backward()
    assert torch.equal(p.grad, torch.tensor([4.0, 7.0, 13.0]))  # 3 · 0.5 · g + 1


def test_free_first_visit_is_zero_then_the_stored_delta_is_reused():
    student, obj = _objective("free", train=False)
    batch, t = random_batch(), _teacher()
    losses = obj(batch, t)
    assert float(losses["delta_norm_max"]) == 0.0  # first visit: δ = 0 (Shafahi et al.)
    losses["loss"].backward()
    stored = obj.delta_store.read(batch["idx"], batch["input_ids"].shape[1]).clone()
    assert stored.flatten(1).norm(dim=1).min() > 0.99  # one step η = 1 to the ball of ε = 1
    obj(batch, t)
    assert torch.equal(obj.last_delta, stored)  # reused as stored; the next backward moves it on


def test_delta_store_keys_by_idx_and_round_trips():
    store = DeltaStore([7, 3, 11], max_len=5, hidden=2)
    store.write(torch.tensor([11, 3]), torch.ones(2, 4, 2) * torch.tensor([1.0, 2.0]).view(2, 1, 1))
    out = store.read(torch.tensor([3, 7, 11]), 6)
    assert out.shape == (3, 6, 2) and out[0, :4].eq(2).all() and out[1].eq(0).all() and out[2, :4].eq(1).all()
    assert out[:, 4:].eq(0).all()
    other = DeltaStore([3, 7, 11], max_len=5, hidden=2)
    other.load_state_dict(store.state_dict())
    assert torch.equal(other.delta, store.delta) and torch.equal(other.visits, store.visits)
    with pytest.raises(KeyError, match="idx 5"):
        store.read(torch.tensor([5]), 3)
    with pytest.raises(ValueError, match="other training data"):
        DeltaStore([1, 2, 3], 5, 2).load_state_dict(store.state_dict())


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(ascent="sgd"), "ascent must be one of"),
        (dict(ascent="clean_grad", pga_steps=2), "one pga step"),
        (dict(ascent="free", random_start=True), "one pga step"),
        (dict(ascent="free", epsilon=0.0), "epsilon = 0"),
        (dict(ascent="free", random_direction=True), "random_direction"),
        (dict(ascent="clean_grad", fast_pga=False), "naive_pga"),
        (dict(ascent="free", free_delta_budget_gb=0.0), "free_delta_budget_gb must be > 0"),
    ],
)
def test_bad_ascent_settings_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        AD2Config(method="ad2", **kw)


def test_default_is_the_kl_ascent():
    assert AD2Config().ascent == "kl" and AD2Config(method="ad2-paper").ascent == "kl"


def test_too_large_a_delta_store_fails_before_any_model_loads(
    fixture_dirs,  # noqa: F811
    tmp_path,
    monkeypatch,
    capsys,
    no_dist_left,
):
    from ad2_ds import distill
    from recipes import distill_glue

    def no_models(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(distill, "load_models", no_models)
    monkeypatch.setattr(distill, "load_teacher", no_models)
    data, teacher, ds = fixture_dirs
    argv = _argv(data, teacher, ds, tmp_path / "run", "--ascent", "free", "--free_delta_budget_gb", "1e-6")
    assert distill_glue.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    # 40 examples x 16 tokens x hidden 32 x 4 bytes = 80 KiB > 1e-6 GiB
    assert err.startswith("error: --free_delta_budget_gb is exceeded") and "40 examples x 16 tokens x 32" in err


FREE = ["--num_train_epochs", "3", "--eval_steps", "2", "--ascent", "free", "--epsilon", "1.0", "--step_size", "0.5"]


def test_free_delta_store_is_saved_and_restored_bitwise_by_resume(fixture_dirs, tmp_path):  # noqa: F811
    data, teacher, ds = fixture_dirs  # 40 examples, micro-batch 4, 2 accumulation steps: 5 optimizer steps / epoch
    full = _run(_argv(data, teacher, ds, tmp_path / "full", *FREE))
    assert full.returncode == 0, full.stderr[-2000:]
    results = json.loads((tmp_path / "full" / "results.json").read_text())
    assert results["config"]["ascent"] == "free"
    store = results["free_delta_store"]
    assert store["examples"] == 40 and store["hidden"] == 32 and store["bytes"] == 40 * store["max_tokens"] * 32 * 4
    assert "ascent free: delta store of" in full.stderr

    out = tmp_path / "run"
    hit = _run(_argv(data, teacher, ds, out, *FREE), "kill@17")  # killed in epoch 2, after the step-8 checkpoint
    assert hit.returncode == -9, hit.stderr[-2000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "global_step8"
    resumed = _run(_argv(data, teacher, ds, out, *FREE, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    tag_a, a = _final_weights(tmp_path / "full")
    tag_b, b = _final_weights(out)
    assert tag_a == tag_b == "global_step15"
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    ckpt = "checkpoints/global_step15/delta_store.pt"
    sa, sb = (torch.load(d / ckpt, weights_only=True) for d in (tmp_path / "full", out))
    assert torch.equal(sa["delta"], sb["delta"]) and torch.equal(sa["visits"], sb["visits"])
    assert sa["visits"].min() >= 3 and sa["delta"].abs().max() > 0  # every example stepped once per epoch at least
    assert json.loads((out / "results.json").read_text())["history"] == results["history"]


def test_clean_grad_trains_end_to_end_with_accumulation(fixture_dirs, tmp_path, no_dist_left):  # noqa: F811
    from recipes import distill_glue

    data, teacher, ds = fixture_dirs
    out = tmp_path / "run"
    argv = _argv(data, teacher, ds, out, "--num_train_epochs", "1", "--ascent", "clean_grad", "--epsilon", "1.0")
    assert distill_glue.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["ascent"] == "clean_grad" and results["engine"]["grad_accum"] == 2
    assert results["history"][-1]["step"] == 5 and results["nonfinite_skipped"] == 0
