"""MoCo pieces of the noisy contrastive loss (coreg-method.md §3.6, §6.11): the FIFO feature queue and the
momentum (key) encoder updates.

The queue (8192 × 128 in §4, one per network, persisting across epochs) stores each key with its soft
pseudo-label and a confidence flag (True = from P). The code starts from random vectors and random flags;
here unfilled slots are instead marked invalid by `contents()` (and hold zero keys, uniform labels and
False flags), so they never enter the loss (§6.11).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FeatureQueue(nn.Module):
    """FIFO ring of keys (K, D), soft labels (K, C) and confidence flags (K,), with `ptr` and `filled`."""

    def __init__(self, size: int, dim: int, num_classes: int):
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be ≥ 1, got {size}")
        self.register_buffer("keys", torch.zeros(size, dim))  # (K, D)
        self.register_buffer("labels", torch.full((size, num_classes), 1.0 / num_classes))  # (K, C)
        self.register_buffer("conf", torch.zeros(size, dtype=torch.bool))  # (K,)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # next slot to write
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))  # slots ever written, ≤ K

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: Tensor, labels: Tensor, conf: Tensor) -> None:
        """Append a batch in order, overwriting the oldest entries; keys (B, D), labels (B, C), conf (B,).

        Wraps around the end of the ring. If B ≥ K only the last K rows survive, as they would after
        pushing the batch one row at a time. `ptr` and `filled` stay on the device and are advanced there:
        reading them on the host (`int(self.ptr)`) would wait for the device at every step.
        """
        k, b = self.size, keys.shape[0]
        if b == 0:
            return
        start = self.ptr  # () long, on the device
        if b > k:  # the first b − k rows would be overwritten within this same batch
            start = (start + (b - k)) % k
            keys, labels, conf = keys[-k:], labels[-k:], conf[-k:]
        n = keys.shape[0]
        idx = (start + torch.arange(n, device=self.keys.device)) % k  # (n,) distinct slots since n ≤ K
        self.keys[idx] = keys.detach().to(self.keys)
        self.labels[idx] = labels.detach().to(self.labels)
        self.conf[idx] = conf.detach().to(self.conf.device).bool()
        self.ptr.copy_((start + n) % k)
        self.filled.copy_((self.filled + b).clamp_max(k))

    def contents(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(keys (K, D), labels (K, C), conf (K,) bool, valid (K,) bool); only written slots are valid.

        Slots are written from 0 upward until the ring is full, so the valid ones are [0, filled).
        """
        valid = torch.arange(self.size, device=self.keys.device) < self.filled  # (K,)
        return self.keys, self.labels, self.conf, valid


def _check_pairs(target: nn.Module, source: nn.Module, kind: str) -> list[tuple[Tensor, Tensor]]:
    """(target tensor, source tensor) pairs by name; every target name must exist in the source."""
    src = dict(source.named_parameters() if kind == "parameters" else source.named_buffers())
    tgt = target.named_parameters() if kind == "parameters" else target.named_buffers()
    pairs = []
    for name, t in tgt:
        if name not in src:
            raise KeyError(f"{kind[:-1]} {name!r} of the key encoder has no counterpart in the query encoder")
        s = src[name]
        if t.shape != s.shape:
            raise ValueError(f"{kind[:-1]} {name!r}: key shape {tuple(t.shape)} ≠ query {tuple(s.shape)}")
        pairs.append((t, s))
    return pairs


@torch.no_grad()
def momentum_update(target: nn.Module, source: nn.Module, *, m: float) -> None:
    """θ_k ← m θ_k + (1 − m) θ_q on parameters (moco_m = 0.999, §3.6); buffers copied from the source.

    Names are matched; the source may have extra entries (e.g. heads the key encoder lacks).
    """
    for t, s in _check_pairs(target, source, "parameters"):
        t.mul_(m).add_(s.detach().to(t.dtype), alpha=1.0 - m)
    for t, s in _check_pairs(target, source, "buffers"):
        t.copy_(s)


@torch.no_grad()
def copy_weights(target: nn.Module, source: nn.Module) -> None:
    """θ_k ← θ_q for every parameter and buffer (code-only per-epoch re-sync of the key encoder, §3.6)."""
    for kind in ("parameters", "buffers"):
        for t, s in _check_pairs(target, source, kind):
            t.copy_(s)
