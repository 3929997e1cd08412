"""Mixup of the self-training batch (code-only, coreg-method.md §3.4; DivideMix-style).

λ ~ Beta(α, α) with α = 4 (§4), folded to λ = max(λ, 1 − λ) so every mixed row stays closer to its own
sample (its own target keeps the larger weight). The whole P+U batch is permuted, so P and U rows mix.

Randomness is counter-based (pipeline/training.py): λ must be a function of the generator the loop hands
in. torch's Beta/Gamma samplers take no generator, so λ is drawn by inversion: one uniform number u from the
generator, then λ = F⁻¹(u) with F the Beta(α, α) CDF (`scipy.special.betaincinv`). That is an exact Beta
draw and deterministic given the generator's state. λ is a host number (it scales tensors as a Python float),
so the generator is a host one (`Context.rng_pair`): a draw on the device would be read back at every step,
a host-device sync.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sample_lambda(alpha: float, generator: torch.Generator) -> float:
    """λ = max(λ, 1 − λ), λ ~ Beta(α, α), from one uniform draw of `generator` (inverse CDF), a CPU generator."""
    from scipy.special import betaincinv

    if alpha <= 0:
        raise ValueError(f"mixup alpha must be > 0, got {alpha}")
    if generator.device.type != "cpu":
        raise ValueError(f"sample_lambda needs a CPU generator (Context.rng_pair), got one on {generator.device}: "
                         "reading a device draw on the host waits for the device")
    u = torch.rand((), generator=generator, dtype=torch.float64).item()  # a host tensor: no device involved
    lam = float(betaincinv(alpha, alpha, u))
    return max(lam, 1.0 - lam)


def mixup(x: Tensor, targets: Tensor, *, lam: float, perm: Tensor) -> tuple[Tensor, Tensor]:
    """x_mix = λ x + (1 − λ) x[perm], t_mix = λ t + (1 − λ) t[perm]; x (B, ...) float, targets (B, C).

    The loss functions need the unmixed pair too: targets_a = targets, targets_b = targets[perm].
    """
    x_mix = lam * x + (1.0 - lam) * x[perm]  # (B, ...)
    t_mix = lam * targets + (1.0 - lam) * targets[perm]  # (B, C)
    return x_mix, t_mix
