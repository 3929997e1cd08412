"""`cr_dpll`: consistency regularisation for deep partial-label learning (Wu, Wang and Zhang, ICML 2022,
"Revisiting Consistency Regularization for Deep Partial Label Learning").

Per step, three views of each row: one weak (crop + flip) and two strong (+ RandAugment + Cutout).
- Supervised term on the weak view: L_sup = −Σ_{j∉S} log(1 − p_j), pushing mass off the non-candidates.
- Consistency term: Σ over the three views of KL(s ‖ p_view), where s is the row's label estimate.
- Label disambiguation after every step (no gradient): s_j ∝ y_j · (Π_views p_j)^(1/3), the normalised
  geometric mean of the views' predictions restricted to the candidates; s starts uniform over S.
- L = L_sup + λ(t) · consistency, λ(t) = λ · min(t / T_ramp, 1) with t in fractional epochs.

Defaults: λ = `--cr-dpll-lambda` 1.0 (paper); T_ramp = `--cr-dpll-rampup` epochs, 0 = half the run (the
paper ramps over 100 of 200 epochs); TrainConfig's SGD and cosine LR. Trusted rows have a one-hot set, so
their estimate stays their label. Non-candidate mass is what this method penalises hardest, so a true
label outside S (a noisy partial label) is pushed down: the failure mode Co-Reg's Table 1 shows for it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.baselines.single import Batch, Confidence, SingleNet, partial_labels, uniform_over, view
from pipeline.errors import CoregError
from pipeline.training import Context, steps_per_epoch

_EPS = 1e-7  # inside log(1 − p): p rounds to 1 in float32 long before the loss is useless


def complementary_loss(logits: Tensor, cand: Tensor) -> Tensor:
    """mean_i −Σ_{j∉S_i} log(1 − p_ij + eps)."""
    p = logits.float().softmax(dim=1)  # (B, C)
    return -((1.0 - cand) * torch.log1p(-p + _EPS)).sum(dim=1).mean()


def consistency_loss(logits_views: list[Tensor], target: Tensor) -> Tensor:
    """Σ_views mean_i KL(s_i ‖ p_view,i); 0·log 0 = 0."""
    ent = torch.xlogy(target, target).sum(dim=1)  # (B,)
    return sum((ent - (target * z.float().log_softmax(dim=1)).sum(dim=1)).mean() for z in logits_views)


def conformal_label(logits_views: list[Tensor], cand: Tensor) -> Tensor:
    """(B, C) s ∝ y · exp(mean_views log p): the candidate-restricted geometric mean, rows summing to 1."""
    logp = torch.stack([z.detach().float().log_softmax(dim=1) for z in logits_views]).mean(dim=0)  # (B, C)
    s = logp.masked_fill(cand <= 0, float("-inf")).softmax(dim=1)  # normalising exp(·) over S
    return s


class CRDPLL(SingleNet):
    name = "cr_dpll"

    def __init__(self, cfg, *, num_classes, make_net, num_rows):
        super().__init__(cfg, num_classes=num_classes, make_net=make_net, num_rows=num_rows)
        self.conf = Confidence(num_rows, num_classes)

    def extra_modules(self):
        return {"confidence": self.conf}

    def begin_epoch(self, epoch: int, ctx: Context) -> None:
        self.cand = partial_labels(ctx)  # (N, C)
        self.conf.init_once(uniform_over(self.cand))
        self.steps = steps_per_epoch(ctx.n, batch_size=self.cfg.batch_size, world=ctx.dist.world)

    def weight(self, t: float) -> float:
        ramp = self.cfg.cr_dpll_rampup or max(self.cfg.epochs / 2, 1e-8)
        return self.cfg.cr_dpll_lambda * min(t / ramp, 1.0)

    def step(self, ctx: Context, batch: Batch, epoch: int):
        b = batch.loc.numel()
        x = torch.cat([view(ctx, batch, "w"), view(ctx, batch, "s", 0), view(ctx, batch, "s", 1)])  # (3b, ...)
        with ctx.autocast():
            logits = self.wrapped(x).float()  # (3b, C) one pass for the three views
        views = list(logits.split(b))
        cand = self.cand[batch.loc]  # (b, C)
        sup = complementary_loss(views[0], cand)
        cons = consistency_loss(views, self.conf.values[batch.loc])
        lam = self.weight(epoch + batch.step / max(self.steps, 1))
        loss = sup + lam * cons
        ctx.backward(loss)
        self.conf.write(ctx, batch, conformal_label(views, cand))
        return {"loss": loss.detach(), "sup": sup.detach(), "consistency": cons.detach()}

    def end_epoch(self, epoch: int, ctx: Context):
        return self.conf.diag_accuracy(ctx)


def build(cfg, *, num_classes: int, make_net, num_rows: int) -> CRDPLL:
    if cfg.cr_dpll_lambda < 0 or cfg.cr_dpll_rampup < 0:
        raise CoregError("--cr-dpll-lambda and --cr-dpll-rampup must not be negative")
    return CRDPLL(cfg, num_classes=num_classes, make_net=make_net, num_rows=num_rows)
