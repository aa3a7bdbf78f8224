"""Projected gradient ascent for the adversarial perturbation δ on the student's embedding output.

    delta = pga_perturbation(loss_fn, shape, mask, epsilon=1e-5, step_size=1e-3, steps=1, init_grad=g0)

``loss_fn(delta) -> scalar`` runs the student with ``delta`` added to its embedding output and returns the loss to
maximise. Gradients are taken with ``torch.autograd.grad`` with respect to ``delta`` only, so no parameter ``.grad``
is written and no optimizer/loss-scaler state is touched. δ is kept in fp32 and returned detached.

Norms are per example, over all non-padding positions and the hidden dimension: ‖δ_b‖₂ ≤ ε, δ = 0 on padding.
"""

from typing import Callable, Optional

import torch

_TINY = 1e-20


def per_example_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of each example. x: [B, ...] -> [B]."""
    return x.flatten(1).norm(dim=1)


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def project_l2_ball(delta: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Project each example of delta onto {‖δ_b‖₂ ≤ ε}. delta: [B, T, H]."""
    norm = per_example_norm(delta)
    scale = torch.clamp(epsilon / (norm + _TINY), max=1.0)
    return delta * _expand(scale, delta)


def normalized_ascent_step(
    delta: torch.Tensor, grad: torch.Tensor, step_size: float, epsilon: float, mask: torch.Tensor
) -> torch.Tensor:
    """One step of normalised L2 ascent, then projection. delta, grad: [B, T, H]; mask: [B, T].

    A non-finite gradient for an example (fp16 overflow) gives that example no step rather than a NaN δ.
    """
    m = mask.to(grad.dtype).unsqueeze(-1)
    grad = grad * m
    finite = torch.isfinite(grad.flatten(1)).all(dim=1)
    grad = torch.where(_expand(finite, grad), grad, torch.zeros_like(grad))
    direction = grad / _expand(per_example_norm(grad) + _TINY, grad)
    return project_l2_ball(delta + step_size * direction, epsilon) * m


def random_start(
    shape, epsilon: float, mask: torch.Tensor, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """A point drawn uniformly from each example's ε-ball restricted to its non-padding positions (fp32)."""
    m = mask.to(torch.float32).unsqueeze(-1)
    d = torch.randn(shape, generator=generator, device=mask.device) * m
    dims = (mask.to(torch.float32).sum(1) * shape[-1]).clamp_min(1.0)  # number of free coordinates per example
    u = torch.rand(shape[0], generator=generator, device=mask.device)
    radius = epsilon * u.pow(1.0 / dims)
    return d / _expand(per_example_norm(d) + _TINY, d) * _expand(radius, d)


def pga_perturbation(
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    shape,
    mask: torch.Tensor,
    epsilon: float,
    step_size: float,
    steps: int = 1,
    init_grad: Optional[torch.Tensor] = None,
    random_init: bool = False,
    generator: Optional[torch.Generator] = None,
    loss_scale: float = 1.0,
) -> torch.Tensor:
    """K steps of projected normalised gradient ascent on ``loss_fn`` from δ₀ = 0 (or a random point in the ball).

    init_grad: the gradient of the loss at δ = 0, when the caller already has it (the clean forward holds it); it
        replaces the first forward/backward. Ignored with ``random_init``.
    loss_scale: multiplies the loss before differentiation (the step is normalised, so only the direction matters);
        use > 1 under fp16 so small gradients do not underflow.
    Returns δ: [B, T, H] fp32, detached.
    """
    if random_init:
        delta = random_start(shape, epsilon, mask, generator)
        init_grad = None
    else:
        delta = torch.zeros(shape, dtype=torch.float32, device=mask.device)
    for k in range(steps):
        if k == 0 and init_grad is not None:
            grad = init_grad.float()
        else:
            d = delta.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(loss_fn(d) * loss_scale, d)
        delta = normalized_ascent_step(delta.detach(), grad.float(), step_size, epsilon, mask)
    return delta.detach()
