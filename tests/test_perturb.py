import torch

from ad2_ds.perturb import normalized_ascent_step, per_example_norm, pga_perturbation, project_l2_ball, random_start


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
