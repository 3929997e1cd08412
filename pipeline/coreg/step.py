"""One Co-Reg training step for one network (method §3.3–§3.7), and one warm-up step (§3.1).

Distribution: every process holds its own rows of the global batch. Everything that couples rows (mixup
partners, prototype updates, the contrast set, the queue) is built on the *canonical global batch*
[P view 1, P view 2, U view 1, U view 2] gathered from all processes, so a 2-process step computes the same
numbers as a 1-process step (with a batch-independent architecture). Per-row loss means are taken over this
process's rows; gradient averaging over processes then gives the global mean because every process holds
the same number of rows of each block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.coreg.losses import (
    balanced_scores,
    disambiguated_targets,
    noisy_contrastive_loss,
    prior_penalty,
    prototype_loss,
    ranked_warmup_loss,
    self_training_loss,
    warmup_loss,
)
from pipeline.coreg.mixup import mixup, sample_lambda
from pipeline.coreg.prototypes import Prototypes
from pipeline.coreg.pseudo_labels import align, labeled_targets, unlabeled_targets
from pipeline.coreg.queue import FeatureQueue, momentum_update
from pipeline.training import Context


@dataclass(frozen=True)
class StepParams:
    """The scalars one step needs (built from TrainConfig by method.py)."""

    k_views: int
    sharpen_t: float
    mixup_alpha: float
    lambda_u: float  # already ramped for this step
    proto_m: float
    proto_t: float
    cont_t: float
    moco_m: float
    lambda_proto: float
    lambda_cont: float
    representation: bool  # epoch > warmup + start_cont: add the prototype and contrastive terms
    co_pseudo_labels: bool
    prototypes: bool
    contrast: str
    prior_penalty: float = 0.0  # not in the paper: DivideMix's prior penalty (anti-collapse), 0 = off
    prior: Tensor | None = None  # (C,) its class prior; None = uniform (DivideMix)
    class_floor: float = 0.0  # --class-floor (not in any paper): the penalty only lifts classes under floor/C
    weak_mix: bool = False  # --mix-views weak (not in the paper): self-training and contrastive views are weak
    align_self: Tensor | None = None  # --align-targets (not in the paper): (C,) prior / own mean prediction
    align_partner: Tensor | None = None  # the same for the partner's U guess


@dataclass
class StepNets:
    """The trained network B (wrapped for gradients and raw for no-grad), its momentum copy and queue,
    the partner A (raw, eval mode), and the shared prototypes."""

    net: nn.Module
    raw: nn.Module
    key: nn.Module
    queue: FeatureQueue
    partner: nn.Module
    prototypes: Prototypes


def _soft(net: nn.Module, x: Tensor, embed: bool = False):
    out = net(x, with_embedding=embed)
    if embed:
        return out[0].float().softmax(1), out[1].float()
    return out.float().softmax(1)


def _gather_blocks(ctx: Context, *blocks: Tensor, grad: bool = False) -> Tensor:
    """Gather each block from every process (rank order = global batch order) and concatenate the blocks."""
    g = ctx.dist.gather_grad if grad else ctx.dist.gather
    return torch.cat([g(b) for b in blocks])


def coreg_step(
    ctx: Context,
    nets: StepNets,
    hp: StepParams,
    *,
    p_idx: Tensor,  # (bp,) this process's P rows (dataset indices)
    u_idx: Tensor,  # (bu,) this process's U rows
    n_p: int,  # global P batch size
    n_u: int,  # global U batch size
    p_w: Tensor,  # (bp,) partner's clean probability of the P rows (1 on trusted rows)
    p_scores: Tensor,  # (bp, C) partner's candidate-masked scores (one-hot on trusted rows)
    p_self_scores: Tensor,  # (bp, C) own masked scores (used only without co-pseudo-labels)
    p_self_w: Tensor,  # (bp,) own clean probability (used only without co-pseudo-labels)
    keys: tuple,  # counter-RNG keys identifying this step: (epoch, net, step)
) -> dict[str, Tensor]:
    aug, dev = ctx.augment, ctx.device
    rows_p, rows_u = ctx.dist.rows(n_p), ctx.dist.rows(n_u)
    x_p, x_u = ctx.images[p_idx], ctx.images[u_idx]  # (bp,3,H,W), (bu,3,H,W) uint8

    def view(x, n, rows, kind, *k):
        params = (aug.sample_weak if kind == "w" else aug.sample_strong)(n, ctx.rng(*keys, kind, *k))
        return (aug.apply_weak if kind == "w" else aug.apply_strong)(x, aug.select(params, rows))

    # --- co-pseudo-labels (§3.3): K weak views, no gradient; partner in eval mode ---
    with torch.no_grad(), ctx.autocast():
        pw = [view(x_p, n_p, rows_p, "w", "p", k) for k in range(hp.k_views)]
        uw = [view(x_u, n_u, rows_u, "w", "u", k) for k in range(hp.k_views)]
        self_p, z_p = _soft(nets.raw, pw[0], embed=True)  # (bp,C), (bp,D): z of weak view 1 feeds the prototypes
        self_p = align((self_p + sum(_soft(nets.raw, v) for v in pw[1:])) / hp.k_views, hp.align_self)  # (bp, C)
        if hp.co_pseudo_labels:
            t_p = labeled_targets(p_scores, p_w, self_p, T=hp.sharpen_t)  # (bp, C)
        else:  # "w/o Co-PL": the network labels itself with its own division
            t_p = labeled_targets(p_self_scores, p_self_w, self_p, T=hp.sharpen_t)
        if u_idx.numel():
            self_u = align(sum(_soft(nets.raw, v) for v in uw) / hp.k_views, hp.align_self)  # (bu, C)
            part_u = align(sum(_soft(nets.partner, v) for v in uw) / hp.k_views, hp.align_partner)
            t_u = unlabeled_targets(self_u, part_u, T=hp.sharpen_t, co=hp.co_pseudo_labels)
        else:
            t_u = t_p.new_zeros((0, t_p.shape[1]))

    # --- prototypes (§3.5): updated from P's weak-view embeddings before the loss, on every process alike ---
    if hp.prototypes:
        nets.prototypes.update(ctx.dist.gather(z_p), ctx.dist.gather(t_p.argmax(1)), momentum=hp.proto_m)

    # --- self-training with mixup over the canonical global batch (§3.4) ---
    # 2 strong views (paper), or 2 weak ones with keys apart from the co-pseudo-label views above
    kind, tag = ("w", ("mix",)) if hp.weak_mix else ("s", ())
    ps = [view(x_p, n_p, rows_p, kind, "p", *tag, k) for k in range(2)]
    us = [view(x_u, n_u, rows_u, kind, "u", *tag, k) for k in range(2)]
    x_all = _gather_blocks(ctx, ps[0], ps[1], us[0], us[1])  # (2n_p + 2n_u, 3, H, W)
    t_all = _gather_blocks(ctx, t_p, t_p, t_u, t_u)  # (2n_p + 2n_u, C)
    g_host, g_dev = ctx.rng_pair(*keys, "mixup")
    lam = sample_lambda(hp.mixup_alpha, g_host)  # a host float: drawn on the host, never read from the device
    perm = torch.randperm(x_all.shape[0], generator=g_dev, device=g_dev.device).to(dev)
    x_mix, t_mix = mixup(x_all, t_all, lam=lam, perm=perm)
    mine = torch.cat(
        [torch.arange(n_p, device=dev)[rows_p], n_p + torch.arange(n_p, device=dev)[rows_p],
         2 * n_p + torch.arange(n_u, device=dev)[rows_u], 2 * n_p + n_u + torch.arange(n_u, device=dev)[rows_u]]
    )  # positions of this process's rows in the canonical batch
    n_lab = 2 * p_idx.numel()
    with ctx.autocast():
        logits, emb = nets.net(x_mix[mine], with_embedding=True)  # (m, C), (m, D)
    logits, emb = logits.float(), emb.float()
    terms = self_training_loss(logits, t_mix[mine], n_labeled=n_lab, lambda_u=hp.lambda_u)
    loss = terms["loss"]
    out = {"l_x": terms["l_x"].detach(), "l_u": terms["l_u"].detach()}
    if hp.prior_penalty > 0:  # over the global mixed batch, so every process adds the same term
        pen = prior_penalty(ctx.dist.gather_grad(logits.softmax(dim=1)), prior=hp.prior, floor=hp.class_floor)
        loss = loss + hp.prior_penalty * pen
        out["prior"] = pen.detach()

    if hp.prototypes:
        pt = prototype_loss(
            emb, nets.prototypes.prototypes.detach(), t_all[mine], t_all[perm[mine]],
            lam=lam, n_labeled=n_lab, temperature=hp.proto_t,
        )
        out["proto"] = pt["loss"].detach()
        if hp.representation:
            loss = loss + hp.lambda_proto * pt["loss"]

    # --- noisy supervised contrastive learning with a momentum encoder and queue (§3.6) ---
    # Before the representation terms start (§3.7) the loss is only logged: no graph for this forward.
    with torch.set_grad_enabled(hp.representation), ctx.autocast():
        _, q = nets.net(torch.cat([ps[0], us[0]]), with_embedding=True)  # (bp+bu, D) first strong views
    q = q.float()
    with torch.no_grad():
        momentum_update(nets.key, nets.raw, m=hp.moco_m)
        with ctx.autocast():
            _, k = nets.key(torch.cat([ps[1], us[1]]), with_embedding=True)  # (bp+bu, D)
        k = k.float()
    bp = p_idx.numel()
    q_all = _gather_blocks(ctx, q[:bp], q[bp:], grad=hp.representation)  # (n_p+n_u, D), canonical order [P; U]
    k_all = _gather_blocks(ctx, k[:bp], k[bp:])
    lab_all = _gather_blocks(ctx, t_p, t_u)  # (n_p+n_u, C)
    conf_all = torch.cat([torch.ones(n_p, dtype=torch.bool, device=dev), torch.zeros(n_u, dtype=torch.bool, device=dev)])
    q_keys, q_labels, q_conf, q_valid = nets.queue.contents()
    feats = torch.cat([q_all, k_all, q_keys.detach()])  # contrast set [q, k, queue]
    labels = torch.cat([lab_all.argmax(1), lab_all.argmax(1), q_labels.argmax(1)])
    conf = torch.cat([conf_all, conf_all, q_conf])
    valid = torch.cat([torch.ones(2 * (n_p + n_u), dtype=torch.bool, device=dev), q_valid])
    anchor_pos = torch.cat([torch.arange(n_p, device=dev)[rows_p], n_p + torch.arange(n_u, device=dev)[rows_u]])
    cont = noisy_contrastive_loss(
        q, feats, labels, conf,
        anchor_labels=labels[anchor_pos], anchor_conf=conf[anchor_pos],
        self_index=anchor_pos, own_key_index=anchor_pos + (n_p + n_u),
        valid=valid, temperature=hp.cont_t, mode=hp.contrast,
    )
    out["cont"] = cont.detach()
    if hp.representation:
        loss = loss + hp.lambda_cont * cont
    nets.queue.enqueue(k_all, lab_all, conf_all)

    ctx.backward(loss)
    out["loss"] = loss.detach()
    out["targets_p"] = t_p
    out["targets_u"] = t_u
    return out


def warmup_step(
    ctx: Context, net: nn.Module, *, idx: Tensor, n: int, candidates: Tensor, keys: tuple, targets: Tensor | None = None,
    with_net: str = "", net_weight: float = 1.0, class_floor: float = 0.0,
) -> dict[str, Tensor]:
    """§3.1: partial cross-entropy + negative entropy on a strong view of every row. Returns the terms and
    the softmax outputs. (The code also writes these into its distribution-alignment buffer; here DA uses
    the whole division pass instead, see method.py, so they are returned for callers that want them.)
    With `targets` (N, C) (`--warmup-loss vlm`, not in the paper) the loss is the soft CE to targets[idx], on
    a weak view. `with_net` (`--warmup-loss vlm-net` / `vlm-net-soft`, not in the paper): the targets are
    first multiplied by the network's own (detached) softmax on the same view, class-balanced over the global
    batch and raised to `net_weight` (0 -> 1 over the warm-up), and renormalised inside the set, then made
    one-hot on the top (`hard`, ties uniform) or kept soft (`soft`): `disambiguated_targets`. Without the
    balance and the ramp an untrained network's favourite classes win every near-tied set at the first steps
    and the warm-up collapses to 2 classes within one epoch (bench/results/accuracy_notes.md §10)."""
    aug = ctx.augment
    if targets is not None:  # the ranked warm-up trains on weak views, like the kd baseline
        params = aug.select(aug.sample_weak(n, ctx.rng(*keys, "w")), ctx.dist.rows(n))
        x = aug.apply_weak(ctx.images[idx], params)
    else:
        params = aug.select(aug.sample_strong(n, ctx.rng(*keys, "s")), ctx.dist.rows(n))
        x = aug.apply_strong(ctx.images[idx], params)
    with ctx.autocast():
        logits = net(x).float()  # (b, C)
    if targets is not None:  # every process holds the same number of rows: the local mean averages right
        t = targets[idx]
        if with_net:
            q = F.softmax(logits.detach(), 1)  # (b, C)
            mean = ctx.dist.all_reduce_sum(q.sum(0)) / n  # (C,) the global batch's mean prediction
            q = balanced_scores(q, mean, floor=class_floor) ** net_weight  # class-balanced (DA), ramped in
            t = disambiguated_targets(t, q, hard=with_net == "hard")
        terms = ranked_warmup_loss(logits, t)
        ctx.backward(terms["loss"])
        return {**{k: v.detach() for k, v in terms.items()}, "probs": F.softmax(logits.detach(), 1)}
    cand = candidates[idx]  # (b, C)
    terms = warmup_loss(logits, cand)
    # partial_ce averages over the rows it keeps (not all-class, not empty); with several processes the kept
    # counts differ, so rescale this process's mean to (its sum) / (global kept count / world): after gradient
    # averaging that is the global mean, exactly as one process would compute it.
    kept = (cand.any(1) & ~cand.all(1)).sum().float()
    scale = kept * ctx.dist.world / ctx.dist.all_reduce_sum(kept.clone()).clamp_min(1)
    terms["partial_ce"] = terms["partial_ce"] * scale
    terms["loss"] = terms["partial_ce"] + terms["neg_entropy"]
    ctx.backward(terms["loss"])
    return {**{k: v.detach() for k, v in terms.items()}, "probs": F.softmax(logits.detach(), 1)}
