"""Co-pseudo-labeling: label fusion across the two networks, then sharpening (coreg-method.md §3.3).

When network B trains with partner A:
- a P row gets p' = w_A · p_A + (1 − w_A) · p̄_B, where p_A is A's candidate-masked, renormalised,
  DA-adjusted score from the division pass (`division.masked_scores`), w_A is A's clean probability and
  p̄_B is B's own prediction averaged over K = 2 weak views (no candidate mask on p̄_B, paper Eq. 6);
- a U row gets p' = (p̄_A + p̄_B) / 2, with no mask (its candidate set is distrusted);
then p̃ = sharpen(p', T = 0.5).

The "w/o Co-PL" ablation (§5.4) replaces the partner's contribution by the trained network's own:
`co=False`.

Trusted (human-labelled) rows need no special case here: the caller gives them w = 1 and a one-hot
`partner_masked` (their label); one-hot rows stay exactly one-hot under sharpening (§6.4).
"""

from __future__ import annotations

from torch import Tensor


def sharpen(p: Tensor, *, T: float) -> Tensor:
    """p̃_j = p_j^{1/T} / Σ_k p_k^{1/T} (§3.3; T = 0.5 in §4). Zeros stay exactly zero."""
    s = p.pow(1.0 / T)  # (B, C)
    return s / s.sum(dim=1, keepdim=True)


def align(p: Tensor, ratio: Tensor | None) -> Tensor:
    """Distribution alignment of a guess (ReMixMatch, Berthelot et al. 2020): p ∝ p · ratio, rows renormalised,
    with ratio = prior / the network's mean prediction (C,). None = unchanged. Used by `--align-targets`."""
    if ratio is None:
        return p
    q = p * ratio  # (B, C)
    return q / q.sum(dim=1, keepdim=True).clamp_min(1e-12)


def labeled_targets(
    partner_masked: Tensor,
    w: Tensor,
    self_mean: Tensor,
    *,
    T: float,
    co: bool = True,
    self_masked: Tensor | None = None,
) -> Tensor:
    """Targets (B, C) for P rows: sharpen(w · masked + (1 − w) · self_mean).

    partner_masked (B, C): the partner's masked score p_A (used when `co`); w (B,): the clean probability
    from the division that produced this split; self_mean (B, C): the trained network's mean over its weak
    views. With `co=False` ("w/o Co-PL") the masked term is the trained network's OWN masked score
    `self_masked` (B, C), which is then required; `partner_masked` is ignored.
    """
    if co:
        masked = partner_masked
    else:
        if self_masked is None:
            raise ValueError("labeled_targets(co=False) needs self_masked, the network's own masked score")
        masked = self_masked
    w = w.to(self_mean.dtype)[:, None]  # (B, 1)
    return sharpen(w * masked + (1.0 - w) * self_mean, T=T)  # (B, C)


def unlabeled_targets(self_mean: Tensor, partner_mean: Tensor, *, T: float, co: bool = True) -> Tensor:
    """Targets (B, C) for U rows: sharpen((p̄_self + p̄_partner) / 2); `co=False` → sharpen(p̄_self)."""
    p = (self_mean + partner_mean) / 2 if co else self_mean  # (B, C)
    return sharpen(p, T=T)
