"""What every baseline shares: the label views of the Context, augmented views of a batch, a per-row
confidence buffer, and `SingleNet`, the Method-protocol plumbing of a one-network learner.

A single-network method writes `net1.*` weights only (the train stage then predicts with net1), so its
model directory is read by `coreg evaluate` exactly like Co-Reg's. Conventions shared with Co-Reg
(pipeline/coreg/method.py): the LR follows `cosine_lr` per epoch with the same TrainConfig knobs; every random
draw comes from `ctx.rng(...)` for the *global* batch and each process takes its rows; losses are means over
this process's rows (DDP averages the gradients); metrics are per-step means over processes, prefixed `net1/`.

Labels (DESIGN.md contract): trusted rows count as clean one-hot labels for every method; a row with an EMPTY
candidate set (the annotator failed) counts as the all-class set, i.e. it carries no partial-label
information (the convention of pipeline/coreg/division.py). `ctx.diag_label` is read only for `diag_*`
metrics, never for training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.training import (
    Context,
    add_terms,
    cosine_lr,
    iterate_batches,
    make_sgd,
    mean_over,
    set_lr,
    steps_per_epoch,
)


# ------------------------------------------------------------------------------------------- label views
def partial_labels(ctx: Context) -> Tensor:
    """(N, C) float 0/1 candidate matrix: trusted rows one-hot, empty rows all ones."""
    cand = ctx.candidates.bool().clone()  # (N, C)
    cand[~cand.any(dim=1)] = True
    t = ctx.trusted.bool()
    if t.any():
        cand[t] = F.one_hot(ctx.trusted_label[t], ctx.num_classes).bool()
    return cand.float()


def hard_labels(ctx: Context) -> Tensor:
    """(N,) long: the annotator's top-1 `vlm_pred`, replaced by the human label on trusted rows."""
    return torch.where(ctx.trusted.bool(), ctx.trusted_label, ctx.vlm_pred).long()


def uniform_over(cand: Tensor) -> Tensor:
    """(N, C) the uniform distribution over each row's candidates (the usual PLL initial confidence)."""
    return cand / cand.sum(dim=1, keepdim=True).clamp_min(1.0)


def soft_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """−mean_i Σ_j t_ij log softmax_ij; targets (B, C) rows summing to 1."""
    return -(targets.float() * logits.float().log_softmax(dim=1)).sum(dim=1).mean()


# --------------------------------------------------------------------------------------------- batches
@dataclass(frozen=True)
class Batch:
    """One step: the global rows, this process's rows and where they sit in the global batch."""

    glob: Tensor  # (n,) dataset rows of the global batch
    loc: Tensor  # (b,) this process's rows
    rows: slice  # loc == glob[rows]
    epoch: int
    step: int

    @property
    def n(self) -> int:
        return self.glob.numel()

    @property
    def keys(self) -> tuple:
        """Counter-RNG keys of this step."""
        return ("step", self.epoch, self.step)


def view(ctx: Context, batch: Batch, kind: str, *k) -> Tensor:
    """A weak ('w') or strong ('s') normalised view (b, 3, H, W) of this process's rows. The params are drawn
    for the global batch from ctx.rng(step keys, kind, *k), then this process's rows are selected."""
    aug = ctx.augment
    sample, apply = (aug.sample_weak, aug.apply_weak) if kind == "w" else (aug.sample_strong, aug.apply_strong)
    params = aug.select(sample(batch.n, ctx.rng(*batch.keys, kind, *k)), batch.rows)
    return apply(ctx.images[batch.loc], params)


def epoch_lr(cfg, epoch: int) -> float:
    return cosine_lr(epoch, lr=cfg.lr, min_ratio=cfg.lr_min_ratio, period=cfg.lr_period or cfg.epochs)


# ---------------------------------------------------------------------------------------- row state
class Confidence(nn.Module):
    """A per-row label distribution (N, C) that a method refines during training (PRODEN, CR-DPLL, PiCO,
    ALIM). Buffers, so the train stage checkpoints it with the method's modules and a resume is exact."""

    def __init__(self, n: int, num_classes: int):
        super().__init__()
        self.register_buffer("values", torch.zeros(n, num_classes))  # (N, C)
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def init_once(self, values: Tensor) -> None:
        if not bool(self.ready):
            self.values.copy_(values)
            self.ready.fill_(True)

    @torch.no_grad()
    def write(self, ctx: Context, batch: Batch, local: Tensor) -> None:
        """Store this process's new rows (b, C); gathered so every process keeps the same full table."""
        self.values[batch.glob] = ctx.dist.gather(local.detach().float().contiguous()).to(self.values)

    def diag_accuracy(self, ctx: Context) -> dict[str, float]:
        """Share of rows whose argmax is the true label (diagnostics only)."""
        if ctx.diag_label is None:
            return {}
        known = ctx.diag_label >= 0
        if not bool(known.any()):
            return {}
        hit = self.values.argmax(dim=1)[known] == ctx.diag_label[known]
        return {"diag_conf_acc": float(hit.float().mean())}


# ------------------------------------------------------------------------------------ single network
class SingleNet:
    """Method-protocol plumbing for one network `net1` trained in passes over all rows.

    A subclass implements `step(ctx, batch, epoch)`: compute the loss on this process's rows, call
    `ctx.backward(loss)` and return the named terms (detached scalars, `loss` among them). Optional hooks:
    `begin_epoch(epoch, ctx)`, `end_epoch(epoch, ctx) -> metrics`, `extra_modules()` (stateful buffers and
    momentum copies to checkpoint).
    """

    name = "single"

    def __init__(self, cfg, *, num_classes: int, make_net: Callable[[], nn.Module], num_rows: int):
        self.cfg, self.C, self.N = cfg, num_classes, num_rows
        self.net = make_net()
        self.wrapped = self.net  # replaced by the prepared (DDP / compiled) wrapper for gradient passes
        self.opt = make_sgd(cfg, self.net)

    # --- Method protocol -------------------------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        return {"net1": self.net, **self.extra_modules()}

    def extra_modules(self) -> dict[str, nn.Module]:
        return {}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"net1": self.opt}

    def prepare(self, prepare) -> None:
        self.wrapped, self.opt = prepare(self.net, self.opt)

    def extra_state(self) -> dict[str, Tensor]:
        return {}  # all state lives in module buffers (extra_modules)

    def load_extra_state(self, state) -> None:
        pass

    def prediction_weights(self) -> dict[str, Tensor]:
        return {f"net1.{k}": v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}

    @torch.no_grad()
    def predict_logits(self, x: Tensor, which: str = "default") -> Tensor:
        if which not in ("default", "net1", "ensemble"):  # an ensemble of one network is that network
            raise ValueError(f"{self.name} trains one network; which must be default, net1 or ensemble, not {which!r}")
        was = self.net.training
        self.net.eval()
        out = self.net(x).float()
        self.net.train(was)
        return out

    # --- epochs ----------------------------------------------------------------------------------------
    def begin_epoch(self, epoch: int, ctx: Context) -> None:
        pass

    def end_epoch(self, epoch: int, ctx: Context) -> dict[str, float]:
        return {}

    def step(self, ctx: Context, batch: Batch, epoch: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def train_epoch(self, epoch: int, ctx: Context) -> dict[str, float]:
        lr = epoch_lr(self.cfg, epoch)
        set_lr(self.opt, lr)
        self.net.train()
        self.begin_epoch(epoch, ctx)
        rows = torch.arange(ctx.n, device=ctx.device)
        total = steps_per_epoch(ctx.n, batch_size=self.cfg.batch_size, world=ctx.dist.world)
        batches = iterate_batches(rows, batch_size=self.cfg.batch_size, generator=ctx.rng("order", epoch), dist=ctx.dist)
        sums: dict[str, Tensor] = {}  # summed on the device, read once after the epoch
        for step, (glob, loc, sl) in enumerate(ctx.progress(batches, total, self.name)):
            self.opt.zero_grad(set_to_none=True)
            out = self.step(ctx, Batch(glob, loc, sl, epoch, step), epoch)
            self.opt.step()
            add_terms(sums, out)
        metrics = {**mean_over(sums, total, ctx), **self.end_epoch(epoch, ctx)}
        return {"lr": lr, **{f"net1/{k}": v for k, v in metrics.items()}}
