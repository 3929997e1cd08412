"""`cc`: classifier-consistent partial-label learning (Feng, Lv, Han, Xu, Niu, Geng, An and Sugiyama,
NeurIPS 2020, "Provably Consistent Partial-Label Learning").

Loss: −log Σ_{j∈S} p_j(x), the negative log of the probability the network puts on the candidate set (the
paper's CC estimator under uniform candidate generation). It is exactly Co-Reg's warm-up partial CE
(`pipeline.coreg.losses.partial_ce`, eps 1e-5), which also skips rows whose set is all classes (no
information; here also the rows whose set is empty).

Defaults: weak augmentation, TrainConfig's SGD and cosine LR, one pass over all rows per epoch.
"""

from __future__ import annotations

from pipeline.baselines.single import Batch, SingleNet, partial_labels, view
from pipeline.coreg.losses import partial_ce
from pipeline.training import Context


class ClassifierConsistent(SingleNet):
    name = "cc"

    def begin_epoch(self, epoch: int, ctx: Context) -> None:
        self.cand = partial_labels(ctx)  # (N, C)

    def step(self, ctx: Context, batch: Batch, epoch: int):
        x = view(ctx, batch, "w")
        with ctx.autocast():
            logits = self.wrapped(x).float()  # (b, C)
        loss = partial_ce(logits, self.cand[batch.loc])
        ctx.backward(loss)
        return {"loss": loss.detach()}


def build(cfg, *, num_classes: int, make_net, num_rows: int) -> ClassifierConsistent:
    return ClassifierConsistent(cfg, num_classes=num_classes, make_net=make_net, num_rows=num_rows)
