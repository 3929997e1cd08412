"""Where a trained student's errors on its own training rows sit: rows whose candidate set holds the true label
(valid) against rows whose set misses it (invalid). True labels score it; nothing here is used in training.

    python bench/fit_probe.py ANNOTATED MODEL [MODEL ...] [--split train]

Per model: the share of valid rows; accuracy on valid and on invalid rows (with the test accuracy beside it, a
student that memorised its noisy sets would be right on valid rows and wrong on invalid ones); the share of
invalid rows predicted *inside* their (wrong) set (memorised noise) and of valid rows predicted outside it.
Answers "is the gap to the clean ceiling label noise the student learned, or what the student cannot
generalise at this budget?" (bench/results/accuracy_notes.md §15).
"""

from __future__ import annotations

import argparse

import numpy as np


def probe(annotated: str, model_dir: str, split: str = "train") -> dict[str, float]:
    from pipeline.model_io import load_model
    from pipeline.schema import candidate_matrix, load_annotated
    from stages.evaluate import predict_rows

    ds, classes = load_annotated(annotated, stage="fit_probe")
    rows = ds[split]
    lab = np.asarray(rows["label"])
    known = lab >= 0
    cand = np.asarray(candidate_matrix(rows["candidates"], len(classes)), dtype=bool)
    model = load_model(model_dir)
    per_net, _ = predict_rows(model, rows, range(len(rows)), batch_size=256, progress=False)  # as `coreg evaluate`
    pred = np.asarray(model.combine(per_net)).argmax(1)  # the model's own prediction rule (--predict-with)
    idx = np.arange(len(lab))
    valid = known & cand[idx, np.where(known, lab, 0)]
    invalid = known & ~valid
    inside = cand[idx, pred]
    pct = lambda m: round(100 * float(m.mean()), 1) if m.size else float("nan")  # noqa: E731
    return {
        "valid rows": pct(valid[known]), "acc. valid": pct((pred == lab)[valid]), "acc. invalid": pct((pred == lab)[invalid]),
        "invalid predicted inside the set": pct(inside[invalid]), "valid predicted outside the set": pct(~inside[valid]),
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("annotated")
    p.add_argument("models", nargs="+")
    p.add_argument("--split", default="train")
    args = p.parse_args()
    out = [probe(args.annotated, m, args.split) for m in args.models]
    keys = list(out[0])
    print("| model | " + " | ".join(f"{k} (%)" for k in keys) + " |")
    print("| --- |" + " ---: |" * len(keys))
    for m, r in zip(args.models, out, strict=True):
        print(f"| {m} | " + " | ".join(f"{r[k]:.1f}" for k in keys) + " |")


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
