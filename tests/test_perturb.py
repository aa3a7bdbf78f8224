import pytest
import torch

from ad2_ds.perturb import (
    SMART_STABILISER,
    normalized_ascent_step,
    per_example_norm,
    pga_perturbation,
    project,
    project_l2_ball,
    random_signs,
    random_start,
    smart_perturbation,
    unit_norm,
)


def _mask():
    return torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])


def test_projection_bounds_norm_and_keeps_interior_points():
    d = torch.randn(2, 4, 3)
    d[1] *= 1e-3
    out = project_l2_ball(d, 0.1)
    assert torch.all(per_example_norm(out) <= 0.1 + 1e-7)
    assert torch.allclose(out[1], d[1])  # already inside: unchanged


def test_ascent_step_is_normalised_and_zero_on_padding():
    grad = torch.randn(2, 4, 3) * torch.tensor([1e-6, 1e3]).view(2, 1, 1)  # very different gradient scales
    d = normalized_ascent_step(torch.zeros(2, 4, 3), grad, step_size=0.5, epsilon=10.0, mask=_mask())
    assert torch.allclose(per_example_norm(d), torch.tensor([0.5, 0.5]), rtol=1e-5)
    assert torch.all(d[1, 2:] == 0)


def test_nonfinite_gradient_gives_no_step():
    grad = torch.randn(2, 4, 3)
    grad[0, 0, 0] = float("inf")
    d = normalized_ascent_step(torch.zeros(2, 4, 3), grad, 0.5, 1.0, _mask())
    assert torch.all(d[0] == 0) and torch.isfinite(d).all() and per_example_norm(d)[1] > 0


def test_random_start_inside_ball_and_zero_on_padding():
    g = torch.Generator().manual_seed(0)
    d = random_start((2, 4, 3), 0.2, _mask(), generator=g)
    assert torch.all(per_example_norm(d) <= 0.2 + 1e-7) and torch.all(per_example_norm(d) > 0)
    assert torch.all(d[1, 2:] == 0)


def test_pga_on_linear_loss_finds_the_gradient_direction():
    # loss(δ) = <w, δ>: the maximiser on the ball is ε·w/‖w‖ (over unmasked positions)
    w = torch.randn(2, 4, 3)
    mask = _mask()
    delta = pga_perturbation(lambda d: (w * d).sum(), (2, 4, 3), mask, epsilon=0.3, step_size=1.0, steps=3)
    w_masked = w * mask.unsqueeze(-1)
    expected = 0.3 * w_masked / per_example_norm(w_masked).view(2, 1, 1)
    assert torch.allclose(delta, expected, atol=1e-6)
    assert not delta.requires_grad and delta.dtype == torch.float32


def test_init_grad_replaces_first_evaluation():
    calls = []

    def loss_fn(d):
        calls.append(1)
        return d.sum()

    g0 = torch.ones(2, 4, 3)
    pga_perturbation(loss_fn, (2, 4, 3), _mask(), 1.0, 0.1, steps=1, init_grad=g0)
    assert calls == []
    pga_perturbation(loss_fn, (2, 4, 3), _mask(), 1.0, 0.1, steps=3, init_grad=g0)
    assert len(calls) == 2


def test_token_norm_projections_bound_each_token():
    d = torch.randn(2, 4, 3) * 5
    l2 = project(d, 0.3, "token-l2")
    assert torch.all(l2.norm(dim=-1) <= 0.3 + 1e-6)
    linf = project(d, 0.3, "token-linf")
    assert linf.abs().max() <= 0.3 and torch.equal(linf, d.clamp(-0.3, 0.3))
    small = d * 1e-3
    assert torch.equal(project(small, 0.3, "token-l2"), small)  # inside: unchanged


@pytest.mark.parametrize("norm", ["token-l2", "token-linf"])
def test_one_step_from_zero_reaches_each_tokens_relative_radius(norm):
    # η = ε, scale = each token's norm: one step puts every unmasked token on its own sphere ε·‖e_t‖
    grad = torch.randn(2, 4, 3)
    emb = torch.randn(2, 4, 3) * torch.tensor([0.1, 1.0, 10.0, 100.0]).view(1, 4, 1)
    scale = unit_norm(emb, norm)
    d = normalized_ascent_step(torch.zeros(2, 4, 3), grad, 0.2, 0.2, _mask(), norm=norm, scale=scale)
    got = unit_norm(d, norm).squeeze(-1)
    want = (0.2 * scale.squeeze(-1)) * _mask()
    assert torch.allclose(got, want, rtol=1e-5)
    if norm == "token-linf":  # the steepest L∞ ascent is the gradient's sign
        assert torch.equal(d[0].sign(), grad[0].sign())


@pytest.mark.parametrize("norm", ["token-l2", "token-linf"])
def test_random_start_inside_each_token_ball(norm):
    g = torch.Generator().manual_seed(0)
    d = random_start((2, 4, 3), 0.2, _mask(), generator=g, norm=norm)
    n = unit_norm(d, norm).squeeze(-1)
    assert torch.all(n <= 0.2 + 1e-7) and torch.all(n[_mask().bool()] > 0) and torch.all(d[1, 2:] == 0)


def test_smart_matches_mt_dnn_on_a_linear_loss():
    # loss(δ) = <w, δ>: with no noise, mt-dnn's step is v = η·w, then v / (max_h |v| + 1e-6) per token
    w = torch.randn(2, 4, 3)
    d = smart_perturbation(lambda x: (w * x).sum(), (2, 4, 3), _mask(), noise_var=0.0, step_size=1e-3, steps=1)
    v = 1e-3 * w
    expected = v / (v.abs().amax(-1, keepdim=True) + SMART_STABILISER) * _mask().unsqueeze(-1)
    assert torch.allclose(d, expected, atol=1e-7)
    # with the paper's (1e-5, 1e-3), every token ends at max|δ| ≈ 1 whatever the gradient's scale (H = 64: the max
    # of 64 draws of N(0, 1e-5²) is ~2.4e-5, so max|δ| ≈ 2.4e-5 / (2.4e-5 + 1e-6))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 4, 64)
    d = smart_perturbation(lambda x: (1e-9 * w * x).sum(), (2, 4, 64), _mask(), 1e-5, 1e-3, generator=g)
    linf = unit_norm(d, "token-linf").squeeze(-1)
    assert torch.all(linf[_mask().bool()] > 0.9) and torch.all(linf <= 1.0) and torch.all(d[1, 2:] == 0)


def test_smart_noise_then_k_steps_and_l2_level():
    g = torch.Generator().manual_seed(0)
    calls = []

    def loss_fn(x):
        calls.append(1)
        return (x**2).sum()

    d = smart_perturbation(loss_fn, (2, 4, 3), _mask(), 1e-2, 1.0, steps=3, norm="token-l2", generator=g)
    assert len(calls) == 3  # no clean-graph shortcut: the start is noise
    n = d.norm(dim=-1)[_mask().bool()]
    assert torch.allclose(n, torch.ones_like(n), atol=1e-4)


def test_random_signs_keep_every_norm_and_lose_the_direction():
    # cosine = sum(s_i d_i^2) / sum(d_i^2) with random signs s_i: std sqrt(3 / N) = 0.0068 for N = 65,536, so the
    # bound below sits 7 standard deviations out (a bound of 0.05 on 4,096 coordinates failed ~6% of draws)
    d = torch.randn(4, 64, 256, generator=torch.Generator().manual_seed(1))
    r = random_signs(d, torch.Generator().manual_seed(0))
    for norm in ("example-l2", "token-l2", "token-linf"):
        assert torch.allclose(unit_norm(r, norm), unit_norm(d, norm))
    cosine = (r * d).sum() / (r.norm() * d.norm())
    assert abs(cosine) < 0.05
