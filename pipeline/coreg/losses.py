"""Co-Reg losses (coreg-method.md §3.1, §3.4, §3.5, §3.6). Each returns a scalar or a dict of named scalars.

An empty part (no rows to average) contributes an exact 0 that is still attached to the graph
(`_zero`), so `backward()` works and every parameter receives a (zero) gradient, which DDP requires.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.coreg.division import masked_scores

# §3.1: the code's partial cross-entropy uses log(· + 1e-5).
PARTIAL_CE_EPS = 1e-5


def _zero(t: Tensor) -> Tensor:
    """An exact 0 that depends on `t`, so the graph stays connected."""
    return t.sum() * 0.0


# ---------------------------------------------------------------- warm-up (§3.1)


def partial_ce(logits: Tensor, candidates: Tensor) -> Tensor:
    """L_sup = −log(Σ_{j∈S} softmax_j + 1e-5), mean over rows whose set is neither empty nor all classes.

    An all-class set carries no information (the code skips it); an empty set (annotator failure) has no
    mass to maximise. If no row qualifies the loss is 0.
    """
    cand = candidates.bool()  # (B, C)
    size = cand.sum(dim=1)  # (B,)
    keep = ((size > 0) & (size < cand.shape[1])).float()  # (B,)
    p = logits.float().softmax(dim=1)  # (B, C)
    nll = -torch.log((p * cand).sum(dim=1) + PARTIAL_CE_EPS)  # (B,)
    # A masked mean instead of boolean indexing: no host sync, and exactly 0 (graph kept) if keep is empty.
    return (nll * keep).sum() / keep.sum().clamp_min(1.0)


def negative_entropy(logits: Tensor) -> Tensor:
    """L_neg = mean_i Σ_j p_ij log p_ij (§3.1); minimising it raises the output entropy."""
    logp = logits.float().log_softmax(dim=1)  # (B, C)
    return (logp.exp() * logp).sum(dim=1).mean()


def warmup_loss(logits: Tensor, candidates: Tensor) -> dict[str, Tensor]:
    """L_warm = L_sup + L_neg (§3.1)."""
    sup = partial_ce(logits, candidates)
    neg = negative_entropy(logits)
    return {"partial_ce": sup, "neg_entropy": neg, "loss": sup + neg}


def ranked_warmup_loss(logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """Not in the paper (`--warmup-loss vlm`, the default preset): soft cross-entropy −mean_i Σ_j t_ij log f_j
    to `targets`, the annotator's probabilities restricted to the candidate set and renormalised
    (`ranked_targets`). Partial CE is indifferent to how the mass is shared inside the set and the entropy
    term holds the outputs flat, so the network at the switch to self-training does not rank the candidates
    (issue 9, finding 3); this target does, with the set still bounding the mass."""
    logp = logits.float().log_softmax(dim=1)  # (B, C)
    ce = -(targets.float() * logp).sum(dim=1).mean()
    return {"soft_ce": ce, "loss": ce}


def ranked_targets(vlm_probs: Tensor, candidates: Tensor) -> Tensor:
    """(N, C) the annotator's distribution inside each candidate set, renormalised (empty sets: unmasked;
    a set the annotator gave no mass: uniform over it): the masking of paper Eq. 5, applied to `vlm_probs`."""
    return masked_scores(vlm_probs.float(), candidates)


def top_targets(targets: Tensor) -> Tensor:
    """(N, C) the limit T -> 0 of sharpening `targets`: one-hot on each row's top class, uniform over a tied
    top (a synthetic annotator's uniform set stays uniform instead of taking argmax's first, lowest class)."""
    top = targets >= targets.amax(1, keepdim=True) * (1 - 1e-6)
    return top.float() / top.sum(1, keepdim=True)


def annotator_top(inset: Tensor) -> tuple[Tensor, Tensor]:
    """(top (N,) long, ranked (N,) bool) of `ranked_targets`' output: each row's top class inside its set, and
    whether that top is single (a one-label set always is); a tied top, a synthetic annotator's uniform set,
    names no class. Read by the very weak rule (pipeline/presets.py) and by --keep-classes."""
    return inset.argmax(1), top_targets(inset).amax(1) == 1


def balanced_scores(q: Tensor, mean: Tensor, *, floor: float = 0.0) -> Tensor:
    """q / p̄ (distribution alignment to equal shares): every class's score divided by the batch's mean
    prediction p̄ (C,). `floor` > 0 (`--class-floor`, not in any paper): divided by min(p̄_j, floor/C) instead, so
    only a class predicted below floor/C of the rows is lifted (towards that share, not to 1/C) and the rest keep
    their ratios: a truly rare class above the floor is not pulled towards a balanced share."""
    m = mean.clamp_min(1e-12)
    if floor > 0:
        m = m.clamp_max(floor / q.shape[1])
    return q / m


def disambiguated_targets(ranked: Tensor, probs: Tensor, *, hard: bool) -> Tensor:
    """(B, C) not in the paper (`--warmup-loss vlm-net[-soft]`): the annotator's ranking inside the set
    (`ranked`, zero outside it) times the network's own softmax `probs`, renormalised: a posterior with the
    annotator as the prior and the network as the likelihood, so the warm-up disambiguates a set the annotator
    cannot rank (a synthetic annotator's uniform set, where `vlm-hard` keeps the target flat over the set and
    the network learns to split its mass) while an informative ranking still anchors it. `hard`: one-hot on
    the top (uniform over a tied top, `top_targets`); else the renormalised product (PRODEN's target when the
    ranking is uniform). `probs` need not sum to one (the warm-up passes class-balanced, ramped scores). A row
    whose product vanishes (float underflow) keeps `ranked`."""
    prod = ranked.float() * probs.float()
    total = prod.sum(1, keepdim=True)
    post = torch.where(total > 0, prod / total.clamp_min(1e-30), ranked.float())
    return top_targets(post) if hard else post


# ---------------------------------------------------------------- self-training (§3.4)


def self_training_loss(
    logits: Tensor, targets: Tensor, *, n_labeled: int, lambda_u: float
) -> dict[str, Tensor]:
    """L_pseu = L_x + λ_u · L_u on a mixup batch whose first `n_labeled` rows come from P (§3.4, Eq. 8).

    L_x: soft cross-entropy −mean_i Σ_j t_ij log softmax_ij over the P rows.
    L_u: mean over rows AND classes of (softmax − t)² on the remaining rows (code convention, §6.8).
    """
    logp = logits.float().log_softmax(dim=1)  # (M, C)
    t = targets.float()  # (M, C)
    lx_rows, lu_rows = slice(0, n_labeled), slice(n_labeled, None)
    if n_labeled > 0:
        l_x = -(t[lx_rows] * logp[lx_rows]).sum(dim=1).mean()
    else:
        l_x = _zero(logits)
    if logits.shape[0] > n_labeled:
        l_u = ((logp[lu_rows].exp() - t[lu_rows]) ** 2).mean()
    else:
        l_u = _zero(logits)
    return {"l_x": l_x, "l_u": l_u, "loss": l_x + lambda_u * l_u}


def prior_penalty(probs: Tensor, prior: Tensor | None = None, *, floor: float = 0.0) -> Tensor:
    """Σ_j π_j log(π_j / p̄_j), p̄ the batch-mean prediction, π uniform (DivideMix Eq. 12) or a given (C,)
    prior: keeps the mixed batch from collapsing onto a few classes. `floor` > 0 (`--class-floor`, not in any
    paper): the uniform term cut at a share of floor/C, (1/C) Σ_j max(0, log(floor / (C p̄_j))): only a class the
    batch gives less than that share is pulled up, so a class that is truly rare but above the floor is left
    alone (DivideMix's term pulls every class to 1/C). The floor is relative to equal shares, so it replaces
    `prior` (the uniform tensor `--align-targets` sets; build() refuses it with `--prior annotator`)."""
    c = probs.shape[1]
    if floor > 0:
        mean = probs.float().mean(dim=0).clamp_min(1e-12)
        return torch.log(floor / (c * mean)).clamp_min(0).sum() / c
    if prior is None:
        prior = torch.full((c,), 1.0 / c, device=probs.device)
    prior = prior.to(probs.device).float().clamp_min(1e-12)
    return (prior * torch.log(prior / probs.float().mean(dim=0).clamp_min(1e-12))).sum()


# ---------------------------------------------------------------- prototypes (§3.5)


def prototype_loss(
    emb: Tensor,
    prototypes: Tensor,
    targets_a: Tensor,
    targets_b: Tensor,
    *,
    lam: float,
    n_labeled: int,
    temperature: float = 0.3,
) -> dict[str, Tensor]:
    """Prototypical similarity alignment on the mixup batch (§3.5, paper Eq. 9, τ_p = 0.3).

    s = softmax(z_mix · Oᵀ / τ_p), prototypes detached. `targets_a` are the rows' own targets and
    `targets_b` the permuted partners' (mixup weight λ = `lam`).
    P rows (first `n_labeled`): λ·KL(t_a‖s) + (1−λ)·KL(t_b‖s), KL summed over classes, mean over rows
    (`batchmean`). U rows: λ·mean((s−t_a)²) + (1−λ)·mean((s−t_b)²), mean over rows and classes.
    L_proto = proto_p + 1.0 · proto_u (no ramp).
    """
    logits = emb.float() @ prototypes.detach().float().T / temperature  # (M, C)
    log_s = logits.log_softmax(dim=1)  # (M, C)
    ta, tb = targets_a.float(), targets_b.float()  # (M, C)
    p_rows, u_rows = slice(0, n_labeled), slice(n_labeled, None)

    def kl(t: Tensor) -> Tensor:  # KL(t‖s) batchmean; 0·log 0 = 0
        return (torch.xlogy(t, t) - t * log_s[p_rows]).sum(dim=1).mean()

    if n_labeled > 0:
        proto_p = lam * kl(ta[p_rows]) + (1 - lam) * kl(tb[p_rows])
    else:
        proto_p = _zero(emb)
    if emb.shape[0] > n_labeled:
        s_u = log_s[u_rows].exp()  # (M−n, C)
        proto_u = lam * ((s_u - ta[u_rows]) ** 2).mean() + (1 - lam) * ((s_u - tb[u_rows]) ** 2).mean()
    else:
        proto_u = _zero(emb)
    return {"proto_p": proto_p, "proto_u": proto_u, "loss": proto_p + proto_u}


# ---------------------------------------------------------------- noisy contrastive (§3.6)


def contrastive_masks(
    anchor_labels: Tensor,
    anchor_conf: Tensor,
    labels_all: Tensor,
    conf_all: Tensor,
    *,
    own_key_index: Tensor,
    self_index: Tensor | None = None,
    valid: Tensor | None = None,
    mode: str = "noisy",
) -> tuple[Tensor, Tensor]:
    """(positive, included) masks (B, K) of the contrastive loss; included = positives ∪ negatives.

    "noisy" (code `cont_mode='modified'`, §3.6): a confident anchor's positives are its own key and the
    same-class confident features, same-class unconfident ones are ignored; an unconfident anchor's only
    positive is its own key, every other same-class feature is ignored. Different-class features are
    negatives. "supcon" ("w/ SupCont" ablation): every same-class feature is positive.
    Always: the anchor itself (`self_index`) and invalid slots (`valid` False) are excluded; the own key
    is positive (if valid).
    """
    b, k = anchor_labels.shape[0], labels_all.shape[0]
    rows = torch.arange(b, device=labels_all.device)
    own = torch.zeros(b, k, dtype=torch.bool, device=labels_all.device)  # (B, K)
    own[rows, own_key_index] = True
    same = anchor_labels[:, None] == labels_all[None, :]  # (B, K)
    if mode == "noisy":
        conf_a = anchor_conf.bool()[:, None]  # (B, 1)
        same_conf = same & conf_all.bool()[None, :]  # (B, K)
        pos = (same_conf & conf_a) | own  # (B, K)
        ignored = same & ~pos  # (B, K) unconfident anchors: all same-class; confident: same-class unconf.
    elif mode == "supcon":
        pos = same | own  # (B, K)
        ignored = torch.zeros_like(pos)
    else:
        raise ValueError(f"mode must be 'noisy' or 'supcon', got {mode!r}")
    include = ~ignored  # (B, K)
    if self_index is not None:
        include[rows, self_index] = False
    if valid is not None:
        include &= valid.bool()[None, :]
    return pos & include, include


def noisy_contrastive_loss(
    q: Tensor,
    keys_all: Tensor,
    labels_all: Tensor,
    conf_all: Tensor,
    *,
    anchor_labels: Tensor,
    anchor_conf: Tensor,
    own_key_index: Tensor,
    self_index: Tensor | None = None,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
    mode: str = "noisy",
    valid: Tensor | None = None,
) -> Tensor:
    """Noise-tolerant SupCon loss (§3.6, paper Eq. 11; T″ = 0.07):

    L = −(T″/T_base) · mean_anchors (1/|P(x)|) Σ_{z+∈P(x)} log[exp(q·z+/T″) / Σ_{z'∈P(x)∪N(x)} exp(q·z'/T″)].

    q (B, D): the anchors (local queries, with grad). keys_all (K, D): the contrast set the caller builds,
    e.g. cat([q_all, k_all, queue]) (q_all gathered with grad), with the pseudo-class `labels_all` (K,)
    long and confidence `conf_all` (K,) bool of every feature. `self_index` (B,): where anchor i itself
    sits in keys_all (excluded; None if the anchors are not in it). `own_key_index` (B,): where its own key
    sits (always a positive). `valid` (K,) bool masks unfilled queue slots out of everything.
    Anchors without any positive (own key invalid) are left out of the mean; if none remains, 0.
    """
    pos, include = contrastive_masks(
        anchor_labels,
        anchor_conf,
        labels_all,
        conf_all,
        own_key_index=own_key_index,
        self_index=self_index,
        valid=valid,
        mode=mode,
    )
    logits = q.float() @ keys_all.float().T / temperature  # (B, K)
    # Subtract each row's max over the included entries (a constant per row: the log-ratio is unchanged).
    row_max = logits.detach().masked_fill(~include, float("-inf")).amax(dim=1, keepdim=True)  # (B, 1)
    row_max = torch.nan_to_num(row_max, neginf=0.0)  # rows with nothing included
    shifted = logits - row_max  # (B, K)
    # Excluded entries go to −inf BEFORE exp, so a large excluded logit can neither overflow nor leak.
    denom = shifted.masked_fill(~include, float("-inf")).exp().sum(dim=1, keepdim=True)  # (B, 1)
    log_prob = shifted - torch.log(denom.clamp_min(1e-30))  # (B, K)
    n_pos = pos.sum(dim=1)  # (B,)
    has_pos = (n_pos > 0).float()  # (B,)
    mean_log_prob_pos = torch.where(pos, log_prob, 0.0).sum(dim=1) / n_pos.clamp_min(1)  # (B,)
    # Masked mean over anchors with a positive (no host sync; exactly 0 with the graph kept if none).
    mean_anchor = (mean_log_prob_pos * has_pos).sum() / has_pos.sum().clamp_min(1.0)
    return -(temperature / base_temperature) * mean_anchor
