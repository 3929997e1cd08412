"""Candidate-set rules: pure functions from an annotator's scores to an (N, C) boolean candidate matrix.

Inputs are what every annotator returns (annotators/base.py): `probs` (N, C), its class distribution, and
`votes` (N, P), each prompt's top-1 class (-1 where a prompt gave no usable answer).

- `union`    the union of the prompts' top-1 votes: the paper's rule and the default (coreg-method.md §2.1).
- `topk:K`   the K most probable classes.
- `ratio:R`  classes with probability >= R x the top probability (the Co-Reg code's `prob_ratio_thres`, R=0.5).
- `mass:M`   the smallest set of most probable classes whose probability sums to >= M.

Ties are broken towards the lower class index, so every rule is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.errors import CoregError

RULES = ("union", "topk", "ratio", "mass")
MASS_TOL = 1e-6  # float32 sums of probabilities that should be 1 can land at 0.9999999


@dataclass(frozen=True)
class Rule:
    name: str
    value: float | int | None = None

    def __str__(self) -> str:
        return self.name if self.value is None else f"{self.name}:{self.value}"


def parse_rule(text: str, n_classes: int | None = None) -> Rule:
    """'union' | 'topk:K' | 'ratio:R' | 'mass:M' -> Rule; CoregError naming --candidates otherwise."""
    name, _, arg = text.strip().partition(":")
    usage = "use union | topk:K (1 <= K <= classes) | ratio:R (0 < R <= 1) | mass:M (0 < M <= 1)"
    if name == "union" and not arg:
        return Rule("union")
    try:
        if name == "topk":
            k = int(arg)
            if k < 1 or (n_classes is not None and k > n_classes):
                raise ValueError
            return Rule("topk", k)
        if name in ("ratio", "mass"):
            v = float(arg)
            if not 0 < v <= 1:
                raise ValueError
            return Rule(name, v)
    except ValueError:
        raise CoregError(f"--candidates {text!r}: bad value; {usage}") from None
    raise CoregError(f"--candidates {text!r}: unknown rule; {usage}")


def _order(probs: np.ndarray) -> np.ndarray:
    """(N, C) class indices, most probable first, lower index first among equals."""
    return np.argsort(-probs, axis=1, kind="stable")


def union_of_votes(votes: np.ndarray, n_classes: int) -> np.ndarray:
    """(N, C) bool: class j is a candidate iff some prompt voted j. Votes of -1 add nothing."""
    n = votes.shape[0]
    mask = np.zeros((n, n_classes + 1), dtype=bool)  # the extra last column swallows the -1 votes
    rows = np.repeat(np.arange(n), votes.shape[1])
    mask[rows, votes.reshape(-1)] = True  # -1 indexes the extra column
    return mask[:, :n_classes]


def top_k(probs: np.ndarray, k: int) -> np.ndarray:
    mask = np.zeros(probs.shape, dtype=bool)
    np.put_along_axis(mask, _order(probs)[:, :k], True, axis=1)
    return mask


def ratio(probs: np.ndarray, r: float) -> np.ndarray:
    return probs >= r * probs.max(axis=1, keepdims=True)


def mass(probs: np.ndarray, m: float) -> np.ndarray:
    order = _order(probs)
    cum = np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1)  # (N, C), non-decreasing
    size = (cum < m - MASS_TOL).sum(axis=1) + 1  # first position where the mass reaches m, as a count
    size = np.minimum(size, probs.shape[1])
    keep = np.arange(probs.shape[1])[None, :] < size[:, None]  # (N, C) in sorted order
    mask = np.zeros(probs.shape, dtype=bool)
    np.put_along_axis(mask, order, keep, axis=1)
    return mask


def apply_rule(rule: Rule, probs: np.ndarray, votes: np.ndarray) -> tuple[np.ndarray, int]:
    """The candidate matrix (N, C) bool and the number of rows that fell back to argmax(probs).

    Only `union` can produce an empty row (every prompt unanswered, e.g. LLaVA answers that name no class);
    such a row gets {argmax probs} = `vlm_pred`, and is counted so the fallback is never silent.
    """
    n_classes = probs.shape[1]
    if rule.name == "union":
        mask = union_of_votes(votes, n_classes)
    elif rule.name == "topk":
        mask = top_k(probs, min(int(rule.value), n_classes))
    elif rule.name == "ratio":
        mask = ratio(probs, float(rule.value))
    elif rule.name == "mass":
        mask = mass(probs, float(rule.value))
    else:  # parse_rule only makes the four above
        raise ValueError(rule)
    empty = ~mask.any(axis=1)
    if empty.any():
        mask[np.flatnonzero(empty), probs[empty].argmax(axis=1)] = True
    return mask, int(empty.sum())


def mask_to_lists(mask: np.ndarray) -> list[list[int]]:
    """Rows of a candidate matrix as sorted index lists (the dataset's `candidates` column)."""
    return [np.flatnonzero(row).tolist() for row in mask]
