"""`ce`: hard distillation, cross-entropy on the annotator's single best label `vlm_pred`.

The "train on the VLM's labels" baseline: standard supervised training that takes every noisy label at face
value, the reference point that noisy-label learners such as DivideMix (Li et al., ICLR 2020) report as
"Cross-Entropy" and the hard-label counterpart of the KD rows in Co-Reg's Table 1 (Wang et al., AAAI 2025;
coreg-method.md §5.1). Trusted rows use their human label.

Defaults: weak augmentation (crop + flip), batch `--batch-size`, SGD and the cosine LR of TrainConfig
(lr 0.01, momentum 0.9, weight decay 5e-4), one pass over all rows per epoch.
"""

from __future__ import annotations

import torch.nn.functional as F

from pipeline.baselines.single import Batch, SingleNet, hard_labels, view
from pipeline.training import Context


class CrossEntropy(SingleNet):
    name = "ce"

    def begin_epoch(self, epoch: int, ctx: Context) -> None:
        self.labels = hard_labels(ctx)  # (N,)

    def step(self, ctx: Context, batch: Batch, epoch: int):
        x = view(ctx, batch, "w")  # (b, 3, H, W)
        with ctx.autocast():
            logits = self.wrapped(x).float()  # (b, C)
        loss = F.cross_entropy(logits, self.labels[batch.loc])
        ctx.backward(loss)
        return {"loss": loss.detach()}


def build(cfg, *, num_classes: int, make_net, num_rows: int) -> CrossEntropy:
    return CrossEntropy(cfg, num_classes=num_classes, make_net=make_net, num_rows=num_rows)
