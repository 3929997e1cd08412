"""What a training method (Co-Reg or a baseline) gets from the loop, and what it gives back.

The loop (`stages/train.py`) owns Accelerate, the data on the device, checkpoints and logging. A method owns
its networks, optimisers and per-epoch logic. The two meet through `Context` (data + a `Dist` of plain
callables) and the `Method` protocol, so the method code imports neither accelerate nor datasets.

Randomness is *counter-based*: every random draw comes from `ctx.rng(...)`, a generator seeded from
(seed, keys...) such as (epoch, step, net, view). A run therefore does not depend on the RNG state left by
earlier epochs (resume is exact), and every process draws the same numbers for the *global* batch and takes
its own rows (a 2-process run equals a 1-process run on batch-independent architectures).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed from a base seed and any keys; stable across runs, processes and Python versions."""
    h = hashlib.blake2b(repr((seed, *keys)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


@dataclass
class Dist:
    """The distributed world as plain callables (identity functions for one process).

    `gather(t)`: concatenate a tensor's rows from every process in rank order, no gradient.
    `gather_grad(t)`: the same, but gradients flow back to each process's own rows.
    `all_reduce_sum(t)`: elementwise sum over processes.
    `broadcast(t)`: rank 0's values of `t` on every process (in place; returns `t`).
    """

    rank: int = 0
    world: int = 1
    gather: Callable[[Tensor], Tensor] = lambda t: t
    gather_grad: Callable[[Tensor], Tensor] = lambda t: t
    all_reduce_sum: Callable[[Tensor], Tensor] = lambda t: t
    broadcast: Callable[[Tensor], Tensor] = lambda t: t

    def rows(self, n: int) -> slice:
        """This process's share of a global batch of n rows (n must be divisible by world)."""
        assert n % self.world == 0, f"global batch {n} not divisible by {self.world} processes"
        per = n // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def shard(self, n: int) -> range:
        """This process's rows of a pass over all n rows (division, test, evaluate): contiguous blocks of
        ceil(n / world) rows in rank order, disjoint and covering 0..n-1; the last blocks may be short or
        empty. The one place this arithmetic lives; `gather_shards` undoes it."""
        per = -(-n // self.world)
        return range(min(self.rank * per, n), min((self.rank + 1) * per, n))

    def gather_shards(self, t: Tensor, n: int) -> Tensor:
        """All n rows, in order, of a per-row tensor of which each process holds its `shard(n)` rows.

        The gather needs equal shapes, so every block is padded to ceil(n / world) rows; since only the blocks
        after the last full one are short, the first n gathered rows are exactly rows 0..n-1.
        """
        per = -(-n // self.world)
        pad = t.new_zeros((per - t.shape[0], *t.shape[1:]))
        return self.gather(torch.cat([t, pad]))[:n]


def sync_buffers(module: nn.Module, dist: Dist) -> None:
    """Give every process rank 0's buffers of `module` (BatchNorm running statistics, above all).

    Without DDP (gradients are all-reduced by hand, pipeline/accel.py) nothing else does this: each process's
    BatchNorm tracks the statistics of its own rows, so an eval-mode pass would use different statistics on
    each rank, and a division or test pass assembled from the ranks' shards would mix several networks. Call
    it on every process, at the same point, before each eval-mode pass whose results are gathered (DDP's
    `broadcast_buffers` does the same before every forward). Rank 0's buffers are also the ones saved.
    One broadcast per dtype; a no-op on one process.
    """
    if dist.world == 1:
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for b in module.buffers():
        by_dtype.setdefault(b.dtype, []).append(b)
    for dtype, bufs in by_dtype.items():
        flat = torch.cat([b.detach().reshape(-1) for b in bufs])
        if dtype == torch.bool:  # gloo cannot broadcast bools (e.g. a queue's confidence flags)
            flat = dist.broadcast(flat.to(torch.uint8)).bool()
        else:
            flat = dist.broadcast(flat)
        offset = 0
        for b in bufs:
            b.data.copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()


@dataclass
class Context:
    """Everything a method needs for one run. Tensors live on `device`; every process holds all rows."""

    images: Tensor  # (N, 3, H, W) uint8, training images at training resolution
    candidates: Tensor  # (N, C) bool, candidate sets (empty rows allowed)
    trusted: Tensor  # (N,) bool, rows whose label training may use
    trusted_label: Tensor  # (N,) long, the label on trusted rows, -1 elsewhere
    vlm_probs: Tensor  # (N, C) float, annotator distribution
    vlm_pred: Tensor  # (N,) long, annotator's top-1
    augment: Any  # pipeline.augment.BatchAugment
    dist: Dist
    seed: int
    device: torch.device
    backward: Callable[[Tensor], None] = lambda loss: loss.backward()
    autocast: Callable[[], AbstractContextManager] = nullcontext
    progress: Callable[[Iterator, int, str], Iterator] = lambda it, total, desc: it
    diag_label: Tensor | None = None  # (N,) long, ground truth for DIAGNOSTICS ONLY (-1 unknown); never train on it
    extra: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return self.candidates.shape[1]

    def rng(self, *keys: int | str) -> torch.Generator:
        """A generator on `device` seeded from (seed, keys): the same on every process."""
        g = torch.Generator(device=self.device)
        g.manual_seed(derive_seed(self.seed, *keys))
        return g

    def cpu_rng(self, *keys: int | str) -> torch.Generator:
        """The same seed as `rng(*keys)`, on the host: for draws whose values the host needs."""
        g = torch.Generator()
        g.manual_seed(derive_seed(self.seed, *keys))
        return g

    def rng_pair(self, *keys: int | str) -> tuple[torch.Generator, torch.Generator]:
        """(host, device) generators of one key. A value the host needs (mixup's λ) is drawn from the first, so
        reading it never waits for the device; tensors for the device are drawn from the second. On a CPU run
        both are one generator: the draws follow each other in one stream, as from `rng(*keys)` alone."""
        host = self.cpu_rng(*keys)
        return host, (host if self.device.type == "cpu" else self.rng(*keys))


class Method(Protocol):
    """A training method. Built by its module's `build(cfg_dict, num_classes=..., make_net=...)`."""

    name: str

    def modules(self) -> dict[str, nn.Module]:
        """Every network (and momentum copy) to move to the device and checkpoint, by name."""

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Every optimiser, by name (checkpointed)."""

    def prepare(self, prepare: Callable[..., Any]) -> None:
        """Hand the trainable networks and their optimisers to `prepare` (accelerator.prepare: device
        placement, DDP, mixed precision) and keep the returned wrappers for the gradient forward passes.
        The raw modules (from `modules()`) stay in use for no-grad forwards and for state dicts."""

    def train_epoch(self, epoch: int, ctx: Context) -> dict[str, float]:
        """One epoch. Returns the epoch's metrics: each loss term, and method-specific counts."""

    def predict_logits(self, x: Tensor, which: str = "default") -> Tensor:
        """Logits on normalised images; `which` = default | ensemble | net1 | net2."""

    def extra_state(self) -> dict[str, Tensor]:
        """Tensors besides modules/optimisers that a resume needs (prototypes, queues, loss history)."""

    def load_extra_state(self, state: dict[str, Tensor]) -> None: ...

    def prediction_weights(self) -> dict[str, Tensor]:
        """Weights for model.safetensors: keys `net1.<param>` (and `net2.<param>` for two-network methods)."""


def iterate_batches(
    index: Tensor, *, batch_size: int, generator: torch.Generator, dist: Dist, drop_last: bool = False
) -> Iterator[tuple[Tensor, Tensor, slice]]:
    """Shuffle the global row ids `index` and yield (global_batch, local_batch, rows) per step.

    Every process draws the same permutation and takes its `rows` of each global batch. The global batch is
    rounded down to a multiple of the world size. The final short batch is kept (the paper's loaders keep
    it), trimmed to a multiple of the world size so every process gets the same count; `drop_last` skips it.
    """
    n = index.numel()
    b = _global_batch(n, batch_size, dist.world)
    order = index[torch.randperm(n, generator=generator, device=generator.device).to(index.device)]
    for start in range(0, n, b):
        batch = order[start : start + b]
        if batch.numel() < b and drop_last and start > 0:
            break
        batch = batch[: (batch.numel() // dist.world) * dist.world]
        if batch.numel() == 0:
            break
        rows = dist.rows(batch.numel())
        yield batch, batch[rows], rows


def _global_batch(n: int, batch_size: int, world: int) -> int:
    return max(world, (min(batch_size, n) // world) * world)


def steps_per_epoch(n: int, *, batch_size: int, world: int, drop_last: bool = False) -> int:
    """The number of batches `iterate_batches` yields for n rows."""
    b = _global_batch(n, batch_size, world)
    full, rest = divmod(n, b)
    last = 1 if (rest // world) * world > 0 and not (drop_last and full > 0) else 0
    return full + last


def make_sgd(cfg, net: nn.Module) -> torch.optim.Optimizer:
    """The optimiser of every method (Co-Reg's, method §4), so the comparison changes only the learner."""
    return torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def add_terms(sums: dict[str, Tensor], terms: dict[str, Tensor], keys: tuple[str, ...] | None = None) -> None:
    """Add one step's loss terms (0-dim tensors; `keys` of them, or all) to `sums`, on the device.

    Reading each term on the host (`float(t)`) every step would wait for the device every step; the sums
    are read once, by `mean_over`, at the end of the epoch. They are float64, so they hold exactly the values
    the Python-float sums did: every float32 term converts exactly, and each addition rounds the same way.
    """
    for k in terms if keys is None else keys:
        if k in terms:
            v = terms[k].detach().to(torch.float64)
            sums[k] = sums[k] + v if k in sums else v


def mean_over(sums: dict[str, Tensor], steps: int, ctx: Context) -> dict[str, float]:
    """Per-step means of this process's summed loss terms (`add_terms`), averaged over processes (every row
    counted once). One host read for all of them."""
    if not sums:
        return {}
    keys = sorted(sums)
    v = ctx.dist.all_reduce_sum(torch.stack([sums[k].to(ctx.device) for k in keys]))  # (T,) float64
    return {k: x / max(steps, 1) / ctx.dist.world for k, x in zip(keys, v.tolist(), strict=True)}


def cosine_lr(epoch: float, *, lr: float, min_ratio: float, period: int) -> float:
    """Cosine from lr to lr*min_ratio over `period` epochs (the paper's code: period 800, min_ratio 1e-3)."""
    eta_min = lr * min_ratio
    t = min(epoch, period) / max(period, 1)
    return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * t)) / 2


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr
