"""`alim`: adjusting label importance for noisy partial labels (Xu, Lian, Feng, Liu and Tao, NeurIPS 2023,
"ALIM: Adjusting Label Importance Mechanism for Noisy Partial Label Learning").

ALIM is a plug-in on PiCO (`pipeline/baselines/pico.py`, which this subclasses): wherever PiCO restricts a
score to the candidates (multiplies by y), ALIM multiplies by y + λ(1 − y), so a non-candidate class can
win when the network is confident enough that the annotator missed the true label. Both the contrastive
pseudo-labels and the label disambiguation use it; the disambiguation target is
- "onehot" (ALIM-Onehot): onehot(argmax (y + λ(1 − y)) ⊙ score), or
- "scale" (ALIM-Scale): normalise((y + λ(1 − y)) ⊙ score),
with score the prototype scores softmax(z · Oᵀ / 0.07). A mixup term (ALIM's code: weight 1, Beta(4, 4),
λ_mix = max(λ_mix, 1 − λ_mix)) trains on mixed weak views against mixed label estimates.

λ is 0 (plain PiCO) for the first `--warmup-epochs` epochs; after each later epoch it is set adaptively:
with r_i = max_{j∈S} score_ij / max_{j∉S} score_ij collected over the epoch, λ is the η-quantile of r (so a
share η of the rows would move their label outside S), capped at 1 (ALIM's `--max1`). The noise rate η is
`--alim-noise-rate`; the paper assumes it known. For VLM labels it is not, so the default (−1) estimates it
each epoch as the expected noisy share 1 − mean(w) of a 2-component GMM on the max-candidate loss
−log max_{j∈S} p_j (Co-Reg's `division_loss` + `gmm_clean_prob`) [our choice, not in the paper].
Trusted rows are never adjusted (λ does not apply to them). Other defaults: as `pico`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.baselines.pico import PiCO, check
from pipeline.baselines.single import Batch, soft_ce
from pipeline.coreg.division import division_loss, gmm_clean_prob
from pipeline.coreg.mixup import mixup, sample_lambda
from pipeline.errors import CoregError
from pipeline.training import Context, derive_seed

VARIANTS = ("onehot", "scale")


def adjusted_weights(cand: Tensor, lam: float | Tensor, trusted: Tensor) -> Tensor:
    """(b, C) y + λ(1 − y); trusted rows keep y. λ a float or a 0-dim tensor."""
    return cand + lam * (1.0 - cand) * (~trusted.bool()).float()[:, None]


def candidate_margin(scores: Tensor, cand: Tensor) -> Tensor:
    """(b,) max_{j∈S} score / max_{j∉S} score; +inf where S holds every class (nothing outside to win)."""
    inside = (scores * cand).amax(dim=1)
    outside = (scores * (1.0 - cand)).amax(dim=1)
    return torch.where(outside > 0, inside / outside.clamp_min(1e-30), torch.full_like(inside, float("inf")))


def adaptive_lambda(margin: Tensor, noise_rate: float) -> float:
    """The value at position ⌊N·η⌋ of the ascending margins, capped at 1; 0 when η = 0 (ALIM)."""
    if noise_rate <= 0:
        return 0.0
    r = margin[torch.isfinite(margin)].sort().values
    if r.numel() == 0:
        return 0.0
    return float(min(r[min(int(r.numel() * noise_rate), r.numel() - 1)], 1.0))


class ALIM(PiCO):
    name = "alim"

    def __init__(self, cfg, *, num_classes, make_net, num_rows):
        super().__init__(cfg, num_classes=num_classes, make_net=make_net, num_rows=num_rows)
        self.state = nn.Module()  # buffers, so they are checkpointed with the modules
        self.state.register_buffer("lam", torch.zeros(()))
        self.state.register_buffer("margin", torch.full((num_rows,), float("inf")))  # (N,)
        self.state.register_buffer("div_loss", torch.zeros(num_rows))  # (N,)

    def extra_modules(self):
        return {**super().extra_modules(), "alim_state": self.state}

    def label_weights(self, cand: Tensor, trusted: Tensor) -> Tensor:
        return adjusted_weights(cand, self.state.lam, trusted)  # the buffer itself: float() would read the device

    def disambiguate(self, scores: Tensor, weights: Tensor) -> Tensor:
        if self.cfg.alim_variant == "scale":
            s = scores * weights  # (b, C)
            return s / s.sum(dim=1, keepdim=True).clamp_min(1e-30)
        return super().disambiguate(scores, weights)

    def extra_terms(self, ctx: Context, batch: Batch, x_weak: Tensor, probs: Tensor, scores: Tensor, cand: Tensor):
        dist = ctx.dist
        # Statistics for the end-of-epoch λ: every process stores the whole global batch.
        trusted = ctx.trusted[batch.loc].bool()
        margin = torch.where(trusted, torch.full_like(probs[:, 0], float("inf")), candidate_margin(scores, cand))
        self.state.margin[batch.glob] = dist.gather(margin)
        self.state.div_loss[batch.glob] = dist.gather(division_loss(probs, cand))
        if self.cfg.alim_mixup_weight == 0:
            return {}
        g_host, g = ctx.rng_pair(*batch.keys, "mixup")
        lam = sample_lambda(self.cfg.mixup_alpha, g_host)  # drawn on the host (no device read)
        perm = torch.randperm(batch.n, generator=g, device=g.device).to(ctx.device)
        x_all = dist.gather(x_weak.detach())  # (n, 3, H, W) the global batch, so partners may be anywhere
        t_all = dist.gather(self.conf.values[batch.loc])  # (n, C) label estimates after this step's update
        x_mix, t_mix = mixup(x_all, t_all, lam=lam, perm=perm)
        with ctx.autocast():
            logits = self.wrapped(x_mix[batch.rows]).float()  # (b, C)
        return {"mixup": self.cfg.alim_mixup_weight * soft_ce(logits, t_mix[batch.rows])}

    def end_epoch(self, epoch: int, ctx: Context):
        m = super().end_epoch(epoch, ctx)
        if epoch + 1 < self.cfg.warmup_epochs:
            return {**m, "lambda": 0.0}
        eta = self.cfg.alim_noise_rate
        if eta < 0:
            w = gmm_clean_prob(self.state.div_loss.cpu(), seed=derive_seed(ctx.seed, "alim-gmm", epoch) % 2**32)
            eta = float(1.0 - w.mean())
        lam = adaptive_lambda(self.state.margin, eta)
        self.state.lam.fill_(lam)
        return {**m, "lambda": lam, "eta_hat": eta}


def build(cfg, *, num_classes: int, make_net, num_rows: int) -> ALIM:
    check(cfg)
    if cfg.alim_variant not in VARIANTS:
        raise CoregError(f"--alim-variant {cfg.alim_variant!r} is unknown; choose onehot or scale")
    if cfg.alim_noise_rate >= 1 or cfg.alim_mixup_weight < 0:
        raise CoregError("--alim-noise-rate must be below 1 (negative = estimate) and --alim-mixup-weight ≥ 0")
    return ALIM(cfg, num_classes=num_classes, make_net=make_net, num_rows=num_rows)
