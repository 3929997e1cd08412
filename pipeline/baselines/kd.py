"""`kd`: soft distillation of the annotator's class distribution `vlm_probs` (Hinton, Vinyals and Dean 2015,
"Distilling the Knowledge in a Neural Network"; the KD rows of coreg-method.md §5.1).

Loss: T² · KL(t ‖ softmax(z / T)) with t = softmax(log vlm_probs / T), i.e. teacher and student softened
by the same temperature T (`--kd-t`, default 1: the annotator's own distribution, as the paper's KD uses
CLIP's probabilities). The KL is computed as soft cross-entropy minus the teacher's entropy, so a student
that matches the teacher has loss 0. Trusted rows use their one-hot human label.

Defaults: as `ce` (weak augmentation, TrainConfig's SGD and cosine LR), plus kd_t = 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.baselines.single import Batch, SingleNet, view
from pipeline.coreg.pseudo_labels import sharpen
from pipeline.errors import CoregError
from pipeline.training import Context


def kd_targets(vlm_probs, trusted, trusted_label, *, T: float):
    """(N, C) teacher distribution p^(1/T) / Σ p^(1/T) (= softmax(logits / T)); trusted rows one-hot."""
    t = sharpen(vlm_probs.float().clamp_min(1e-12), T=T)  # clamp: 0^(1/T) rows stay finite
    onehot = F.one_hot(trusted_label.clamp_min(0), t.shape[1]).to(t)
    return torch.where(trusted.bool()[:, None], onehot, t)


def kd_loss(logits, targets, *, T: float):
    """T² · mean_i KL(t_i ‖ softmax(z_i / T)); 0·log 0 = 0."""
    logq = (logits.float() / T).log_softmax(dim=1)  # (B, C)
    kl = (torch.xlogy(targets, targets) - targets * logq).sum(dim=1)  # (B,)
    return T * T * kl.mean()


class Distill(SingleNet):
    name = "kd"

    def begin_epoch(self, epoch: int, ctx: Context) -> None:
        self.targets = kd_targets(ctx.vlm_probs, ctx.trusted, ctx.trusted_label, T=self.cfg.kd_t)  # (N, C)

    def step(self, ctx: Context, batch: Batch, epoch: int):
        x = view(ctx, batch, "w")
        with ctx.autocast():
            logits = self.wrapped(x).float()  # (b, C)
        loss = kd_loss(logits, self.targets[batch.loc], T=self.cfg.kd_t)
        ctx.backward(loss)
        return {"loss": loss.detach()}


def build(cfg, *, num_classes: int, make_net, num_rows: int) -> Distill:
    if cfg.kd_t <= 0:
        raise CoregError(f"--kd-t must be positive, got {cfg.kd_t}")
    return Distill(cfg, num_classes=num_classes, make_net=make_net, num_rows=num_rows)
