"""Evaluation metrics as pure functions of integer arrays (no torch, no datasets).

Conventions: `label` is -1 where the truth is unknown; every accuracy is over the labeled rows only and is
None when there are none (unknown is not zero). `candidates` is the (N, C) bool matrix of candidate sets.
"""

from __future__ import annotations

import numpy as np


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def accuracy(pred: np.ndarray, label: np.ndarray) -> float | None:
    """Share of labeled rows where pred == label."""
    known = label >= 0
    return _ratio((pred[known] == label[known]).sum(), known.sum())


def balanced_accuracy(pred: np.ndarray, label: np.ndarray, num_classes: int) -> float | None:
    """Mean per-class recall over the classes that occur among the labels (sklearn's definition)."""
    recalls = [r for r in per_class_recall(pred, label, num_classes) if r is not None]
    return float(np.mean(recalls)) if recalls else None


def per_class_recall(pred: np.ndarray, label: np.ndarray, num_classes: int) -> list[float | None]:
    return [_ratio((pred[label == c] == c).sum(), (label == c).sum()) for c in range(num_classes)]


def confusion_matrix(label: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts, rows = true class, columns = predicted class; unlabeled rows are left out."""
    known = label >= 0
    flat = label[known].astype(np.int64) * num_classes + pred[known].astype(np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def class_counts(pred: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(pred.astype(np.int64), minlength=num_classes).tolist()


def candidate_stats(candidates: np.ndarray, label: np.ndarray) -> dict:
    """Coverage (labeled rows whose label is in their set), mean set size, singleton and empty shares."""
    sizes = candidates.sum(1)
    known = np.flatnonzero(label >= 0)
    covered = candidates[known, label[known]] if len(known) else np.zeros(0, dtype=bool)
    n = len(sizes)
    return {
        "candidate_coverage": _ratio(covered.sum(), len(known)),
        "mean_candidates": _ratio(sizes.sum(), n),
        "singleton_share": _ratio((sizes == 1).sum(), n),
        "empty_share": _ratio((sizes == 0).sum(), n),
    }


def overrule_stats(pred: np.ndarray, vlm_pred: np.ndarray, candidates: np.ndarray, label: np.ndarray) -> dict:
    """Where the student departs from the annotation, and who is right there.

    `outside_candidates`: the student's class is not in the row's candidate set. Only learning across rows can
    do that, so its accuracy there is the label purification the student adds. `disagree_with_vlm`: the
    student's class differs from the VLM's top-1 (its zero-shot prediction). `vlm_errors`: the labeled rows
    where the VLM's top-1 is wrong, and how often the student repeats that wrong class (`copied`) or is right
    there (`student_correct`): a student that copies most of them has learned the annotator, not the classes
    (bench/results/accuracy_notes.md §45: CIFAR-10 students copy about half, where they lose to the annotator).
    """
    n = len(pred)
    known = label >= 0
    outside = ~candidates[np.arange(n), pred] if n else np.zeros(0, dtype=bool)
    disagree = pred != vlm_pred
    right = pred == label
    vlm_right = vlm_pred == label

    def block(mask: np.ndarray) -> dict:
        m_known = mask & known
        return {
            "count": int(mask.sum()),
            "share": _ratio(mask.sum(), n),
            "labeled": int(m_known.sum()),
            "student_correct": int((m_known & right).sum()),
            "vlm_correct": int((m_known & vlm_right).sum()),
            "student_accuracy": _ratio((m_known & right).sum(), m_known.sum()),
            "vlm_accuracy": _ratio((m_known & vlm_right).sum(), m_known.sum()),
        }

    wrong = known & ~vlm_right
    copied, fixed = wrong & ~disagree, wrong & right  # the student repeats the VLM's class / gives the true one
    errors = {
        "count": int(wrong.sum()),
        "copied": int(copied.sum()),
        "copied_share": _ratio(copied.sum(), wrong.sum()),
        "student_correct": int(fixed.sum()),
        "student_accuracy": _ratio(fixed.sum(), wrong.sum()),
    }
    return {"outside_candidates": block(outside), "disagree_with_vlm": block(disagree), "vlm_errors": errors}


def overrule_rows(
    pred: np.ndarray, vlm_pred: np.ndarray, candidates: np.ndarray, confidence: np.ndarray, limit: int
) -> np.ndarray:
    """Row ids where the student overrules the VLM's top-1, for a human to check: rows outside the candidate
    set first (the boldest calls), then the most confident; at most `limit`."""
    rows = np.flatnonzero(pred != vlm_pred)
    if not len(rows):
        return rows
    outside = ~candidates[rows, pred[rows]]
    order = np.lexsort((-confidence[rows], ~outside))  # last key sorts first: outside before inside
    return rows[order][:limit]


def classification_summary(pred: np.ndarray, label: np.ndarray, num_classes: int) -> dict:
    """Accuracy and balanced accuracy of one predictor."""
    return {
        "accuracy": accuracy(pred, label),
        "balanced_accuracy": balanced_accuracy(pred, label, num_classes),
    }


def evaluate_predictions(
    *,
    student_pred: np.ndarray,
    vlm_pred: np.ndarray,
    label: np.ndarray,
    candidates: np.ndarray,
    classes: list[str],
    variants: dict[str, np.ndarray] | None = None,
) -> dict:
    """Every quality number of the report for one split.

    student_pred: (N,) the model's default prediction; variants: name -> (N,) predictions of other ways to
    use the model (ensemble, net1, net2); vlm_pred: (N,) the annotator's top-1; label: (N,) -1 unknown;
    candidates: (N, C) bool.
    """
    c = len(classes)
    n = len(student_pred)
    labeled = int((label >= 0).sum())
    student = classification_summary(student_pred, label, c)
    vlm = classification_summary(vlm_pred, label, c)
    gain = None
    if student["accuracy"] is not None:
        gain = student["accuracy"] - vlm["accuracy"]
    s_rec = per_class_recall(student_pred, label, c)
    v_rec = per_class_recall(vlm_pred, label, c)
    counts = np.bincount(label[label >= 0].astype(np.int64), minlength=c)
    per_class = {
        name: {"count": int(counts[i]), "student_accuracy": s_rec[i], "zero_shot_accuracy": v_rec[i]}
        for i, name in enumerate(classes)
    }
    return {
        "n": n,
        "labeled": labeled,
        "student_accuracy": student["accuracy"],
        "student_balanced_accuracy": student["balanced_accuracy"],
        "zero_shot_accuracy": vlm["accuracy"],
        "zero_shot_balanced_accuracy": vlm["balanced_accuracy"],
        "gain_over_zero_shot": gain,
        "variants": {k: classification_summary(v, label, c) for k, v in (variants or {}).items()},
        "per_class": per_class,
        **candidate_stats(candidates, label),
        **overrule_stats(student_pred, vlm_pred, candidates, label),
        "agreement_with_vlm": _ratio((student_pred == vlm_pred).sum(), n),
        "student_in_candidates": _ratio(candidates[np.arange(n), student_pred].sum(), n) if n else None,
        "prediction_counts": dict(zip(classes, class_counts(student_pred, c), strict=True)),
        "vlm_prediction_counts": dict(zip(classes, class_counts(vlm_pred, c), strict=True)),
    }
