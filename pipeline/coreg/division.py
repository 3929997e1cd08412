"""Co-division: which candidate sets does a network trust? (coreg-method.md §3.2, §6.15)

Per post-warm-up epoch, for each network: distribution-align its weak-view predictions, take the
"max-candidate" loss −log max_{j∈S} q̂_j, min-max normalise it, average it over the last few epochs, fit a
two-component 1-D GMM and call the posterior of the low-loss component the clean probability w. Rows with
w > τ form the partial split P; the rest form U, whose candidate sets are discarded. The partner network
then trains on this split and on the candidate-masked scores (paper Eq. 5).

Everything here is a pure function of tensors except `LossHistory`, whose state is a buffer so that it is
saved with the method's checkpoint.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor, nn

# Guards a division by a class mean that underflowed to 0 (DA) or a loss of −log 0 (division loss).
_TINY = 1e-12


def distribution_align(probs: Tensor, *, mean_probs: Tensor, prior: Tensor | None = None) -> Tensor:
    """Distribution alignment (code-only, §3.2 step 2): q̂ ∝ q / (mean_q / prior), rows renormalised.

    `mean_probs` is the mean over ALL training rows of the per-sample prediction buffer (the caller keeps
    that buffer and writes the current raw predictions into it first). `prior` defaults to uniform (the
    code's `uniform_prior=1`). Classes the network over-predicts are scaled down, rarely predicted ones up.
    """
    c = probs.shape[1]
    if prior is None:
        prior = probs.new_full((c,), 1.0 / c)  # (C,)
    ratio = (mean_probs / prior).clamp_min(_TINY)  # (C,) a class never predicted must not divide by 0
    q = probs / ratio  # (B, C)
    return q / q.sum(dim=1, keepdim=True).clamp_min(_TINY)  # (B, C)


def division_loss(probs: Tensor, candidates: Tensor, *, eps: float = _TINY) -> Tensor:
    """Max-candidate loss −log(max_{j∈S} q_j + eps) per row (§3.2 step 3, code `MaxiCandLoss`).

    A row with an EMPTY candidate set (the annotator failed on it) is treated as if its set held every
    class: its loss is −log max_j q_j, the network's own confidence. That neither rewards nor punishes the
    missing annotation; the GMM then judges the row like any other, and if it lands in P, `masked_scores`
    also leaves its scores unmasked, which is consistent with an all-class set.
    """
    cand = candidates.bool()  # (N, C)
    empty = ~cand.any(dim=1, keepdim=True)  # (N, 1)
    allowed = cand | empty  # (N, C) empty rows → all classes
    best = probs.masked_fill(~allowed, 0.0).amax(dim=1)  # (N,)
    return -torch.log(best + eps)  # (N,)


def minmax(x: Tensor) -> Tensor:
    """Scale to [0, 1] (§3.2 step 4). A constant vector has no spread to scale and maps to zeros."""
    lo, hi = x.min(), x.max()
    span = hi - lo
    if span <= 0:
        return torch.zeros_like(x)
    return (x - lo) / span


class LossHistory(nn.Module):
    """Mean of the last `history` min-max-normalised division-loss vectors (code-only, §3.2 step 4; 5 epochs).

    Buffers: `losses` (H, N), a ring of the stored vectors, and `count`, how many were ever pushed; both are
    in the state_dict, so a resumed run averages exactly the same epochs.
    """

    def __init__(self, n: int, *, history: int = 5):
        super().__init__()
        if history < 1:
            raise ValueError(f"history must be ≥ 1, got {history}")
        self.register_buffer("losses", torch.zeros(history, n))  # (H, N)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @property
    def history(self) -> int:
        return self.losses.shape[0]

    @torch.no_grad()
    def push(self, loss: Tensor) -> Tensor:
        """Normalise `loss` (N,) with `minmax`, store it, return the mean of the stored ones (N,).

        `minmax` is idempotent on its own output, so passing an already normalised vector is also correct.
        """
        if loss.shape != self.losses.shape[1:]:
            raise ValueError(f"loss has shape {tuple(loss.shape)}, history holds {self.losses.shape[1]} rows")
        slot = int(self.count) % self.history
        self.losses[slot] = minmax(loss.detach().to(self.losses))
        self.count += 1
        stored = min(int(self.count), self.history)
        # The ring is full from slot 0 upward until it wraps, so the first `stored` rows are the stored ones.
        return self.losses[:stored].mean(dim=0)  # (N,)


def gmm_clean_prob(
    losses: Tensor | np.ndarray,
    *,
    seed: int,
    max_iter: int = 10,
    tol: float = 1e-2,
    reg_covar: float = 5e-4,
) -> np.ndarray:
    """Posterior of the smaller-mean component of a 2-component 1-D GMM (§3.2 step 5; sklearn settings §4).

    Returns w (N,) float64 in [0, 1]. Edge cases return all ones (every row clean):
    - N < 2: two components cannot be fitted to fewer than two points;
    - constant losses: the data carry no evidence to separate clean from noisy rows, so nothing is
      discarded (the conservative choice for partial-label training: U would throw the candidate sets
      away), and sklearn would otherwise fit two identical components and return an arbitrary 0.5 split.
    `max_iter=10` usually stops before convergence by design (code setting), so sklearn's
    ConvergenceWarning is silenced here.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    if isinstance(losses, Tensor):
        losses = losses.detach().cpu().double().numpy()
    x = np.asarray(losses, dtype=np.float64).reshape(-1, 1)  # (N, 1)
    if x.shape[0] < 2 or np.ptp(x) <= 0:
        return np.ones(x.shape[0], dtype=np.float64)
    gmm = GaussianMixture(
        n_components=2, max_iter=max_iter, tol=tol, reg_covar=reg_covar, random_state=seed % (2**32)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gmm.fit(x)
    clean = int(np.argmin(gmm.means_.reshape(-1)))
    return gmm.predict_proba(x)[:, clean]  # (N,)


def classwise_clean_prob(losses: np.ndarray, groups: np.ndarray, *, seed: int, **gmm) -> np.ndarray:
    """Not in the paper (`--division class`): `gmm_clean_prob` fitted separately on the rows of each group
    (the class the network picks inside the candidate set, argmax of the masked scores).

    One global GMM calls a row clean when its loss is small *compared with every row*, so the rows of a
    class the network is unsure of all land in U and that class vanishes from the P targets (issue 9,
    finding 1; bench/results/accuracy_cifar_small_notes.md §5). Fitting per class compares each row only with rows of
    its own class, the class-balanced selection of noisy-label work. A group of one row gets w = 1
    (`gmm_clean_prob`'s edge case).
    """
    x = np.asarray(losses, dtype=np.float64).reshape(-1)  # (N,)
    g = np.asarray(groups).reshape(-1)  # (N,)
    w = np.ones_like(x)
    for c in np.unique(g):
        rows = np.flatnonzero(g == c)
        w[rows] = gmm_clean_prob(x[rows], seed=(seed + int(c)) % (2**32), **gmm)
    return w  # (N,)


def split(
    w: Tensor,
    *,
    threshold: float = 0.5,
    forced_clean: Tensor | None = None,
    min_clean: int = 1,
) -> tuple[Tensor, Tensor]:
    """P = {w > τ} (§3.2 step 6, τ = 0.5 §4), with trusted rows forced in and a floor on |P| (§6.4, §6.15).

    - `forced_clean` (N,) bool: human-labelled rows (§6.4); they enter P with w = 1, so the co-pseudo-label
      w·p_A + (1−w)·p̄_B equals the partner term, i.e. their one-hot label.
    - If fewer than `min_clean` rows pass τ, the `min_clean` rows with the highest w (ties: lower index
      first) are put in P, keeping their own w. Of the two §6.15 options this one ("take the top rows by w")
      is chosen because it needs no second threshold and always yields exactly enough rows; lowering τ
      could still leave P empty when all w are equal. `min_clean` is capped at N.
    Returns (p_mask (N,) bool, w (N,) float), w being a copy with the forced rows set to 1.
    """
    w = torch.as_tensor(w).detach().clone().float()  # (N,)
    if forced_clean is not None:
        w[forced_clean.to(w.device).bool()] = 1.0
    p_mask = w > threshold  # (N,)
    k = min(int(min_clean), w.numel())
    if int(p_mask.sum()) < k:
        order = torch.sort(w, descending=True, stable=True).indices  # (N,) stable → lower index wins ties
        p_mask[order[:k]] = True
    return p_mask, w


def masked_scores(probs: Tensor, candidates: Tensor) -> Tensor:
    """Candidate-masked, renormalised scores p_j = y_j q_j / Σ_k y_k q_k (paper Eq. 5, §3.2 step 7).

    Rows with an empty candidate set keep their unmasked scores (same convention as `division_loss`). A row
    whose candidates all have probability 0 (softmax underflow) gets the uniform distribution over its
    candidates rather than 0/0.
    """
    cand = candidates.bool()  # (N, C)
    empty = ~cand.any(dim=1, keepdim=True)  # (N, 1)
    masked = probs * cand  # (N, C)
    total = masked.sum(dim=1, keepdim=True)  # (N, 1)
    uniform = cand.to(probs.dtype) / cand.sum(dim=1, keepdim=True).clamp_min(1)  # (N, C)
    out = torch.where(total > 0, masked / total.clamp_min(_TINY), uniform)  # (N, C)
    return torch.where(empty, probs, out)  # (N, C)


def prediction_balance(counts: Tensor) -> dict[str, float]:
    """Label-free collapse check from per-class argmax counts (C,): how many classes the network predicts
    at all, and the smallest class share times C (1 = every class predicted equally often, 0 = some class
    is never predicted). Self-training cannot bring back a class the network has stopped predicting, so a
    falling `pred_min_share` is the first sign of the class collapse described in bench/results/accuracy_cifar_small_notes.md.
    """
    counts = counts.float()
    total = counts.sum().clamp_min(1.0)
    return {"pred_classes": float((counts > 0).sum()), "pred_min_share": float(counts.min() / total * counts.numel())}


def keep_lost_classes(
    scores: Tensor, w: Tensor, p_mask: Tensor, counts: Tensor, annotator_top: Tensor, ranked: Tensor, *, floor: float
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Not in any paper (`--keep-classes F`): a class the network has lost is taught again from the annotator.

    A class c is lost when the network predicts it (`counts`, (C,): its argmax over all classes on the training
    rows, what it would predict at test time) for fewer than F times the rows whose annotator's top class inside
    the set is c (`annotator_top`, counted over the `ranked` rows only: a tied top, a synthetic annotator's
    uniform set, names no class). Such a class gets no mass in the network's targets, so self-training cannot
    bring it back (accuracy_notes.md §40-41). Its ranked rows are put in P with w = 1 and the annotator's one-hot
    as their masked score, so their co-pseudo-label is the annotator's label, as a trusted row's is its human
    label. The test is relative to the annotator's own count, not to equal shares, so a class the annotator
    itself finds rare is not pushed above it. `scores` (N, C), `w` (N,), `p_mask` (N,) bool, `annotator_top`
    (N,) long, `ranked` (N,) bool. Returns copies (scores, w, p_mask) and the number of classes kept this way.
    """
    n_classes = scores.shape[1]
    named = torch.bincount(annotator_top[ranked], minlength=n_classes).to(counts.dtype)  # (C,)
    lost = (named > 0) & (counts < floor * named)  # (C,)
    rows = ranked & lost[annotator_top]  # (N,)
    if not bool(rows.any()):
        return scores, w, p_mask, 0
    scores, w, p_mask = scores.clone(), w.clone(), p_mask.clone()
    scores[rows] = torch.nn.functional.one_hot(annotator_top[rows], n_classes).to(scores.dtype)
    w[rows] = 1.0
    p_mask[rows] = True
    return scores, w, p_mask, int(lost.sum())
