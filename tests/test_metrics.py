"""Exact metric values on hand-built arrays."""

import numpy as np
import pytest

from pipeline.metrics import (
    accuracy,
    balanced_accuracy,
    candidate_stats,
    confusion_matrix,
    evaluate_predictions,
    overrule_rows,
    overrule_stats,
)
from pipeline.schema import candidate_matrix

# 6 rows, 3 classes; the last row is unlabeled.
LABEL = np.array([0, 0, 0, 1, 2, -1])
STUDENT = np.array([0, 0, 1, 1, 1, 2])
VLM = np.array([0, 1, 1, 1, 2, 0])
CANDS = candidate_matrix([[0], [1], [0, 1], [1, 2], [2], []], 3)


def test_accuracy_counts_labeled_rows_only():
    assert accuracy(STUDENT, LABEL) == pytest.approx(3 / 5)
    assert accuracy(VLM, LABEL) == pytest.approx(3 / 5)
    assert accuracy(STUDENT, np.full(6, -1)) is None


def test_balanced_accuracy_is_mean_recall_over_present_classes():
    # student recalls: class 0: 2/3, class 1: 1/1, class 2: 0/1
    assert balanced_accuracy(STUDENT, LABEL, 3) == pytest.approx((2 / 3 + 1 + 0) / 3)
    # a class absent from the labels does not count (4 classes, class 3 never occurs)
    assert balanced_accuracy(STUDENT, LABEL, 4) == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_confusion_matrix_rows_are_truth():
    cm = confusion_matrix(LABEL, STUDENT, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 1, 0], [0, 1, 0]]


def test_candidate_stats():
    s = candidate_stats(CANDS, LABEL)
    # labels in set: row0 yes, row1 no (0 not in {1}), row2 yes, row3 yes, row4 yes -> 4/5
    assert s["candidate_coverage"] == pytest.approx(4 / 5)
    assert s["mean_candidates"] == pytest.approx(7 / 6)
    assert s["singleton_share"] == pytest.approx(3 / 6)
    assert s["empty_share"] == pytest.approx(1 / 6)


def test_overrule_stats():
    s = overrule_stats(STUDENT, VLM, CANDS, LABEL)
    out = s["outside_candidates"]
    # student outside its set: row1 (0 not in {1}), row4 (1 not in {2}), row5 (2 not in {}) -> 3 rows
    assert (out["count"], out["labeled"], out["student_correct"], out["vlm_correct"]) == (3, 2, 1, 1)
    assert out["share"] == pytest.approx(0.5) and out["student_accuracy"] == pytest.approx(0.5)
    dis = s["disagree_with_vlm"]
    # student != vlm: rows 1, 4, 5; row1 student right, row4 vlm right
    assert (dis["count"], dis["labeled"], dis["student_correct"], dis["vlm_correct"]) == (3, 2, 1, 1)
    err = s["vlm_errors"]
    # VLM wrong on labeled rows 1 (1 for 0) and 2 (1 for 0); the student repeats row 2's class and is right on row 1
    assert (err["count"], err["copied"], err["student_correct"]) == (2, 1, 1) and err["copied_share"] == pytest.approx(0.5)
    none = overrule_stats(STUDENT, VLM, CANDS, np.full(6, -1))["vlm_errors"]  # no labels: nothing to count
    assert (none["count"], none["copied_share"]) == (0, None)


def test_overrule_rows_put_outside_set_calls_first():
    pred = np.array([1, 2, 0, 0])
    vlm = np.array([0, 1, 0, 1])
    cands = candidate_matrix([[0, 1], [1], [0], [0, 1]], 3)
    conf = np.array([0.9, 0.5, 0.99, 0.6])
    # overrules: rows 0 (inside), 1 (outside), 3 (inside); row 2 agrees
    assert overrule_rows(pred, vlm, cands, conf, 10).tolist() == [1, 0, 3]
    assert overrule_rows(pred, vlm, cands, conf, 2).tolist() == [1, 0]
    assert overrule_rows(vlm, vlm, cands, conf, 2).tolist() == []


def test_evaluate_predictions_report_block():
    r = evaluate_predictions(
        student_pred=STUDENT, vlm_pred=VLM, label=LABEL, candidates=CANDS, classes=["a", "b", "c"],
        variants={"net1": VLM},
    )  # fmt: skip
    assert r["n"] == 6 and r["labeled"] == 5
    assert r["gain_over_zero_shot"] == pytest.approx(0.0)
    assert r["per_class"]["a"] == {"count": 3, "student_accuracy": pytest.approx(2 / 3), "zero_shot_accuracy": pytest.approx(1 / 3)}
    assert r["per_class"]["c"]["student_accuracy"] == 0.0 and r["per_class"]["c"]["zero_shot_accuracy"] == 1.0
    assert r["variants"]["net1"]["accuracy"] == pytest.approx(3 / 5)
    assert r["agreement_with_vlm"] == pytest.approx(3 / 6)
    assert r["student_in_candidates"] == pytest.approx(3 / 6)
    assert r["prediction_counts"] == {"a": 2, "b": 3, "c": 1}
    assert r["vlm_prediction_counts"] == {"a": 2, "b": 3, "c": 1}


def test_evaluate_predictions_without_labels_says_unknown():
    r = evaluate_predictions(
        student_pred=STUDENT, vlm_pred=VLM, label=np.full(6, -1), candidates=CANDS, classes=["a", "b", "c"]
    )
    assert r["student_accuracy"] is None and r["zero_shot_accuracy"] is None and r["gain_over_zero_shot"] is None
    assert r["candidate_coverage"] is None and r["mean_candidates"] == pytest.approx(7 / 6)
    assert r["per_class"]["a"] == {"count": 0, "student_accuracy": None, "zero_shot_accuracy": None}
    assert r["agreement_with_vlm"] == pytest.approx(0.5)
