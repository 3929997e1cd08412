"""Baselines (pipeline/baselines/): one short run of every method on a hand-made Context, the label
conventions, and exact values of each method's distinctive loss or update on hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.augment import BatchAugment
from pipeline.config import TrainConfig
from pipeline.methods import METHODS, get_method_module
from pipeline.networks import build_student
from pipeline.training import Context, Dist

BASELINES = ("ce", "kd", "proden", "cc", "cr_dpll", "pico", "alim", "dividemix")
N, C, S = 24, 3, 16


def make_ctx(seed: int = 0, diag: bool = True) -> Context:
    g = torch.Generator().manual_seed(seed)
    label = torch.arange(N) % C
    images = torch.randint(0, 256, (N, 3, S, S), generator=g, dtype=torch.uint8)
    images[torch.arange(N), label] = 230  # the class's channel is bright: a learnable signal
    cand = F.one_hot(label, C).bool() | (torch.rand(N, C, generator=g) < 0.3)
    cand[5] = False  # an annotator failure: empty set
    cand[7] = F.one_hot((label[7] + 1) % C, C).bool()  # noisy: true label outside the set
    trusted = torch.zeros(N, dtype=torch.bool)
    trusted[[1, 2]] = True
    probs = torch.softmax(torch.randn(N, C, generator=g) + 2 * cand.float(), dim=1)
    return Context(
        images=images, candidates=cand, trusted=trusted, trusted_label=torch.where(trusted, label, -1),
        vlm_probs=probs, vlm_pred=probs.argmax(1), augment=BatchAugment(image_size=S, mean=[0.5] * 3, std=[0.25] * 3),
        dist=Dist(), seed=seed, device=torch.device("cpu"),
        diag_label=label if diag else None,
    )


def make_method(name: str, **over):
    from pipeline.presets import resolve

    cfg = TrainConfig(
        annotated="", out="", method=name, preset="paper", arch="small_cnn", epochs=4, warmup_epochs=1, batch_size=8,
        queue_size=32, proj_dim=16, rampup_epochs=1, pico_prot_start=0, **over,
    )
    cfg = resolve(cfg, n_rows=N, gpu=False)[0]
    torch.manual_seed(0)
    make_net = lambda: build_student("small_cnn", num_classes=C, image_size=S, proj_dim=16)  # noqa: E731
    m = get_method_module(name).build(cfg, num_classes=C, make_net=make_net, num_rows=N)
    m.prepare(lambda model, opt: (model, opt))
    return m


def weights(m):
    return {k: v.clone() for k, v in m.prediction_weights().items()}


def test_registry_lists_every_baseline_with_a_cited_paper():
    for name in BASELINES:
        assert name in METHODS
        doc = get_method_module(name).__doc__
        assert doc and any(str(y) in doc for y in range(2015, 2026)), name  # cites a paper with its year


@pytest.mark.parametrize("name", BASELINES)
def test_each_method_trains_on_a_tiny_context(name):
    ctx, m = make_ctx(), make_method(name)
    before = weights(m)
    for epoch in (0, 1):  # epoch 1 is past warm-up: DivideMix co-divides, ALIM sets lambda
        metrics = m.train_epoch(epoch, ctx)
        assert all(math.isfinite(v) for v in metrics.values()), metrics
        assert "net1/loss" in metrics
    after = weights(m)
    nets = {k.split(".", 1)[0] for k in after}
    assert nets == ({"net1", "net2"} if name == "dividemix" else {"net1"})
    assert any(not torch.equal(before[k], after[k]) for k in after if k.endswith("weight"))
    x = ctx.augment.normalize(ctx.images[:4])
    assert m.predict_logits(x).shape == (4, C) and m.predict_logits(x, "net1").shape == (4, C)
    if name == "dividemix":
        assert metrics["net1/n_p"] + metrics["net1/n_u"] == N and metrics["net2/n_p"] >= 2  # trusted forced in
    else:
        with pytest.raises(ValueError):
            m.predict_logits(x, "net2")


@pytest.mark.parametrize("name", ["proden", "alim", "dividemix"])
def test_ground_truth_is_never_a_training_signal(name):
    """Runs with and without `diag_label` give identical weights (only `diag_*` metrics differ)."""
    a, b = make_method(name), make_method(name)
    ma = [a.train_epoch(e, make_ctx(diag=True)) for e in (0, 1)][-1]
    mb = [b.train_epoch(e, make_ctx(diag=False)) for e in (0, 1)][-1]
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(k.startswith("net1/diag_") for k in ma) and not any("diag_" in k for k in mb)


def test_label_views_trusted_one_hot_and_empty_sets_uninformative():
    from pipeline.baselines.single import hard_labels, partial_labels, uniform_over

    ctx = make_ctx()
    cand = partial_labels(ctx)
    assert torch.equal(cand[5], torch.ones(C))  # empty → all classes
    assert torch.equal(cand[1], F.one_hot(torch.tensor(1), C).float())  # trusted → its label
    assert hard_labels(ctx)[2] == 2 and torch.equal(hard_labels(ctx)[3:], ctx.vlm_pred[3:])
    assert torch.allclose(uniform_over(torch.tensor([[1.0, 0, 1]])), torch.tensor([[0.5, 0, 0.5]]))


# ------------------------------------------------------------------------ exact values, hand-made tensors
def test_kd_loss_is_tempered_kl():
    from pipeline.baselines.kd import kd_loss, kd_targets

    p = torch.tensor([[0.64, 0.32, 0.04]])
    t = kd_targets(p, torch.tensor([False]), torch.tensor([-1]), T=2.0)
    assert torch.allclose(t, torch.tensor([[0.8, 0.32**0.5, 0.2]]) / (1.0 + 0.32**0.5))  # p^(1/2), renormalised
    assert torch.allclose(kd_targets(p, torch.tensor([True]), torch.tensor([2]), T=2.0), torch.tensor([[0.0, 0, 1]]))
    z = torch.tensor([[1.0, 0.0, -1.0]])
    q = (z / 2).softmax(1)
    expect = 4 * (t * (t / q).log()).sum()
    assert torch.allclose(kd_loss(z, t, T=2.0), expect)
    assert torch.allclose(kd_loss(2 * t.log(), t, T=2.0), torch.tensor(0.0), atol=1e-6)  # student = teacher


def test_cc_is_minus_log_candidate_mass():
    from pipeline.coreg.losses import partial_ce

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))
    cand = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    expect = -(math.log(0.7 + 1e-5) + math.log(0.1 + 1e-5)) / 2
    assert partial_ce(logits, cand).item() == pytest.approx(expect, rel=1e-5)


def test_proden_weights_are_confidence_renormalised_over_candidates():
    from pipeline.baselines.proden import proden_update
    from pipeline.baselines.single import soft_ce

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    assert torch.allclose(proden_update(logits, torch.tensor([[0.0, 1, 1]])), torch.tensor([[0.0, 0.6, 0.4]]))
    w = torch.tensor([[0.0, 0.6, 0.4]])
    assert soft_ce(logits, w).item() == pytest.approx(-(0.6 * math.log(0.3) + 0.4 * math.log(0.2)), rel=1e-5)


def test_cr_dpll_terms():
    from pipeline.baselines.cr_dpll import complementary_loss, conformal_label, consistency_loss

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    cand = torch.tensor([[1.0, 1, 0]])
    assert complementary_loss(logits, cand).item() == pytest.approx(-math.log(0.8), rel=1e-5)
    a, b = torch.log(torch.tensor([[0.5, 0.3, 0.2]])), torch.log(torch.tensor([[0.2, 0.6, 0.2]]))
    g = torch.tensor([math.sqrt(0.1), math.sqrt(0.18)])  # geometric means of the two candidates
    assert torch.allclose(conformal_label([a, b], cand), torch.cat([g / g.sum(), torch.zeros(1)])[None])
    t = torch.tensor([[0.5, 0.3, 0.2]])
    assert consistency_loss([a, a, a], t).item() == pytest.approx(0.0, abs=1e-6)
    kl = (t * (t / b.exp()).log()).sum().item()
    assert consistency_loss([a, b], t).item() == pytest.approx(kl, rel=1e-5)


def test_pico_disambiguation_picks_the_best_candidate_prototype():
    m = make_method("pico")
    scores = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    w = m.label_weights(torch.tensor([[0.0, 1, 1], [1.0, 1, 1]]), torch.tensor([False, False]))
    assert torch.equal(m.disambiguate(scores, w), torch.tensor([[0.0, 1, 0], [0, 0, 1]]))


def test_alim_adjusted_weights_margin_and_adaptive_lambda():
    from pipeline.baselines.alim import adaptive_lambda, adjusted_weights, candidate_margin

    cand = torch.tensor([[1.0, 0, 0], [0, 1, 1], [1.0, 1, 1]])
    w = adjusted_weights(cand, 0.5, torch.tensor([False, True, False]))
    assert torch.equal(w, torch.tensor([[1.0, 0.5, 0.5], [0, 1, 1], [1, 1, 1]]))  # trusted row unchanged
    scores = torch.tensor([[0.2, 0.7, 0.1], [0.5, 0.25, 0.25], [0.3, 0.3, 0.4]])
    r = candidate_margin(scores, cand)
    assert torch.allclose(r[:2], torch.tensor([0.2 / 0.7, 0.25 / 0.5])) and math.isinf(r[2])
    assert adaptive_lambda(torch.tensor([0.9, 0.1, 0.5, 3.0, float("inf")]), 0.5) == pytest.approx(0.9)
    assert adaptive_lambda(torch.tensor([2.0, 3.0]), 0.5) == 1.0  # capped at 1 (ALIM --max1)
    assert adaptive_lambda(torch.tensor([0.1, 0.2]), 0.0) == 0.0
    onehot, scale = make_method("alim"), make_method("alim", alim_variant="scale")
    wts = torch.tensor([[1.0, 0.5, 0.5]])
    assert torch.equal(onehot.disambiguate(scores[:1], wts), torch.tensor([[0.0, 1, 0]]))  # 0.35 > 0.2
    assert torch.allclose(scale.disambiguate(scores[:1], wts), torch.tensor([[0.2, 0.35, 0.05]]) / 0.6)


def test_dividemix_prior_penalty():
    from pipeline.baselines.dividemix import prior_penalty

    assert prior_penalty(torch.tensor([[0.6, 0.4], [0.4, 0.6]])).item() == pytest.approx(0.0, abs=1e-7)
    expect = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    assert prior_penalty(torch.tensor([[0.8, 0.2]])).item() == pytest.approx(expect, rel=1e-5)


# ------------------------------------------------------------------------------ two processes equal one
@pytest.mark.parametrize("name", ["alim", "dividemix"])  # the two whose rows couple most (queue, mixup, GMM)
def test_two_processes_equal_one(name, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from tests.annotated import make_annotated

    ann = make_annotated(tmp_path / "ann", n_train=32, n_test=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    outs = []
    for nproc in (1, 2):
        out = tmp_path / f"p{nproc}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29700 + nproc + os.getpid() % 1000), "-m", "stages.cli", "train", str(ann),
               str(out), "--method", name, "--arch", "small_cnn", "--batch-size", "8", "--warmup-epochs", "1",
               "--epochs", "2", "--queue-size", "32", "--num-workers", "0", "--cpu"]  # fmt: skip
        r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0 and f"{nproc} process(es)" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
        outs.append(out)
    m1, m2 = ([json.loads(x) for x in (o / "metrics.jsonl").read_text().splitlines()] for o in outs)
    for a, b in zip(m1, m2, strict=True):
        for k in a:
            if "second" not in k:
                assert a[k] == pytest.approx(b[k], rel=1e-3, abs=1e-3), (a["epoch"], k)
    w1, w2 = (load_file(str(o / "model.safetensors")) for o in outs)
    assert all(torch.allclose(w1[k], w2[k], atol=2e-3, rtol=1e-3) for k in w1)
