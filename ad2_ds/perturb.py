"""The adversarial perturbation δ on the student's embeddings: projected gradient ascent, SMART, and a control.

    delta = pga_perturbation(loss_fn, shape, mask, epsilon=1e-5, step_size=1e-3, steps=1, init_grad=g0)
    delta = pga_perturbation(loss_fn, shape, mask, 0.1, 0.1, norm="token-l2", scale=token_norms)  # ε·‖e_t‖ per token
    delta = smart_perturbation(loss_fn, shape, mask, noise_var=1e-5, step_size=1e-3, steps=1)     # mt-dnn's SMART
    delta = random_signs(delta)                                                                   # the control

``loss_fn(delta) -> scalar`` runs the student with ``delta`` added to its embeddings and returns the loss to maximise.
Gradients are taken with ``torch.autograd.grad`` with respect to ``delta`` only, so no parameter ``.grad`` is written
and no optimizer/loss-scaler state is touched. δ is kept in fp32, zero on padding, and returned detached.

Norms (``norm``), each bounding δ by ε (times ``scale`` when given):

- ``"example-l2"``: ‖δ_b‖₂ over every non-padding position and the hidden dimension (the paper as written). One ball
  per sentence gives each token about ε/√T: the effective radius depends on length and width.
- ``"token-l2"``: ‖δ_{b,t}‖₂ per token; ``"token-linf"``: max_h |δ_{b,t,h}| per token (FreeLB's and SMART's choice).

``scale`` ([B, 1, 1] for example-l2, [B, T, 1] per token) multiplies both ε and η: pass the clean embeddings' norms in
the same norm to make the radius relative (``‖δ_t‖ ≤ ε·‖e_t‖``), the same on every input whatever its length, width or
LayerNorm gain.
"""

from typing import Callable, Optional

import torch

_TINY = 1e-20
NORMS = ("example-l2", "token-l2", "token-linf")
SMART_STABILISER = 1e-6  # mt-dnn's adv_epsilon: added to the norm SMART divides by


def per_example_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of each example. x: [B, ...] -> [B]."""
    return x.flatten(1).norm(dim=1)


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def unit_norm(x: torch.Tensor, norm: str) -> torch.Tensor:
    """The norm of x that ``norm`` bounds, broadcastable to x: [B, 1, 1] for example-l2, [B, T, 1] per token."""
    if norm == "example-l2":
        return _expand(per_example_norm(x), x)
    if norm == "token-l2":
        return x.norm(dim=-1, keepdim=True)
    if norm == "token-linf":
        return x.abs().amax(dim=-1, keepdim=True)
    raise ValueError(f"unknown perturbation norm {norm!r}: choose one of {', '.join(NORMS)}")


def project(delta: torch.Tensor, radius, norm: str = "example-l2") -> torch.Tensor:
    """Project delta ([B, T, H]) onto its ball: radius is a float or a tensor broadcastable like :func:`unit_norm`."""
    if norm == "token-linf":
        radius = torch.as_tensor(radius, dtype=delta.dtype, device=delta.device)
        return torch.maximum(torch.minimum(delta, radius), -radius)
    return delta * torch.clamp(radius / (unit_norm(delta, norm) + _TINY), max=1.0)


def project_l2_ball(delta: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Project each example of delta onto {‖δ_b‖₂ ≤ ε}. delta: [B, T, H]."""
    return project(delta, epsilon, "example-l2")


def ascent_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest-ascent direction of unit size in ``norm``: g/‖g‖₂ (per example or per token), sign(g) for L∞."""
    if norm == "token-linf":
        return grad.sign()
    return grad / (unit_norm(grad, norm) + _TINY)


def normalized_ascent_step(
    delta: torch.Tensor,
    grad: torch.Tensor,
    step_size: float,
    epsilon: float,
    mask: torch.Tensor,
    norm: str = "example-l2",
    scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One step of normalised ascent of size η (·scale), then projection on the ε (·scale) ball.
    delta, grad: [B, T, H]; mask: [B, T].

    A non-finite gradient for an example (fp16 overflow) gives that example no step rather than a NaN δ.
    """
    m = mask.to(grad.dtype).unsqueeze(-1)
    grad = _finite_or_zero(grad * m)
    step, radius = (step_size, epsilon) if scale is None else (step_size * scale, epsilon * scale)
    return project(delta + step * ascent_direction(grad, norm), radius, norm) * m


def _finite_or_zero(grad: torch.Tensor) -> torch.Tensor:
    finite = torch.isfinite(grad.flatten(1)).all(dim=1)
    return torch.where(_expand(finite, grad), grad, torch.zeros_like(grad))


def random_start(
    shape,
    epsilon: float,
    mask: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    norm: str = "example-l2",
    scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """A point drawn uniformly from each ball (per example or per token) restricted to non-padding positions (fp32)."""
    m = mask.to(torch.float32).unsqueeze(-1)
    if norm == "token-linf":
        d = (torch.rand(shape, generator=generator, device=mask.device) * 2 - 1) * epsilon
    else:
        d = torch.randn(shape, generator=generator, device=mask.device) * m
        if norm == "example-l2":
            dims = (mask.to(torch.float32).sum(1) * shape[-1]).clamp_min(1.0)  # free coordinates per example
            u = torch.rand(shape[0], generator=generator, device=mask.device)
            radius = _expand(epsilon * u.pow(1.0 / dims), d)
        else:
            u = torch.rand(*shape[:-1], 1, generator=generator, device=mask.device)
            radius = epsilon * u.pow(1.0 / shape[-1])
        d = d / (unit_norm(d, norm) + _TINY) * radius
    return (d if scale is None else d * scale) * m


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
    norm: str = "example-l2",
    scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """K steps of projected normalised gradient ascent on ``loss_fn`` from δ₀ = 0 (or a random point in the ball).

    init_grad: the gradient of the loss at δ = 0, when the caller already has it (the clean forward holds it); it
        replaces the first forward/backward, and is exact for the clean forward's dropout sample (a separate forward
        in train mode would draw other dropout masks). Ignored with ``random_init``.
    loss_scale: multiplies the loss before differentiation (the step is normalised, so only the direction matters);
        use > 1 under fp16 so small gradients do not underflow.
    norm, scale: the ball's norm and the per-example / per-token factor on ε and η (see the module docstring).
    Returns δ: [B, T, H] fp32, detached.
    """
    if random_init:
        delta = random_start(shape, epsilon, mask, generator, norm, scale)
        init_grad = None
    else:
        delta = torch.zeros(shape, dtype=torch.float32, device=mask.device)
    for k in range(steps):
        if k == 0 and init_grad is not None:
            grad = init_grad.float()
        else:
            d = delta.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(loss_fn(d) * loss_scale, d)
        delta = normalized_ascent_step(delta.detach(), grad.float(), step_size, epsilon, mask, norm, scale)
    return delta.detach()


def smart_perturbation(
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    shape,
    mask: torch.Tensor,
    noise_var: float,
    step_size: float,
    steps: int = 1,
    norm: str = "token-linf",
    generator: Optional[torch.Generator] = None,
    loss_scale: float = 1.0,
) -> torch.Tensor:
    """SMART's perturbation as Microsoft's mt-dnn implements it (``mt_dnn/perturbation.py``, ``SmartPerturbation``).

    δ₀ ~ N(0, noise_var²); then K times: v = δ + η·∇δ loss, δ = v / (‖v‖ + 1e-6) with the norm per token (L∞ by
    default, mt-dnn's ``norm_p="inf"``; ``"token-l2"``, or ``"example-l2"`` for its sentence level). There is no ball:
    the renormalisation leaves δ at size ≈ 1 per token in that norm, whatever noise_var is (at noise_var = 1e-5 and
    η = 1e-3, the paper's ε and η, each token ends with max|δ| ≈ 0.97 at H = 384-768). When η·|∇| is small against
    the noise, δ's direction is the noise's: then SMART is a random perturbation of fixed size, not an adversarial one.
    mt-dnn differentiates a KL summed over the batch (``stable_kl(..., reduce=False)``): pass ``loss_scale`` =
    batch size to a mean loss to match its η·∇ against the noise. A non-finite gradient gives its example δ = 0
    (mt-dnn drops the whole adversarial loss then).
    Returns δ: [B, T, H] fp32, detached, zero on padding.
    """
    m = mask.to(torch.float32).unsqueeze(-1)
    delta = torch.randn(shape, generator=generator, device=mask.device) * noise_var * m
    for _ in range(steps):
        d = delta.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(d) * loss_scale, d)
        finite = _expand(torch.isfinite(grad.flatten(1)).all(dim=1), grad)
        v = delta + step_size * torch.where(finite, grad.float(), torch.zeros_like(grad, dtype=torch.float32))
        delta = torch.where(finite, v / (unit_norm(v, norm) + SMART_STABILISER), torch.zeros_like(v)) * m
    return delta.detach()


def random_signs(delta: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The random-direction control: every coordinate of δ gets an independent random sign. Every norm of δ (per
    example, per token, L2 and L∞) is kept; its direction is lost (cosine to δ ≈ 0)."""
    flip = torch.rand(delta.shape, generator=generator, device=delta.device) < 0.5
    return torch.where(flip, -delta, delta)
