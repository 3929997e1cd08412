"""Co-Reg (Wang et al., AAAI 2025, "Pre-Trained Vision-Language Models as Noisy Partial Annotators"): the
per-epoch orchestration of shared/docs/coreg-method.md §3.0.

    warm-up epochs: each network alone, partial CE + negative entropy (§3.1)
    later epochs:   re-sync key encoders; divide with both networks (§3.2); train net1 on net2's split and
                    net2 on net1's split (co-division, §3.3–§3.7)

Defaults are the published ones (pipeline/config.py TrainConfig). Deviations, each documented where it
happens: distribution alignment uses the mean over the whole pass rather than a running per-batch buffer
(order-independent, so every process and every resume agrees); the prototype EMA is the vectorised closed
form of the code's sequential update (§6.10); unfilled queue slots are masked instead of random (§6.11).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.coreg.division import (
    LossHistory,
    classwise_clean_prob,
    distribution_align,
    division_loss,
    gmm_clean_prob,
    keep_lost_classes,
    masked_scores,
    minmax,
    prediction_balance,
    split,
)
from pipeline.coreg.losses import annotator_top, ranked_targets, top_targets
from pipeline.coreg.prototypes import Prototypes
from pipeline.coreg.pseudo_labels import sharpen
from pipeline.coreg.queue import FeatureQueue, copy_weights
from pipeline.coreg.step import StepNets, StepParams, coreg_step, warmup_step
from pipeline.training import (
    Context,
    add_terms,
    cosine_lr,
    derive_seed,
    iterate_batches,
    mean_over,
    set_lr,
    steps_per_epoch,
    sync_buffers,
)
from pipeline.two_networks import NETS, TwoNetworks, cycle

# Warm-up losses that use the network's own prediction, with a weight ramped over --warmup-epochs: every warm-up
# step reads --warmup-epochs, so a resume may not change it under these (pipeline/checkpoint.py)
WITH_NET = {"vlm-net": "hard", "vlm-net-soft": "soft", "vlm-hard-net": "soft"}
WARMUP_LOSSES = ("paper", "vlm", "vlm-sharp", "vlm-hard", "vlm-hard-net", "vlm-net", "vlm-net-soft")


def warmup_losses(value: str) -> tuple[str, str]:
    """--warmup-loss as (net1's, net2's): `A` for both, or `A,B` (not in the paper: two warm-ups, so the two
    networks start self-training from different views of the annotation)."""
    parts = value.split(",")
    return (parts[0], parts[-1])


class CoReg(TwoNetworks):
    name = "coreg"

    def __init__(self, cfg, *, num_classes: int, make_net: Callable[[], nn.Module], num_rows: int):
        super().__init__(cfg, num_classes=num_classes, make_net=make_net)
        self.keys = {n: copy.deepcopy(self.raw[n]).requires_grad_(False) for n in NETS}
        self.queues = {n: FeatureQueue(cfg.queue_size, cfg.proj_dim, num_classes) for n in NETS}
        self.history = {n: LossHistory(num_rows, history=cfg.gmm_history) for n in NETS}
        self.protos = Prototypes(num_classes, cfg.proj_dim)
        self.prior: Tensor | None = None  # --prior annotator: set from the data at every epoch (train_epoch)
        self.average_weights(steps_per_epoch(num_rows, batch_size=cfg.batch_size, world=1))  # --ema-epochs

    def modules(self) -> dict[str, nn.Module]:
        mods: dict[str, nn.Module] = {"prototypes": self.protos, **super().modules()}  # the nets and their averages
        for n in NETS:
            mods[f"{n}_key"], mods[f"{n}_queue"], mods[f"{n}_history"] = self.keys[n], self.queues[n], self.history[n]
        return mods

    # --- epochs ----------------------------------------------------------------------------------------
    def train_epoch(self, epoch: int, ctx: Context) -> dict[str, float]:
        cfg = self.cfg
        lr = cosine_lr(epoch, lr=cfg.lr, min_ratio=cfg.lr_min_ratio, period=cfg.lr_period or cfg.epochs)
        for opt in self.opts.values():
            set_lr(opt, lr)
        cand = self._candidates(ctx)
        # --prior annotator (not in any paper): the class shares the annotator's own ranking implies, no balance assumed
        self.prior = ranked_targets(ctx.vlm_probs, cand).mean(0) if cfg.prior == "annotator" else None
        if cfg.prior == "uniform" and cfg.align_targets:
            self.prior = torch.full((self.C,), 1.0 / self.C, device=ctx.device)
        if epoch < cfg.warmup_epochs:
            metrics = {}
            for i, n in enumerate(NETS):
                metrics.update({f"{n}/{k}": v for k, v in self._warmup(epoch, i, n, ctx, cand).items()})
            return {"phase": 0.0, "lr": lr, **metrics}
        for n in NETS:  # code-only: key encoders re-synced at the start of every post-warm-up epoch (§3.6)
            copy_weights(self.keys[n], self.raw[n])
        # --keep-classes (not in any paper): the annotator's single top inside each set, once for both networks
        top = annotator_top(ranked_targets(ctx.vlm_probs, cand)) if cfg.keep_classes > 0 else None
        div = {n: self._divide(epoch, i, n, ctx, cand, top) for i, n in enumerate(NETS)}  # both before training
        metrics = {"phase": 1.0, "lr": lr}
        for i, (n, partner) in enumerate((("net1", "net2"), ("net2", "net1"))):
            m = self._train(epoch, i, n, partner, div[partner], div[n], ctx)
            m.update(prediction_balance(div[n]["counts"]))  # n's own predictions at the division pass
            metrics.update({f"{n}/{k}": v for k, v in m.items()})
        return metrics

    def _candidates(self, ctx: Context) -> Tensor:
        """Trusted rows (a few human labels) count as a one-hot candidate set."""
        cand = ctx.candidates.clone()
        t = ctx.trusted
        if t.any():
            cand[t] = F.one_hot(ctx.trusted_label[t], self.C).bool()
        return cand

    def _warmup(self, epoch, i, n, ctx, cand) -> dict[str, float]:
        net, opt = self.wrapped[n], self.opts[n]
        self.raw[n].train()
        rows = torch.arange(ctx.n, device=ctx.device)
        # --warmup-loss vlm (not in the paper) trains like the kd baseline: batch B on weak views, so at the
        # switch the network has had as many steps as `kd` on the same epochs; paper: batch 2B, strong views
        loss = warmup_losses(self.cfg.warmup_loss)[i]  # `A,B` (not in the paper): net1 warms up with A, net2 with B
        ranked = loss != "paper"  # every other WARMUP_LOSSES entry trains on the annotator's ranking (build() validates)
        bs = self.cfg.batch_size if ranked else 2 * self.cfg.batch_size
        total = steps_per_epoch(ctx.n, batch_size=bs, world=ctx.dist.world)
        sums: dict[str, Tensor] = {}  # loss terms summed on the device, read once after the epoch
        counts = torch.zeros(self.C, device=ctx.device)  # argmax per class over this epoch's (strong) views
        batches = iterate_batches(rows, batch_size=bs, generator=ctx.rng("warm-order", epoch, i), dist=ctx.dist)
        targets = ranked_targets(ctx.vlm_probs, cand) if ranked else None  # (N, C) the annotator's ranking inside the set
        if loss == "vlm-sharp":  # sharpened with the method's own T (§3.3), as every Co-Reg target
            targets = sharpen(targets, T=self.cfg.sharpen_t)
        elif loss in ("vlm-hard", "vlm-hard-net"):  # the annotator's top class inside the set
            targets = top_targets(targets)
        # vlm-net[-soft] (not in the paper): the annotator's ranking times the network's own prediction, per batch;
        # vlm-hard-net: vlm-hard's one-hot targets stay exactly one-hot (x / x = 1), a tied top is shared by the network
        with_net = WITH_NET.get(loss, "")
        for step, (glob, loc, _) in enumerate(ctx.progress(batches, total, f"warm-up {n}")):
            opt.zero_grad(set_to_none=True)
            out = warmup_step(ctx, net, idx=loc, n=glob.numel(), candidates=cand, keys=("warm", epoch, i, step), targets=targets, with_net=with_net,
                              class_floor=self.cfg.class_floor, net_weight=min(1.0, (epoch + step / max(total, 1)) / max(self.cfg.warmup_epochs, 1)))
            opt.step()
            self.update_average(n)
            add_terms(sums, out, ("loss", "partial_ce", "neg_entropy", "soft_ce"))
            counts += F.one_hot(out["probs"].argmax(1), self.C).sum(0)  # bincount would read its max on the host
        return {**mean_over(sums, total, ctx), **prediction_balance(ctx.dist.all_reduce_sum(counts))}

    @torch.no_grad()
    def _divide(self, epoch, i, n, ctx, cand, top=None) -> dict[str, Tensor]:
        """§3.2 eval_train: weak view of every row in eval mode → DA → division loss → history → GMM → split."""
        net, aug, N, dist = self.predictor(n, self.cfg.ema_teach), ctx.augment, ctx.n, ctx.dist  # --ema-teach: the average
        was = net.training
        net.eval()
        params = aug.sample_weak(N, ctx.rng("divide", epoch, i))
        r = dist.shard(N)  # this process's rows of the pass
        mine = torch.arange(r.start, r.stop, device=ctx.device)
        chunks = []
        for c in mine.split(max(1, 4 * self.cfg.batch_size)):
            with ctx.autocast():
                chunks.append(net(aug.apply_weak(ctx.images[c], aug.select(params, c))).float().softmax(1))
        probs = torch.cat(chunks) if chunks else torch.zeros(0, self.C, device=ctx.device)
        probs = dist.gather_shards(probs, N)  # (N, C) rows 0..N-1 in order
        net.train(was)
        raw = probs  # (N, C) before DA: --u-confidence reads its confidence
        counts = torch.bincount(probs.argmax(1), minlength=self.C).float()  # raw predictions, before DA
        mean = probs.mean(0)  # (C,) the network's mean prediction, before DA: --align-targets divides by it
        if self.cfg.dist_align:
            probs = distribution_align(probs, mean_probs=probs.mean(0))
        loss = self.history[n].push(minmax(division_loss(probs, cand)))  # (N,) mean of the last epochs
        # (N, C) candidate-masked scores (trusted rows are one-hot since their set is); --partner-scores vlm (not
        # in the paper): the product of the network and the annotator inside the set, renormalised
        scores = masked_scores(probs * ctx.vlm_probs if self.cfg.partner_scores == "vlm" else probs, cand)
        seed = derive_seed(ctx.seed, "gmm", epoch, i) % 2**32
        if self.cfg.division == "class":  # not in the paper: one GMM per class picked inside the set
            w = torch.as_tensor(classwise_clean_prob(loss.cpu().numpy(), scores.argmax(1).cpu().numpy(), seed=seed))
        else:
            w = torch.as_tensor(gmm_clean_prob(loss.cpu().numpy(), seed=seed))
        p_mask, w = split(w.to(ctx.device).float(), threshold=self.cfg.p_threshold, forced_clean=ctx.trusted)
        kept = 0
        if top is not None:  # --keep-classes, not in any paper: a class this network lost is taught from the annotator
            scores, w, p_mask, kept = keep_lost_classes(scores, w, p_mask, counts, *top, floor=self.cfg.keep_classes)
        return {"w": w, "p": p_mask, "scores": scores, "counts": counts, "mean": mean, "raw": raw, "kept": kept}

    def _train(self, epoch, i, n, partner, div, own, ctx) -> dict[str, float]:
        cfg, dist = self.cfg, ctx.dist
        p_rows = div["p"].nonzero().squeeze(1)
        u_mask = ~div["p"] if cfg.use_unlabeled else torch.zeros_like(div["p"])
        if cfg.u_confidence > 0:  # not in the paper: only the U rows whose co-guess (both networks) is confident
            u_mask = u_mask & ((div["raw"] + own["raw"]).max(1).values / 2 >= cfg.u_confidence)
        u_rows = u_mask.nonzero().squeeze(1)
        w, b = dist.world, cfg.batch_size
        u_cap = b  # the most U rows per step
        if cfg.epoch_steps in ("all", "rows") and p_rows.numel() >= w:  # not in the paper: N/batch steps whatever |P|, so the P loader cycles too
            n_steps = steps_per_epoch(ctx.n, batch_size=b, world=w, drop_last=True)
            p_batch = max(w, (min(b, p_rows.numel()) // w) * w)
            if cfg.epoch_steps == "rows":  # one batch of B rows shared by P and U in proportion to their sizes, so an
                # epoch is one pass over all rows, as ce's (half the rows per step of `all`, whose P and U batches are B each)
                share = p_rows.numel() / max(p_rows.numel() + u_rows.numel(), 1)
                p_batch = min(p_batch, max(w, round(b * share / w) * w))
                u_cap = b - p_batch
            p_cycle = cycle(p_rows, p_batch, ctx, ("p-order", epoch, i))
            batches = ((g, g[dist.rows(g.numel())], None) for g in (next(p_cycle) for _ in range(n_steps)))
        else:  # the paper: one pass over P
            n_steps = steps_per_epoch(p_rows.numel(), batch_size=b, world=w)
            batches = iterate_batches(p_rows, batch_size=b, generator=ctx.rng("p-order", epoch, i), dist=dist)
        u_batch = (min(u_cap, u_rows.numel()) // w) * w  # 0 (empty U batches) when U or the cap is below one row per process
        teacher = self.predictor(partner, cfg.ema_teach)  # --ema-teach: the partner's weight average guesses
        nets = StepNets(self.wrapped[n], self.raw[n], self.keys[n], self.queues[n], teacher, self.protos)
        self.raw[n].train()
        was = teacher.training
        teacher.eval()
        sync_buffers(teacher, dist)  # the partner was just trained: one set of BN statistics on every rank
        u_iter = cycle(u_rows, u_batch, ctx, ("u-order", epoch, i))
        sums: dict[str, Tensor] = {}  # loss terms summed on the device, read once after the epoch
        hits = torch.zeros(4, device=ctx.device)  # pseudo-label correct / total on P, then on U (diagnostics)
        for step, (p_glob, p_loc, _) in enumerate(ctx.progress(batches, n_steps, f"co-reg {n}")):
            u_glob = next(u_iter)
            u_loc = u_glob[dist.rows(u_glob.numel())] if u_glob.numel() else u_glob
            t = epoch + step / max(n_steps, 1)
            hp = self._step_params(epoch, t, own=own, partner=div)
            self.opts[n].zero_grad(set_to_none=True)
            out = coreg_step(
                ctx, nets, hp, p_idx=p_loc, u_idx=u_loc, n_p=p_glob.numel(), n_u=u_glob.numel(),
                p_w=div["w"][p_loc], p_scores=div["scores"][p_loc],
                p_self_scores=own["scores"][p_loc], p_self_w=own["w"][p_loc], keys=("step", epoch, i, step),
            )
            self.opts[n].step()
            self.update_average(n)
            add_terms(sums, out, ("loss", "l_x", "l_u", "proto", "cont", "prior"))
            if ctx.diag_label is not None:
                for j, (rows, tgt) in enumerate(((p_loc, out["targets_p"]), (u_loc, out["targets_u"]))):
                    lab = ctx.diag_label[rows]
                    known = lab >= 0  # a mask, not an index: indexing with it would size the result on the host
                    hits[2 * j] += ((tgt.argmax(1) == lab) & known).sum()
                    hits[2 * j + 1] += known.sum()
        teacher.train(was)
        m = mean_over(sums, n_steps, ctx)
        m.update({"n_p": float(p_rows.numel()), "n_u": float(ctx.n - p_rows.numel()), "n_u_used": float(u_rows.numel()),
                  "mean_w": float(div["w"].mean()), "kept_classes": float(div["kept"])})
        if ctx.diag_label is not None:  # diagnostics only: never used for training or selection
            hits = dist.all_reduce_sum(hits)
            if hits[1] > 0:
                m["diag_pseudo_acc_p"] = float(hits[0] / hits[1])
            if hits[3] > 0:
                m["diag_pseudo_acc_u"] = float(hits[2] / hits[3])
            lab = ctx.diag_label
            known_p = div["p"] & (lab >= 0)
            if known_p.any():
                m["diag_p_valid"] = float(ctx.candidates[known_p, lab[known_p]].float().mean())
        return m

    def _step_params(self, epoch: int, t: float, own: dict | None = None, partner: dict | None = None) -> StepParams:
        cfg = self.cfg
        a_self = a_partner = None
        if cfg.align_targets and own is not None:  # each guess divided by its own network's mean (DA, ReMixMatch)
            a_self = self.prior / own["mean"].clamp_min(1e-12)
            a_partner = self.prior / partner["mean"].clamp_min(1e-12)
        ramp = min(max((t - cfg.warmup_epochs) / max(cfg.rampup_epochs, 1e-8), 0.0), 1.0)  # §3.4 linear ramp
        return StepParams(
            k_views=cfg.k_views, sharpen_t=cfg.sharpen_t, mixup_alpha=cfg.mixup_alpha, lambda_u=cfg.lambda_u * ramp,
            proto_m=cfg.proto_m, proto_t=cfg.proto_t, cont_t=cfg.cont_t, moco_m=cfg.moco_m,
            lambda_proto=cfg.lambda_proto, lambda_cont=cfg.lambda_cont,
            representation=epoch > cfg.warmup_epochs + cfg.start_cont,  # code-only delayed start (§3.7)
            co_pseudo_labels=cfg.co_pseudo_labels, prototypes=cfg.prototypes, contrast=cfg.contrast,
            prior_penalty=cfg.prior_penalty, prior=self.prior, class_floor=cfg.class_floor, weak_mix=cfg.mix_views == "weak",
            align_self=a_self, align_partner=a_partner,
        )


def build(cfg, *, num_classes: int, make_net: Callable[[], nn.Module], num_rows: int) -> CoReg:
    from pipeline.errors import CoregError

    if cfg.contrast not in ("noisy", "supcon"):
        raise CoregError(f"--contrast {cfg.contrast!r} is unknown; choose noisy or supcon")
    for name, allowed in (("division", ("global", "class")), ("epoch_steps", ("p", "all", "rows")), ("partner_scores", ("net", "vlm")), ("mix_views", ("strong", "weak"))):
        if getattr(cfg, name) not in allowed:
            raise CoregError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r} is unknown; choose {' or '.join(allowed)}")
    parts = cfg.warmup_loss.split(",")
    if len(parts) > 2 or any(p not in WARMUP_LOSSES for p in parts):
        raise CoregError(f"--warmup-loss {cfg.warmup_loss!r} is unknown; choose one of {', '.join(WARMUP_LOSSES)}, "
                         "or two of them as A,B (net1 warms up with A, net2 with B)")
    if cfg.ema_teach and not cfg.ema_epochs:
        raise CoregError("--ema-teach needs a weight average to teach with: give --ema-epochs (e.g. 1)")
    if cfg.u_confidence > 0 and not cfg.use_unlabeled:
        raise CoregError("--u-confidence selects rows of U, but U is not trained on (the default preset trains on P only): add --use-unlabeled")
    if cfg.class_floor and cfg.prior == "annotator":
        raise CoregError("--class-floor cuts the uniform prior's pull; --prior annotator has no floor: drop one of them")
    if cfg.prior_penalty < 0:
        raise CoregError(f"--prior-penalty must be 0 (off) or positive, got {cfg.prior_penalty}")
    return CoReg(cfg, num_classes=num_classes, make_net=make_net, num_rows=num_rows)
