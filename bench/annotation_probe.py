"""What an annotation carries beyond its top-1, read from the annotated dataset alone (true labels score it).

    python bench/annotation_probe.py ANNOTATED [ANNOTATED ...] [--split train]

For each annotated dataset (the stage contract; `votes` is used where present) it prints the accuracy on the
split's labelled rows of label rules a student could be trained towards, none of which reads a label:

- `top1`: the annotator's `vlm_pred`; `in_set`: its top class inside the candidate set;
- `debiased`: the in-set probabilities divided by their mean over the split (the annotator's class bias
  removed, assuming balanced classes), argmax;
- `dawid_skene`: the per-prompt votes aggregated by Dawid & Skene's EM (1979), each prompt a labeller with its
  own confusion matrix; only where a `votes` column exists;
- `conf@K%`: the top-1 of the K% most confident rows of each predicted class (class-balanced selection by
  the annotator's own confidence), the accuracy of a cleaner labelled subset;
- `truth_first`: for how many classes the true class is the annotator's most frequent top-1 on that class's
  rows: a class where it is not cannot be recovered from the top-1 by any learner that imitates it;
- `skew`, `margin` (label-free, what the default preset's warm-up rule reads: pipeline/presets.py
  `annotator_skew`): the rarest class's share of the in-set top-1 times C, and the mean gap between the first
  and second in-set probabilities (bench/results/accuracy_notes.md §20).

This is a diagnostic for the benchmark (bench/results/accuracy_notes.md §11); nothing here is used in training.
"""

from __future__ import annotations

import argparse

import numpy as np


def dawid_skene(votes: np.ndarray, num_classes: int, *, iters: int = 30) -> np.ndarray:
    """(N, C) posterior of the true class from (N, K) votes. Written out because it is 15 lines of EM and only
    this diagnostic needs it (no dependency is added for a benchmark probe)."""
    n, k = votes.shape
    onehot = np.zeros((n, k, num_classes))
    onehot[np.arange(n)[:, None], np.arange(k)[None], votes] = 1.0
    post = onehot.mean(axis=1)  # majority vote to start
    for _ in range(iters):
        prior = post.mean(axis=0) + 1e-9  # (C,)
        conf = np.einsum("nc,nkl->kcl", post, onehot) + 0.01  # (K, C true, C voted), smoothed
        conf /= conf.sum(axis=2, keepdims=True)
        log_post = np.log(prior)[None] + np.einsum("nkl,kcl->nc", onehot, np.log(conf))
        post = np.exp(log_post - log_post.max(axis=1, keepdims=True))
        post /= post.sum(axis=1, keepdims=True)
    return post


def probe(path: str, split: str) -> dict[str, float]:
    import datasets
    import torch

    from pipeline.coreg.losses import ranked_targets
    from pipeline.metrics import candidate_stats
    from pipeline.schema import candidate_matrix

    ds = datasets.load_from_disk(path)[split]
    ds = ds.remove_columns([c for c in ("image",) if c in ds.column_names])
    y = np.array(list(ds["label"]))
    probs = np.array(list(ds["vlm_probs"]), dtype=np.float64)
    n, c = probs.shape
    cand = candidate_matrix(ds["candidates"], c)
    known = y >= 0
    acc = lambda pred: float((pred[known] == y[known]).mean())  # noqa: E731
    in_set = ranked_targets(torch.as_tensor(probs), torch.as_tensor(cand)).double().numpy()  # what the warm-up ranks by
    top = np.array(list(ds["vlm_pred"]))
    sets = candidate_stats(cand, y)
    out = {"n": float(known.sum()), "top1": acc(top), "in_set": acc(in_set.argmax(1)),
           "coverage": sets["candidate_coverage"], "mean_set": sets["mean_candidates"],
           "debiased": acc((in_set / in_set.mean(axis=0)).argmax(1))}  # fmt: skip
    votes = np.array(list(ds["votes"]), dtype=np.int64) if "votes" in ds.column_names else np.zeros((n, 0))
    if votes.ndim == 2 and votes.shape[1] > 0:  # the synthetic annotator writes empty votes
        out["dawid_skene"] = acc(dawid_skene(votes, c).argmax(1))
    conf = probs.max(axis=1)
    for frac in (0.1, 0.2, 0.5):
        rows = []
        for k in range(c):
            idx = np.flatnonzero((top == k) & known)
            rows.extend(idx[np.argsort(-conf[idx])[: max(1, round(frac * len(idx)))]] if len(idx) else [])
        rows = np.asarray(rows, dtype=int)
        out[f"conf@{round(frac * 100)}%"] = float((top[rows] == y[rows]).mean())
    out["truth_first"] = float(sum(np.bincount(top[y == k], minlength=c).argmax() == k for k in range(c) if (y == k).any()))
    from pipeline.presets import annotator_skew

    skew = annotator_skew(cand, probs)
    if skew is not None:
        out["skew"], out["margin"] = skew[0], skew[2]
    return out


def main() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's pipeline, whatever is installed
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("annotated", nargs="+", help="annotated dataset folders (coreg annotate output)")
    p.add_argument("--split", default="train")
    args = p.parse_args()
    rows = [(a, probe(a, args.split)) for a in args.annotated]
    keys = list(dict.fromkeys(k for _, r in rows for k in r))  # dawid_skene only where votes exist
    print("| dataset | " + " | ".join(keys) + " |")
    print("| --- |" + " ---: |" * len(keys))
    for a, r in rows:
        cells = ["–" if k not in r else f"{r[k]:.0f}" if k in ("n", "truth_first") else f"{r[k]:.2f}" if k in ("mean_set", "skew", "margin")
                 else f"{100 * r[k]:.1f}" for k in keys]  # fmt: skip
        print(f"| {a} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
