"""A research tool, not a VLM: candidate sets drawn from the true labels by the paper's noise generator.

`coreg annotate IMAGES OUT --annotator synthetic --noise q=0.03,eta=0.2 --seed S` needs labeled images. For
each row with true label y:
  1. every wrong class j != y enters the set independently with probability q (y is always in);
  2. with probability eta, y is removed and one class drawn uniformly from those still outside the set is
     added (when every class is already in, y is only removed).
So eta is the share of rows whose label misses the set, and the mean set size is 1 + q(C-1) - eta q^(C-1).
`vlm_probs` is uniform over the set and `vlm_pred` a seeded uniform pick from it. No model is loaded, which
makes it the controlled-noise counterpart of a real annotator for experiments on the learner.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import CoregError


def parse_noise(text: str) -> tuple[float, float]:
    """'q=0.03,eta=0.2' -> (q, eta); both required, each in [0, 1]."""
    usage = "use --noise q=Q,eta=E with 0 <= Q, E <= 1, e.g. q=0.03,eta=0.2"
    values: dict[str, float] = {}
    for part in text.split(","):
        name, sep, v = part.partition("=")
        name = name.strip()
        if not sep or name not in ("q", "eta") or name in values:
            raise CoregError(f"--noise {text!r}: cannot read {part.strip()!r}; {usage}")
        try:
            values[name] = float(v)
        except ValueError:
            raise CoregError(f"--noise {text!r}: {v.strip()!r} is not a number; {usage}") from None
        if not 0.0 <= values[name] <= 1.0:
            raise CoregError(f"--noise {text!r}: {name} must lie in [0, 1]; {usage}")
    if set(values) != {"q", "eta"}:
        raise CoregError(f"--noise {text!r}: give both q and eta; {usage}")
    return values["q"], values["eta"]


def expected_size(n_classes: int, q: float, eta: float) -> float:
    """E|S| under the generator (the eta swap keeps the size unless every wrong class was already in)."""
    return 1 + q * (n_classes - 1) - eta * q ** (n_classes - 1)


def draw_candidates(labels: np.ndarray, n_classes: int, *, q: float, eta: float, seed) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) bool candidate matrix and the (N,) int32 `vlm_pred`, deterministic in `seed` (an int or a
    numpy SeedSequence). All draws are made for every row, so row i's set does not depend on other rows'."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise CoregError("--annotator synthetic needs a known label on every image (class sub-folders)")
    rng = np.random.default_rng(seed)
    n = len(labels)
    rows = np.arange(n)
    mask = rng.random((n, n_classes)) < q  # (N, C) step 1: each wrong class with probability q
    mask[rows, labels] = True
    flip = rng.random(n) < eta  # (N,) step 2: the true label misses the set
    # A uniform pick among the classes outside the set: argmax of uniform noise restricted to them.
    outside_noise = np.where(mask, -1.0, rng.random((n, n_classes)))  # (N, C)
    has_outside = (~mask).any(axis=1)
    replacement = outside_noise.argmax(axis=1)
    mask[rows[flip], labels[flip]] = False
    add = flip & has_outside
    mask[rows[add], replacement[add]] = True
    pick_noise = np.where(mask, rng.random((n, n_classes)), -1.0)  # (N, C) uniform over the set
    pred = pick_noise.argmax(axis=1).astype(np.int32)
    return mask, pred


def uniform_probs(mask: np.ndarray) -> np.ndarray:
    """(N, C) float32: 1/|S| on the set, 0 elsewhere; a row with an empty set (C = 1 only) is uniform."""
    sizes = mask.sum(axis=1, keepdims=True)
    probs = np.where(sizes > 0, mask / np.maximum(sizes, 1), 1.0 / mask.shape[1])
    return probs.astype(np.float32)
