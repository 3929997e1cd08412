"""Co-Reg losses (coreg-method.md §3.1, §3.4–3.6): exact values against slow per-element references."""

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.coreg.losses import (
    contrastive_masks,
    negative_entropy,
    noisy_contrastive_loss,
    partial_ce,
    prototype_loss,
    self_training_loss,
    warmup_loss,
)


def softmax_row(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


LOGITS = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 0.0], [3.0, -1.0, 0.0], [0.2, 0.1, -0.4]])


# ---------------------------------------------------------------- warm-up


def test_partial_ce_skips_all_class_and_empty_rows():
    cand = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0], [0, 0, 1]], dtype=torch.bool)
    p0, p3 = softmax_row(LOGITS[0].tolist()), softmax_row(LOGITS[3].tolist())
    expected = (-math.log(p0[0] + p0[1] + 1e-5) - math.log(p3[2] + 1e-5)) / 2
    assert partial_ce(LOGITS, cand).item() == pytest.approx(expected, rel=1e-6)


def test_partial_ce_no_row_qualifies_is_zero_with_grad():
    logits = LOGITS.clone().requires_grad_()
    cand = torch.tensor([[1, 1, 1], [0, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    loss = partial_ce(logits, cand)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_negative_entropy_and_warmup_sum():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(0.5) + 0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / 2
    assert negative_entropy(logits).item() == pytest.approx(expected, rel=1e-6)
    cand = torch.tensor([[True, False], [False, True]])
    out = warmup_loss(logits, cand)
    sup = (-math.log(0.5 + 1e-5) - math.log(0.25 + 1e-5)) / 2
    assert out["partial_ce"].item() == pytest.approx(sup, rel=1e-6)
    assert out["neg_entropy"].item() == pytest.approx(expected, rel=1e-6)
    assert out["loss"].item() == pytest.approx(sup + expected, rel=1e-6)


# ---------------------------------------------------------------- self-training


TARGETS = torch.tensor([[0.7, 0.2, 0.1], [0.0, 1.0, 0.0], [0.3, 0.3, 0.4], [0.1, 0.1, 0.8]])


def reference_self_training(logits, targets, n, lam_u):
    lx = []
    lu = []
    for i, (row, t) in enumerate(zip(logits.tolist(), targets.tolist(), strict=True)):
        p = softmax_row(row)
        if i < n:
            lx.append(-sum(tj * math.log(pj) for tj, pj in zip(t, p, strict=True)))
        else:
            lu.extend((pj - tj) ** 2 for tj, pj in zip(t, p, strict=True))
    l_x = sum(lx) / len(lx) if lx else 0.0
    l_u = sum(lu) / len(lu) if lu else 0.0
    return l_x, l_u, l_x + lam_u * l_u


@pytest.mark.parametrize("n", [0, 1, 3, 4])
def test_self_training_loss_matches_reference(n):
    out = self_training_loss(LOGITS, TARGETS, n_labeled=n, lambda_u=0.25)
    l_x, l_u, loss = reference_self_training(LOGITS, TARGETS, n, 0.25)
    assert out["l_x"].item() == pytest.approx(l_x, rel=1e-6, abs=1e-7)
    assert out["l_u"].item() == pytest.approx(l_u, rel=1e-6, abs=1e-7)
    assert out["loss"].item() == pytest.approx(loss, rel=1e-6, abs=1e-7)


def test_self_training_loss_grad_flows():
    logits = LOGITS.clone().requires_grad_()
    self_training_loss(logits, TARGETS, n_labeled=2, lambda_u=1.0)["loss"].backward()
    assert logits.grad.abs().sum() > 0


# ---------------------------------------------------------------- prototypes


def reference_prototype(emb, protos, ta, tb, lam, n, temp):
    kl_a, kl_b, mse_a, mse_b = [], [], [], []
    for i in range(emb.shape[0]):
        s = softmax_row([(emb[i] @ protos[c]).item() / temp for c in range(protos.shape[0])])
        if i < n:
            for t, acc in ((ta[i], kl_a), (tb[i], kl_b)):
                acc.append(
                    sum(tj * math.log(tj / sj) for tj, sj in zip(t.tolist(), s, strict=True) if tj > 0)
                )
        else:
            mse_a.extend((sj - tj) ** 2 for tj, sj in zip(ta[i].tolist(), s, strict=True))
            mse_b.extend((sj - tj) ** 2 for tj, sj in zip(tb[i].tolist(), s, strict=True))
    p = lam * sum(kl_a) / n + (1 - lam) * sum(kl_b) / n if n else 0.0
    u = lam * sum(mse_a) / len(mse_a) + (1 - lam) * sum(mse_b) / len(mse_b) if mse_a else 0.0
    return p, u


def test_prototype_loss_matches_reference_and_kl_div():
    emb = F.normalize(
        torch.tensor([[1.0, 0.0], [0.6, 0.8], [-1.0, 1.0], [0.3, -0.2]]), dim=1
    ).requires_grad_()
    protos = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]), dim=1).requires_grad_()
    ta, tb = TARGETS, TARGETS[[2, 0, 3, 1]]
    out = prototype_loss(emb, protos, ta, tb, lam=0.7, n_labeled=2, temperature=0.3)
    p, u = reference_prototype(emb.detach(), protos.detach(), ta, tb, 0.7, 2, 0.3)
    assert out["proto_p"].item() == pytest.approx(p, rel=1e-5)
    assert out["proto_u"].item() == pytest.approx(u, rel=1e-5)
    assert out["loss"].item() == pytest.approx(p + u, rel=1e-5)
    # the P term is torch's KL with reduction='batchmean', λ-mixed (§3.5)
    log_s = (emb.detach()[:2] @ protos.detach().T / 0.3).log_softmax(1)
    kl = 0.7 * F.kl_div(log_s, ta[:2], reduction="batchmean") + 0.3 * F.kl_div(
        log_s, tb[:2], reduction="batchmean"
    )
    assert out["proto_p"].item() == pytest.approx(kl.item(), rel=1e-5)
    out["loss"].backward()
    assert protos.grad is None  # prototypes are detached
    assert emb.grad.abs().sum() > 0


def test_prototype_loss_empty_parts():
    emb = F.normalize(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), dim=1).requires_grad_()
    protos = F.normalize(torch.eye(3, 4), dim=1)
    t = TARGETS[:3]
    only_u = prototype_loss(emb, protos, t, t, lam=1.0, n_labeled=0)
    only_p = prototype_loss(emb, protos, t, t, lam=1.0, n_labeled=3)
    assert only_u["proto_p"].item() == 0.0 and only_u["proto_u"].item() > 0
    assert only_p["proto_u"].item() == 0.0 and only_p["proto_p"].item() > 0
    (only_u["loss"] + only_p["loss"]).backward()
    assert emb.grad.abs().sum() > 0


# ---------------------------------------------------------------- contrastive

# Contrast set = [q0, q1, k0, k1, queue0, queue1, queue2]. Anchor 0: class 0, confident; anchor 1: class 0,
# unconfident. Queue: class 0 confident, class 0 unconfident, class 1 confident.
LABELS_ALL = torch.tensor([0, 0, 0, 0, 0, 0, 1])
CONF_ALL = torch.tensor([True, False, True, False, True, False, True])
ANCHOR_LABELS = torch.tensor([0, 0])
ANCHOR_CONF = torch.tensor([True, False])
SELF = torch.tensor([0, 1])
OWN = torch.tensor([2, 3])


def as_sets(mask):
    return [set(torch.nonzero(row).flatten().tolist()) for row in mask]


def masks(mode, valid=None):
    pos, inc = contrastive_masks(
        ANCHOR_LABELS,
        ANCHOR_CONF,
        LABELS_ALL,
        CONF_ALL,
        own_key_index=OWN,
        self_index=SELF,
        valid=valid,
        mode=mode,
    )
    return as_sets(pos), as_sets(inc)


def test_contrastive_masks_noisy():
    pos, inc = masks("noisy")
    # confident anchor: own key 2 + confident same-class queue 4; unconfident same-class 1, 3, 5 ignored
    assert pos[0] == {2, 4} and inc[0] == {2, 4, 6}
    # unconfident anchor: only its own key; every other same-class feature ignored, class 1 negative
    assert pos[1] == {3} and inc[1] == {3, 6}


def test_contrastive_masks_supcon_and_valid():
    pos, inc = masks("supcon")
    assert pos[0] == {1, 2, 3, 4, 5} and inc[0] == {1, 2, 3, 4, 5, 6}
    assert pos[1] == {0, 2, 3, 4, 5} and inc[1] == {0, 2, 3, 4, 5, 6}
    valid = torch.tensor([True, True, True, True, True, False, False])
    pos, inc = masks("supcon", valid)
    assert pos[0] == {1, 2, 3, 4} and inc[0] == {1, 2, 3, 4}
    with pytest.raises(ValueError):
        masks("bogus")


def reference_contrastive(q, keys, pos, inc, temp, base):
    per_anchor = []
    for i in range(q.shape[0]):
        logit = {j: (q[i] @ keys[j]).item() / temp for j in range(keys.shape[0])}
        denom = sum(math.exp(logit[j]) for j in inc[i])
        per_anchor.append(sum(math.log(math.exp(logit[j]) / denom) for j in pos[i]) / len(pos[i]))
    return -(temp / base) * sum(per_anchor) / len(per_anchor)


def contrast_features(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(2, 4, generator=g), dim=1).requires_grad_()
    rest = F.normalize(torch.randn(5, 4, generator=g), dim=1)
    return q, rest


@pytest.mark.parametrize("mode", ["noisy", "supcon"])
def test_noisy_contrastive_loss_matches_reference_and_grads_q(mode):
    q, rest = contrast_features()
    keys_all = torch.cat([q, rest])  # (7, 4) q inside the contrast set, with grad
    loss = noisy_contrastive_loss(
        q, keys_all, LABELS_ALL, CONF_ALL, anchor_labels=ANCHOR_LABELS, anchor_conf=ANCHOR_CONF,
        own_key_index=OWN, self_index=SELF, temperature=0.5, base_temperature=0.07, mode=mode,
    )  # fmt: skip
    pos, inc = masks(mode)
    expected = reference_contrastive(q.detach(), keys_all.detach(), pos, inc, 0.5, 0.07)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0 and torch.isfinite(q.grad).all()


def test_noisy_contrastive_loss_ignores_invalid_and_large_excluded_logits():
    q, rest = contrast_features(1)
    garbage = torch.cat([q.detach(), rest])
    garbage[5] = 1e4 * garbage[0]  # invalid queue slot with a huge logit: must have no effect
    valid = torch.tensor([True, True, True, True, True, False, True])
    kwargs = dict(anchor_labels=ANCHOR_LABELS, anchor_conf=ANCHOR_CONF, own_key_index=OWN, self_index=SELF)
    loss = noisy_contrastive_loss(q, garbage, LABELS_ALL, CONF_ALL, valid=valid, mode="supcon", **kwargs)
    pos, inc = masks("supcon", valid)
    expected = reference_contrastive(q.detach(), garbage, pos, inc, 0.07, 0.07)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert torch.isfinite(q.grad).all()


def test_noisy_contrastive_loss_without_positives_is_zero():
    q, rest = contrast_features(2)
    valid = torch.tensor([True, True, False, False, True, True, True])  # both own keys invalid
    loss = noisy_contrastive_loss(
        q, torch.cat([q, rest]), LABELS_ALL, CONF_ALL, anchor_labels=ANCHOR_LABELS,
        anchor_conf=torch.tensor([False, False]), own_key_index=OWN, self_index=SELF, valid=valid,
    )  # fmt: skip
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(q.grad, torch.zeros_like(q))
