"""Co-division (coreg-method.md §3.2): exact values on hand-built tensors."""

import math

import numpy as np
import pytest
import torch

from pipeline.coreg.division import (
    LossHistory,
    distribution_align,
    division_loss,
    gmm_clean_prob,
    masked_scores,
    minmax,
    prediction_balance,
    split,
)


def test_distribution_align_uniform_prior():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    mean = torch.tensor([0.6, 0.2, 0.2])
    # q / (mean / (1/3)) = q * [1/1.8, 1/0.6, 1/0.6], then renormalise.
    r0 = torch.tensor([0.5 / 1.8, 0.3 / 0.6, 0.2 / 0.6])
    r1 = torch.tensor([0.1 / 1.8, 0.1 / 0.6, 0.8 / 0.6])
    expected = torch.stack([r0 / r0.sum(), r1 / r1.sum()])
    out = distribution_align(probs, mean_probs=mean)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.sum(1), torch.ones(2))


def test_distribution_align_prior_matching_mean_is_identity():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    mean = torch.tensor([0.6, 0.2, 0.2])
    torch.testing.assert_close(distribution_align(probs, mean_probs=mean, prior=mean), probs)


def test_division_loss_max_in_set_and_empty_row():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1]])
    cand = torch.tensor([[False, True, True], [True, True, False], [False, False, False]])
    out = division_loss(probs, cand)
    # row 0: best in-set is 0.3; row 1: 0.6; row 2 empty → max over all classes 0.7.
    torch.testing.assert_close(out, -torch.log(torch.tensor([0.3, 0.6, 0.7]) + 1e-12))


def test_division_loss_zero_probability_is_finite():
    out = division_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[False, True]]))
    assert torch.isfinite(out).all() and out.item() == pytest.approx(-math.log(1e-12))


def test_minmax():
    torch.testing.assert_close(minmax(torch.tensor([2.0, 4.0, 3.0])), torch.tensor([0.0, 1.0, 0.5]))
    torch.testing.assert_close(minmax(torch.tensor([3.0, 3.0])), torch.zeros(2))


def test_loss_history_averages_last_h_normalised():
    h = LossHistory(3, history=2)
    out1 = h.push(torch.tensor([0.0, 1.0, 2.0]))  # normalised [0, .5, 1]
    torch.testing.assert_close(out1, torch.tensor([0.0, 0.5, 1.0]))
    out2 = h.push(torch.tensor([10.0, 0.0, 5.0]))  # normalised [1, 0, .5]
    torch.testing.assert_close(out2, torch.tensor([0.5, 0.25, 0.75]))
    out3 = h.push(torch.tensor([1.0, 1.0, 1.0]))  # constant → zeros; oldest ([0, .5, 1]) drops out
    torch.testing.assert_close(out3, torch.tensor([0.5, 0.0, 0.25]))
    assert int(h.count) == 3


def test_loss_history_state_dict_round_trip():
    h = LossHistory(2, history=3)
    h.push(torch.tensor([0.0, 1.0]))
    h2 = LossHistory(2, history=3)
    h2.load_state_dict(h.state_dict())
    torch.testing.assert_close(h2.push(torch.tensor([1.0, 0.0])), torch.tensor([0.5, 0.5]))


def test_gmm_clean_prob_bimodal():
    rng = np.random.default_rng(0)
    clean = rng.normal(0.1, 0.03, 60)
    noisy = rng.normal(0.8, 0.05, 40)
    w = gmm_clean_prob(torch.tensor(np.concatenate([clean, noisy])), seed=0)
    assert w.shape == (100,)
    assert (w[:60] > 0.9).all() and (w[60:] < 0.1).all()
    # deterministic given the seed
    np.testing.assert_array_equal(w, gmm_clean_prob(np.concatenate([clean, noisy]), seed=0))


def test_gmm_clean_prob_edge_cases_all_clean():
    np.testing.assert_array_equal(gmm_clean_prob(np.array([0.3]), seed=0), np.ones(1))
    np.testing.assert_array_equal(gmm_clean_prob(np.zeros(0), seed=0), np.ones(0))
    np.testing.assert_array_equal(gmm_clean_prob(torch.full((5,), 0.2), seed=0), np.ones(5))


def test_split_threshold_and_forced():
    w = torch.tensor([0.9, 0.2, 0.5, 0.7])
    p, w2 = split(w, forced_clean=torch.tensor([False, True, False, False]))
    assert p.tolist() == [True, True, False, True]  # 0.5 is not > 0.5
    torch.testing.assert_close(w2, torch.tensor([0.9, 1.0, 0.5, 0.7]))
    assert w[1].item() == pytest.approx(0.2)  # input untouched


def test_split_empty_p_takes_top_rows():
    w = torch.tensor([0.1, 0.3, 0.2, 0.3])
    p, w2 = split(w, min_clean=1)
    assert p.tolist() == [False, True, False, False]  # tie 0.3: lower index first
    torch.testing.assert_close(w2, w)  # promoted rows keep their w
    p, _ = split(w, min_clean=3)
    assert p.tolist() == [False, True, True, True]
    p, _ = split(w, min_clean=10)  # capped at N
    assert p.all()
    p, _ = split(w, min_clean=0)
    assert not p.any()


def test_split_accepts_numpy_and_keeps_enough():
    p, w2 = split(np.array([0.6, 0.8, 0.1]), min_clean=1)
    assert p.tolist() == [True, True, False] and w2.dtype == torch.float32


def test_masked_scores():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2], [1.0, 0.0, 0.0]])
    cand = torch.tensor([[False, True, True], [False, False, False], [False, True, True]])
    out = masked_scores(probs, cand)
    expected = torch.tensor([[0.0, 0.6, 0.4], [0.5, 0.3, 0.2], [0.0, 0.5, 0.5]])
    torch.testing.assert_close(out, expected)


def test_prediction_balance():
    assert prediction_balance(torch.tensor([5, 5, 5, 5])) == {"pred_classes": 4.0, "pred_min_share": 1.0}
    # one class never predicted: 3 classes, smallest share 0
    assert prediction_balance(torch.tensor([10, 6, 0, 4])) == {"pred_classes": 3.0, "pred_min_share": 0.0}
    out = prediction_balance(torch.tensor([6.0, 3.0, 1.0]))  # smallest share 0.1, times C = 0.3
    assert out["pred_classes"] == 3.0 and math.isclose(out["pred_min_share"], 0.3, rel_tol=1e-6)


def test_classwise_division_keeps_a_class_the_global_gmm_starves():
    """`--division class`: class 1's rows all have higher losses than class 0's (the network is unsure of
    class 1), so one global GMM sends every class-1 row to U; per class, the low-loss rows of each class
    stay in P, and the ranking inside each class is kept."""
    from pipeline.coreg.division import classwise_clean_prob

    rng = np.random.default_rng(0)
    clean0, noisy0 = rng.normal(0.05, 0.01, 40), rng.normal(0.3, 0.02, 10)
    clean1, noisy1 = rng.normal(0.6, 0.01, 40), rng.normal(0.9, 0.02, 10)
    loss = np.concatenate([clean0, noisy0, clean1, noisy1])
    group = np.repeat([0, 0, 1, 1], [40, 10, 40, 10])
    glob = gmm_clean_prob(loss, seed=0)
    assert (glob[group == 1] > 0.5).sum() == 0  # the global split starves class 1
    w = classwise_clean_prob(loss, group, seed=0)
    assert (w[:40] > 0.5).all() and (w[50:90] > 0.5).all()  # each class's clean rows in P
    assert (w[40:50] < 0.5).all() and (w[90:] < 0.5).all()  # each class's noisy rows in U
    assert classwise_clean_prob(np.array([0.1, 0.5, 0.9]), np.array([0, 1, 1]), seed=0)[0] == 1.0  # a lone row


def test_ranked_targets_and_warmup_loss_exact():
    from pipeline.coreg.losses import ranked_targets, ranked_warmup_loss

    vlm = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.0, 0.0, 1.0]])
    cand = torch.tensor([[1, 1, 0], [0, 1, 1], [0, 0, 0], [1, 1, 0]], dtype=torch.bool)
    t = ranked_targets(vlm, cand)
    assert torch.allclose(t[0], torch.tensor([0.625, 0.375, 0.0]))  # renormalised inside the set
    assert torch.allclose(t[1], torch.tensor([0.0, 0.75, 0.25]))
    assert torch.allclose(t[2], vlm[2])  # empty set: the annotator's distribution as it is
    assert torch.allclose(t[3], torch.tensor([0.5, 0.5, 0.0]))  # no mass inside the set: uniform over it
    logits = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    out = ranked_warmup_loss(logits, t[:2])
    logp = logits.log_softmax(1)
    want = -((t[:2] * logp).sum(1)).mean()
    assert torch.allclose(out["loss"], want) and torch.allclose(out["soft_ce"], want)


def test_keep_lost_classes_teaches_only_a_class_the_network_lost_from_the_annotator():
    from pipeline.coreg.division import keep_lost_classes

    # 8 rows, 3 classes. The annotator ranks class 2 first on rows 5-7 (and row 4 is tied: no class named);
    # the network predicts class 2 for none of the training rows: class 2 is lost, classes 0 and 1 are not
    annotator_top = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])
    ranked = torch.tensor([True, True, True, True, False, True, True, True])
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.1, 0.9, 0.0], [0.2, 0.8, 0.0],
                           [0.5, 0.5, 0.0], [0.6, 0.4, 0.0], [0.3, 0.7, 0.0], [0.7, 0.3, 0.0]])
    counts = torch.tensor([5.0, 3.0, 0.0])
    w = torch.full((8,), 0.3)
    p = torch.zeros(8, dtype=torch.bool)
    s2, w2, p2, kept = keep_lost_classes(scores, w, p, counts, annotator_top, ranked, floor=0.2)
    assert kept == 1
    assert p2.tolist() == [False] * 5 + [True] * 3  # the ranked rows of class 2 only; the tied row 4 is not named
    assert torch.equal(s2[5:], torch.tensor([[0.0, 0.0, 1.0]] * 3)) and torch.equal(w2[5:], torch.ones(3))
    assert torch.equal(s2[:5], scores[:5]) and torch.equal(w2[:5], w[:5])
    assert torch.equal(scores[5], torch.tensor([0.6, 0.4, 0.0])) and not p.any()  # inputs untouched
    # class 2 predicted once for its 3 named rows: above a fifth of them, not lost; below a half, lost
    once = torch.tensor([5.0, 2.0, 1.0])
    assert keep_lost_classes(scores, w, p, once, annotator_top, ranked, floor=0.2)[3] == 0
    assert keep_lost_classes(scores, w, p, once, annotator_top, ranked, floor=0.5)[3] == 1
    # a class the annotator never ranks first is never "lost" (a truly absent class stays absent)
    none = annotator_top.clone()
    none[4:] = 0
    assert keep_lost_classes(scores, w, p, torch.tensor([8.0, 0.0, 0.0]), none, ranked, floor=0.9)[3] == 1  # class 1 only
    assert keep_lost_classes(scores, w, p, torch.tensor([6.0, 2.0, 0.0]), none, ranked, floor=0.9)[3] == 0
