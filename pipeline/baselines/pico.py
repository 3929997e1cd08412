"""`pico`: contrastive label disambiguation with class prototypes (Wang, Xiao, Li, Feng, Niu, Chen and Zhao,
ICLR 2022, "PiCO: Contrastive Label Disambiguation for Partial Label Learning").

Per step, a weak view (query) and a strong view (key) of each row:
- classifier loss: −Σ_j s_j log p_j(x_weak), with s the row's label estimate (uniform over S at the start);
- pseudo-label of each row: argmax over the candidates of the classifier's p (no gradient);
- prototypes: per-class EMA of the query embeddings under those pseudo-labels (momentum 0.99, rows
  L2-normalised), and prototype scores softmax(z · Oᵀ), taken BEFORE this step's update;
- contrastive loss: SupCon over [queries, momentum-encoder keys, queue] with the pseudo-labels as classes,
  temperature 0.07; before `--pico-prot-start` the only positive of a row is its own key (MoCo-style);
- label disambiguation (from `--pico-prot-start` on): s ← φ s + (1 − φ) onehot(argmax_{j∈S} score_j), with φ
  going linearly from 0.95 to 0.8 over the run.
L = L_cls + 0.5 · L_cont.

Reused Co-Reg pieces: `Prototypes` (vectorised sequential EMA), `FeatureQueue` (keys + labels, masked
unfilled slots), `momentum_update`, and `noisy_contrastive_loss(mode="supcon")`, which is PiCO's SupCon.

Defaults (paper / its public settings): pico_prot_start 1, pico_loss_weight 0.5, pico_proto_m 0.99,
pico_conf_ema_start 0.95 → pico_conf_ema_end 0.8; shared with Co-Reg's config: queue_size 8192, moco_m 0.999,
cont_t 0.07, proj_dim 128, SGD and cosine LR (PiCO used weight decay 1e-3; here TrainConfig's 5e-4 for all
methods). Trusted rows keep their one-hot label as s.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.baselines.single import (
    Batch,
    Confidence,
    SingleNet,
    partial_labels,
    soft_ce,
    uniform_over,
    view,
)
from pipeline.coreg.losses import noisy_contrastive_loss
from pipeline.coreg.prototypes import Prototypes
from pipeline.coreg.queue import FeatureQueue, momentum_update
from pipeline.errors import CoregError
from pipeline.training import Context

# Temperature of the prototype scores. PiCO uses 1 (only the argmax matters there); ALIM's "scale" variant
# needs a peaked distribution and uses its vMF concentration 0.07 (ALIM code `--vMF`). 0.07 for both: the
# argmax, hence PiCO, does not depend on it.
PROTO_SCORE_T = 0.07


class PiCO(SingleNet):
    name = "pico"

    def __init__(self, cfg, *, num_classes, make_net, num_rows):
        super().__init__(cfg, num_classes=num_classes, make_net=make_net, num_rows=num_rows)
        self.key = copy.deepcopy(self.net).requires_grad_(False)  # momentum encoder, starts equal
        self.queue = FeatureQueue(cfg.queue_size, cfg.proj_dim, num_classes)
        self.protos = Prototypes(num_classes, cfg.proj_dim)
        self.conf = Confidence(num_rows, num_classes)

    def extra_modules(self):
        return {"net1_key": self.key, "net1_queue": self.queue, "prototypes": self.protos, "confidence": self.conf}

    def begin_epoch(self, epoch: int, ctx: Context) -> None:
        self.cand = partial_labels(ctx)  # (N, C)
        self.conf.init_once(uniform_over(self.cand))
        c = self.cfg
        self.phi = c.pico_conf_ema_start + (c.pico_conf_ema_end - c.pico_conf_ema_start) * epoch / max(c.epochs, 1)

    # --- hooks ALIM overrides ------------------------------------------------------------------------
    def label_weights(self, cand: Tensor, trusted: Tensor) -> Tensor:
        """(b, C) multiplier of the scores before the argmax: PiCO restricts to the candidates."""
        return cand

    def disambiguate(self, scores: Tensor, weights: Tensor) -> Tensor:
        """(b, C) new label target from prototype scores: one-hot of the best allowed class."""
        return F.one_hot((scores * weights).argmax(dim=1), scores.shape[1]).float()

    def extra_terms(self, ctx: Context, batch: Batch, x_weak: Tensor, probs: Tensor, scores: Tensor, cand: Tensor):
        """Additional named loss terms (already weighted) for this step; PiCO has none."""
        return {}

    # --- one step ------------------------------------------------------------------------------------
    def step(self, ctx: Context, batch: Batch, epoch: int):
        cfg, dist, dev = self.cfg, ctx.dist, ctx.device
        n = batch.n
        x_q, x_k = view(ctx, batch, "w"), view(ctx, batch, "s")  # (b, 3, H, W) each
        with ctx.autocast():
            logits, q = self.wrapped(x_q, with_embedding=True)  # (b, C), (b, D)
        logits, q = logits.float(), q.float()
        cand = self.cand[batch.loc]  # (b, C)
        weights = self.label_weights(cand, ctx.trusted[batch.loc])
        probs = logits.detach().softmax(dim=1)  # (b, C)
        pseudo = (probs * weights).argmax(dim=1)  # (b,)
        scores = (q.detach() @ self.protos.prototypes.T / PROTO_SCORE_T).softmax(dim=1)  # (b, C) before update
        self.protos.update(dist.gather(q.detach()), dist.gather(pseudo), momentum=cfg.pico_proto_m)

        with torch.no_grad():
            momentum_update(self.key, self.net, m=cfg.moco_m)
            with ctx.autocast():
                _, k = self.key(x_k, with_embedding=True)  # (b, D)
            k = k.float()
        q_all, k_all, lab_all = dist.gather_grad(q), dist.gather(k), dist.gather(pseudo)  # global batch
        q_keys, q_labels, _, q_valid = self.queue.contents()
        if epoch >= cfg.pico_prot_start:
            labels = torch.cat([lab_all, lab_all, q_labels.argmax(dim=1)])
        else:  # instance discrimination: every row its own class, its key the only positive
            ids = torch.arange(n, device=dev)
            labels = torch.cat([ids, ids, n + torch.arange(self.queue.size, device=dev)])
        feats = torch.cat([q_all, k_all, q_keys.detach()])  # (2n + K, D)
        valid = torch.cat([torch.ones(2 * n, dtype=torch.bool, device=dev), q_valid])
        anchor = torch.arange(n, device=dev)[batch.rows]  # this process's queries in the contrast set
        cont = noisy_contrastive_loss(
            q, feats, labels, torch.ones_like(labels, dtype=torch.bool),
            anchor_labels=labels[anchor], anchor_conf=torch.ones_like(anchor, dtype=torch.bool),
            self_index=anchor, own_key_index=anchor + n, valid=valid, temperature=cfg.cont_t, mode="supcon",
        )
        self.queue.enqueue(k_all, F.one_hot(lab_all, self.C).float(), torch.ones_like(lab_all, dtype=torch.bool))

        if epoch >= cfg.pico_prot_start:  # disambiguation first, then the loss uses the new estimate (PiCO)
            new = self.phi * self.conf.values[batch.loc] + (1 - self.phi) * self.disambiguate(scores, weights)
            self.conf.write(ctx, batch, new)
        cls = soft_ce(logits, self.conf.values[batch.loc])
        extra = self.extra_terms(ctx, batch, x_q, probs, scores, cand)
        loss = cls + cfg.pico_loss_weight * cont + sum(extra.values())
        ctx.backward(loss)
        return {"loss": loss.detach(), "cls": cls.detach(), "cont": cont.detach(), **{k: v.detach() for k, v in extra.items()}}

    def end_epoch(self, epoch: int, ctx: Context):
        return self.conf.diag_accuracy(ctx)


def check(cfg) -> None:
    if not 0 <= cfg.pico_proto_m < 1 or not 0 <= cfg.pico_conf_ema_start <= 1 or not 0 <= cfg.pico_conf_ema_end <= 1:
        raise CoregError("--pico-proto-m must be in [0, 1) and --pico-conf-ema-start/end in [0, 1]")
    if cfg.pico_loss_weight < 0 or cfg.pico_prot_start < 0:
        raise CoregError("--pico-loss-weight and --pico-prot-start must not be negative")


def build(cfg, *, num_classes: int, make_net, num_rows: int) -> PiCO:
    check(cfg)
    return PiCO(cfg, num_classes=num_classes, make_net=make_net, num_rows=num_rows)
