"""Shared class prototypes O (C, D) in the embedding space (coreg-method.md §3.5, paper Eq. 10, §6.10).

Per iteration, every P-batch sample with embedding z and class c = argmax p̃ updates o_c ← γ o_c + (1−γ) z,
in batch order (γ = proto_m = 0.999); then every row is L2-normalised. Both networks share one instance.

The per-sample loop is replaced by its exact closed form: if class c receives n_c samples z_1..z_n in that
order, the sequence ends at
    o_c ← γ^n o_c + Σ_k (1−γ) γ^(n−k) z_k,
so one scatter-add over the batch gives the same result as the loop (up to float rounding), with no Python
loop over samples. Normalisation happens once after the batch, as in the code.

The module knows nothing of distribution: in a multi-process run the loop passes the gathered batch in rank
order, which is the order a single process would have used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Prototypes(nn.Module):
    """Buffer `prototypes` (C, D), zeros at the start (§3.5)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.register_buffer("prototypes", torch.zeros(num_classes, dim))  # (C, D)

    @torch.no_grad()
    def update(self, z: Tensor, labels: Tensor, *, momentum: float = 0.999) -> None:
        """Sequential-EMA-equivalent update with embeddings z (B, D) of classes `labels` (B,), then L2-norm.

        Classes absent from the batch keep their (renormalised) prototype; zero rows stay zero.
        """
        protos = self.prototypes
        c = protos.shape[0]
        z = z.detach().to(protos.dtype)  # (B, D) autocast may hand in bf16
        labels = labels.to(protos.device).long()  # (B,)
        one_hot = F.one_hot(labels, c)  # (B, C)
        # k_i: 1-based position of sample i among the samples of its class, in batch order.
        rank = one_hot.cumsum(dim=0).gather(1, labels[:, None]).squeeze(1)  # (B,)
        count = one_hot.sum(dim=0)  # (C,) n_c
        # γ^e is computed as a float power of the buffer's dtype (no float64: MPS lacks it); pow is accurate
        # to about one ulp, far below the EMA's own rounding. torch.full, not torch.tensor: a fill on the
        # device, where torch.tensor would copy a host number over and wait for the device.
        gamma = torch.full((), momentum, dtype=protos.dtype, device=protos.device)
        weight = (1 - gamma) * gamma.pow((count[labels] - rank).to(protos.dtype))  # (B,) (1−γ) γ^(n−k)
        decay = gamma.pow(count.to(protos.dtype))  # (C,) γ^n_c, 1 for absent classes
        added = torch.zeros_like(protos).index_add_(0, labels, z * weight[:, None])  # (C, D)
        updated = protos * decay[:, None] + added  # (C, D)
        # F.normalize divides by max(‖o‖, eps): a zero row stays exactly zero.
        protos.copy_(F.normalize(updated, dim=1))
