"""`dividemix`: learning with noisy labels as semi-supervised learning (Li, Socher and Hoi, ICLR 2020,
"DivideMix: Learning with Noisy Labels as Semi-supervised Learning"), trained on the annotator's top-1 label
`vlm_pred` (the paper's DivideMix rows, coreg-method.md §5.1).

- Warm-up (`--warmup-epochs`): each network alone, cross-entropy on the noisy labels, batch 2 × batch size,
  plus the negative-entropy confidence penalty DivideMix uses for asymmetric (class-dependent) noise, which
  VLM errors are (`--dividemix-conf-penalty`, default on).
- Co-divide, every later epoch: each network, in eval mode on un-augmented images, gives per-row CE losses,
  min-max normalised; a 2-component GMM gives the clean probability w (posterior of the low-loss component);
  P = {w > τ}. Each network trains on its PARTNER's division (both divisions are made before either trains).
- MixMatch step on (P batch, U batch), two weak views each, no gradient for the targets:
  labels refined  p = sharpen(w · onehot(y) + (1 − w) · mean of own 2 views, T), and
  co-guessing     q = sharpen(mean of both networks' 2 views on U, T);
  then mixup of the whole [x1, x2, u1, u2] batch (λ ~ Beta(4, 4), λ = max(λ, 1 − λ));
  L = L_x (soft CE on P rows) + λ_u(t) · L_u (MSE on U rows) + Σ_j π_j log(π_j / p̄_j) (uniform prior π).
- Prediction: the sum of both networks' logits (`--predict-with`, as Co-Reg).

Reused Co-Reg pieces: `gmm_clean_prob`, `minmax`, `split` (division.py); `labeled_targets`,
`unlabeled_targets` (pseudo_labels.py: DivideMix's refinement and co-guessing are Co-Reg's Eq. 6 with the
partner's masked score replaced by the one-hot noisy label); `mixup`, `sample_lambda`; `self_training_loss`
and `negative_entropy` (losses.py).

Defaults (DivideMix's CIFAR settings, shared knobs of TrainConfig): τ = p_threshold 0.5, T = sharpen_t 0.5,
α = mixup_alpha 4, λ_u = `--dividemix-lambda-u` 25 (its code default; it ramps in linearly over
`--rampup-epochs` 16 after warm-up), GMM (max_iter 10, tol 1e-2, reg_covar 5e-4) on the current epoch's
losses only (no history), SGD and cosine LR of TrainConfig. Trusted rows are forced into P with w = 1 and
their human label.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.baselines.single import Batch, epoch_lr, hard_labels, view
from pipeline.coreg.division import gmm_clean_prob, minmax, split
from pipeline.coreg.losses import negative_entropy, prior_penalty, self_training_loss
from pipeline.coreg.mixup import mixup, sample_lambda
from pipeline.coreg.pseudo_labels import labeled_targets, unlabeled_targets
from pipeline.training import (
    Context,
    add_terms,
    derive_seed,
    iterate_batches,
    mean_over,
    set_lr,
    steps_per_epoch,
    sync_buffers,
)
from pipeline.two_networks import NETS, TwoNetworks, cycle


class DivideMix(TwoNetworks):
    name = "dividemix"

    def __init__(self, cfg, *, num_classes: int, make_net, num_rows: int):
        super().__init__(cfg, num_classes=num_classes, make_net=make_net)

    # --- epochs ----------------------------------------------------------------------------------------
    def train_epoch(self, epoch: int, ctx: Context) -> dict[str, float]:
        lr = epoch_lr(self.cfg, epoch)
        for opt in self.opts.values():
            set_lr(opt, lr)
        labels = hard_labels(ctx)  # (N,)
        metrics: dict[str, float] = {"lr": lr, "phase": float(epoch >= self.cfg.warmup_epochs)}
        if epoch < self.cfg.warmup_epochs:
            for i, n in enumerate(NETS):
                metrics.update({f"{n}/{k}": v for k, v in self._warmup(epoch, i, n, ctx, labels).items()})
            return metrics
        div = {n: self._divide(epoch, i, n, ctx, labels) for i, n in enumerate(NETS)}
        for i, (n, partner) in enumerate((("net1", "net2"), ("net2", "net1"))):
            m = self._train(epoch, i, n, partner, div[partner], ctx, labels)
            metrics.update({f"{n}/{k}": v for k, v in m.items()})
        return metrics

    def _warmup(self, epoch: int, i: int, n: str, ctx: Context, labels: Tensor) -> dict[str, float]:
        net, opt, bs = self.wrapped[n], self.opts[n], 2 * self.cfg.batch_size
        self.raw[n].train()
        rows = torch.arange(ctx.n, device=ctx.device)
        total = steps_per_epoch(ctx.n, batch_size=bs, world=ctx.dist.world)
        batches = iterate_batches(rows, batch_size=bs, generator=ctx.rng("warm-order", epoch, i), dist=ctx.dist)
        sums: dict[str, Tensor] = {}  # summed on the device, read once after the epoch
        for step, (glob, loc, sl) in enumerate(ctx.progress(batches, total, f"warm-up {n}")):
            opt.zero_grad(set_to_none=True)
            x = view(ctx, Batch(glob, loc, sl, epoch, step), "w", "warm", i)
            with ctx.autocast():
                logits = net(x).float()  # (b, C)
            ce = F.cross_entropy(logits, labels[loc])
            loss = ce + negative_entropy(logits) if self.cfg.dividemix_conf_penalty else ce
            ctx.backward(loss)
            opt.step()
            add_terms(sums, {"loss": loss, "ce": ce})
        return mean_over(sums, total, ctx)

    @torch.no_grad()
    def _divide(self, epoch: int, i: int, n: str, ctx: Context, labels: Tensor) -> dict[str, Tensor]:
        """Per-row CE of the noisy label on un-augmented images (eval mode) → min-max → GMM → split."""
        net, N, dist = self.raw[n], ctx.n, ctx.dist
        net.eval()
        r = dist.shard(N)  # this process's rows of the pass
        mine = torch.arange(r.start, r.stop, device=ctx.device)
        chunks = []
        for c in mine.split(max(1, 4 * self.cfg.batch_size)):
            with ctx.autocast():
                logits = net(ctx.augment.normalize(ctx.images[c])).float()
            chunks.append(F.cross_entropy(logits, labels[c], reduction="none"))
        loss = torch.cat(chunks) if chunks else torch.zeros(0, device=ctx.device)
        loss = dist.gather_shards(loss, N)  # (N,) rows 0..N-1 in order
        net.train()
        w = gmm_clean_prob(minmax(loss).cpu(), seed=derive_seed(ctx.seed, "gmm", epoch, i) % 2**32)
        p_mask, w = split(torch.as_tensor(w).to(ctx.device).float(), threshold=self.cfg.p_threshold, forced_clean=ctx.trusted)
        return {"w": w, "p": p_mask}

    def _train(self, epoch, i, n, partner, div, ctx: Context, labels: Tensor) -> dict[str, float]:
        cfg, dist = self.cfg, ctx.dist
        p_rows = div["p"].nonzero().squeeze(1)
        u_rows = (~div["p"]).nonzero().squeeze(1)
        n_steps = steps_per_epoch(p_rows.numel(), batch_size=cfg.batch_size, world=dist.world)
        u_batch = (min(cfg.batch_size, u_rows.numel()) // dist.world) * dist.world
        self.raw[n].train()
        self.raw[partner].eval()  # DivideMix: the partner only co-guesses, in eval mode
        sync_buffers(self.raw[partner], ctx.dist)  # the partner was just trained: one set of BN statistics everywhere
        u_iter = cycle(u_rows, u_batch, ctx, ("u-order", epoch, i))
        sums: dict[str, Tensor] = {}  # summed on the device, read once after the epoch
        batches = iterate_batches(p_rows, batch_size=cfg.batch_size, generator=ctx.rng("p-order", epoch, i), dist=dist)
        for step, (pg, pl, ps) in enumerate(ctx.progress(batches, n_steps, f"dividemix {n}")):
            ug = next(u_iter)
            us = dist.rows(ug.numel()) if ug.numel() else slice(0, 0)
            px, ux = Batch(pg, pl, ps, epoch, step), Batch(ug, ug[us], us, epoch, step)
            ramp = min(max((epoch + step / max(n_steps, 1) - cfg.warmup_epochs) / max(cfg.rampup_epochs, 1e-8), 0.0), 1.0)
            self.opts[n].zero_grad(set_to_none=True)
            out = self._step(ctx, n, partner, px, ux, div["w"][pl], labels[pl], cfg.dividemix_lambda_u * ramp, i)
            self.opts[n].step()
            add_terms(sums, out)
        self.raw[partner].train()
        m = mean_over(sums, n_steps, ctx)
        m.update({"n_p": float(p_rows.numel()), "n_u": float(u_rows.numel()), "mean_w": float(div["w"].mean())})
        if ctx.diag_label is not None:  # diagnostics only: how clean is the labeled split this net trained on
            known = div["p"] & (ctx.diag_label >= 0)
            if known.any():
                m["diag_p_clean"] = float((labels[known] == ctx.diag_label[known]).float().mean())
        return m

    def _step(self, ctx, n, partner, px: Batch, ux: Batch, w: Tensor, y: Tensor, lambda_u: float, i: int):
        cfg, dist, dev = self.cfg, ctx.dist, ctx.device
        net, raw, other = self.wrapped[n], self.raw[n], self.raw[partner]
        x1, x2 = view(ctx, px, "w", "p", i, 0), view(ctx, px, "w", "p", i, 1)  # (bp, 3, H, W)
        has_u = ux.n > 0
        u1, u2 = (view(ctx, ux, "w", "u", i, 0), view(ctx, ux, "w", "u", i, 1)) if has_u else (x1[:0], x1[:0])
        with torch.no_grad(), ctx.autocast():
            soft = lambda m, v: m(v).float().softmax(dim=1)  # noqa: E731
            self_x = (soft(raw, x1) + soft(raw, x2)) / 2  # (bp, C)
            t_x = labeled_targets(F.one_hot(y, self.C).float(), w, self_x, T=cfg.sharpen_t)
            if has_u:
                self_u, part_u = (soft(raw, u1) + soft(raw, u2)) / 2, (soft(other, u1) + soft(other, u2)) / 2
                t_u = unlabeled_targets(self_u, part_u, T=cfg.sharpen_t)  # (bu, C)
            else:
                t_u = t_x[:0]
        # Mixup over the canonical global batch [x1; x2; u1; u2] so partners may come from any process.
        x_all = torch.cat([dist.gather(v) for v in (x1, x2, u1, u2)])
        t_all = torch.cat([dist.gather(v) for v in (t_x, t_x, t_u, t_u)])
        g_host, g = ctx.rng_pair(*px.keys, "mixup", i)
        lam = sample_lambda(cfg.mixup_alpha, g_host)  # drawn on the host (no device read)
        perm = torch.randperm(x_all.shape[0], generator=g, device=g.device).to(dev)
        x_mix, t_mix = mixup(x_all, t_all, lam=lam, perm=perm)
        npg, nug = px.n, ux.n
        ar_p, ar_u = torch.arange(npg, device=dev)[px.rows], torch.arange(nug, device=dev)[ux.rows]
        mine = torch.cat([ar_p, npg + ar_p, 2 * npg + ar_u, 2 * npg + nug + ar_u])  # my rows, P part first
        with ctx.autocast():
            logits = net(x_mix[mine]).float()  # (m, C)
        terms = self_training_loss(logits, t_mix[mine], n_labeled=2 * px.loc.numel(), lambda_u=lambda_u)
        penalty = prior_penalty(dist.gather_grad(logits.softmax(dim=1)))
        loss = terms["loss"] + penalty
        ctx.backward(loss)
        return {"loss": loss.detach(), "l_x": terms["l_x"].detach(), "l_u": terms["l_u"].detach(), "penalty": penalty.detach()}


def build(cfg, *, num_classes: int, make_net, num_rows: int) -> DivideMix:
    from pipeline.errors import CoregError

    if cfg.predict_with not in ("ensemble", "net1", "net2"):
        raise CoregError(f"--predict-with {cfg.predict_with!r} is unknown; choose ensemble, net1 or net2")
    if cfg.dividemix_lambda_u < 0:
        raise CoregError(f"--dividemix-lambda-u must not be negative, got {cfg.dividemix_lambda_u}")
    return DivideMix(cfg, num_classes=num_classes, make_net=make_net, num_rows=num_rows)
