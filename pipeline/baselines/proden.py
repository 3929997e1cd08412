"""`proden`: progressive identification of true labels (Lv, Xu, Feng, Niu, Geng and Sugiyama, ICML 2020,
"Progressive Identification of True Labels for Partial-Label Learning").

Each row keeps weights w over its candidates, initialised uniform. The loss is the w-weighted cross-entropy
−Σ_j w_j log p_j(x); after every step the batch's weights are replaced by the network's confidence
re-normalised over the candidates, w_j = p_j y_j / Σ_k p_k y_k (computed from the same forward pass, no
gradient). Trusted rows have a one-hot set, so their weight stays their label.

Defaults: weak augmentation, TrainConfig's SGD and cosine LR, one pass over all rows per epoch.
"""

from __future__ import annotations

import torch

from pipeline.baselines.single import (
    Batch,
    Confidence,
    SingleNet,
    partial_labels,
    soft_ce,
    uniform_over,
    view,
)
from pipeline.coreg.division import masked_scores
from pipeline.training import Context


def proden_update(logits: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """New weights (B, C): softmax re-normalised over the candidates (paper Eq. 9; = Co-Reg's Eq. 5)."""
    return masked_scores(logits.detach().float().softmax(dim=1), cand)


class Proden(SingleNet):
    name = "proden"

    def __init__(self, cfg, *, num_classes, make_net, num_rows):
        super().__init__(cfg, num_classes=num_classes, make_net=make_net, num_rows=num_rows)
        self.conf = Confidence(num_rows, num_classes)

    def extra_modules(self):
        return {"confidence": self.conf}

    def begin_epoch(self, epoch: int, ctx: Context) -> None:
        self.cand = partial_labels(ctx)  # (N, C)
        self.conf.init_once(uniform_over(self.cand))

    def step(self, ctx: Context, batch: Batch, epoch: int):
        x = view(ctx, batch, "w")
        with ctx.autocast():
            logits = self.wrapped(x).float()  # (b, C)
        loss = soft_ce(logits, self.conf.values[batch.loc])
        ctx.backward(loss)
        self.conf.write(ctx, batch, proden_update(logits, self.cand[batch.loc]))
        return {"loss": loss.detach()}

    def end_epoch(self, epoch: int, ctx: Context):
        return self.conf.diag_accuracy(ctx)


def build(cfg, *, num_classes: int, make_net, num_rows: int) -> Proden:
    return Proden(cfg, num_classes=num_classes, make_net=make_net, num_rows=num_rows)
