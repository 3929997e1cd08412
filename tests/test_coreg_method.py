"""Co-Reg orchestration (pipeline/coreg/method.py, step.py) on a hand-built Context: 36 class-coloured 16x16
images, 3 classes, candidate sets with known noise, one process, small_cnn, tiny settings."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.augment import BatchAugment
from pipeline.config import TrainConfig
from pipeline.coreg import method as method_mod
from pipeline.coreg.method import build
from pipeline.coreg.step import StepNets, StepParams, coreg_step
from pipeline.networks import build_student
from pipeline.training import Context, Dist
from pipeline.two_networks import cycle

N, C = 36, 3
COLOURS = np.array([[220, 40, 40], [40, 200, 40], [40, 60, 220]], dtype=np.float64)


def make_ctx(*, seed=0, data_seed=0, eta=0.3, q=0.3, clean=False, empty=(), all_class=(), trusted=()):
    """Row i has class i % 3. Noisy sets: extra classes with prob q; with prob eta the true label is
    replaced by a wrong one. `clean`: every set is {true label}."""
    g = np.random.default_rng(data_seed)
    labels = np.arange(N) % C
    brightness = g.uniform(0.6, 1.0, (N, 1, 1, 1))
    imgs = COLOURS[labels][:, :, None, None] * brightness + g.normal(0, 25, (N, 3, 16, 16))
    cand = np.zeros((N, C), dtype=bool)
    for i, y in enumerate(labels):
        if clean:
            cand[i, y] = True
            continue
        for j in range(C):
            cand[i, j] |= j != y and g.random() < q
        if g.random() < eta:
            cand[i, (y + 1 + g.integers(C - 1)) % C] = True  # the true label misses the set
        else:
            cand[i, y] = True
    cand[list(empty)] = False
    cand[list(all_class)] = True
    probs = cand + 0.01
    t = np.zeros(N, dtype=bool)
    t[list(trusted)] = True
    return Context(
        images=torch.as_tensor(np.clip(imgs, 0, 255).astype(np.uint8)),
        candidates=torch.as_tensor(cand),
        trusted=torch.as_tensor(t),
        trusted_label=torch.as_tensor(np.where(t, labels, -1)),
        vlm_probs=torch.as_tensor(probs / probs.sum(1, keepdims=True), dtype=torch.float32),
        vlm_pred=torch.as_tensor(probs.argmax(1)),
        augment=BatchAugment(image_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
        dist=Dist(),
        seed=seed,
        device=torch.device("cpu"),
        diag_label=torch.as_tensor(labels),
    )


def make_cfg(**kw) -> TrainConfig:
    base = dict(annotated="-", out="-", arch="small_cnn", epochs=4, batch_size=8, warmup_epochs=1, queue_size=32,
                start_cont=0, proj_dim=16)  # fmt: skip
    from pipeline.presets import resolve

    # the paper's mechanics unless a test says otherwise; the preset fills what is not given (like the CLI)
    return resolve(TrainConfig(**{"preset": "paper", **base, **kw}), n_rows=N, gpu=False)[0]


def make_method(cfg):
    torch.manual_seed(0)
    m = build(
        cfg,
        num_classes=C,
        make_net=lambda: build_student("small_cnn", num_classes=C, image_size=16, proj_dim=16),
        num_rows=N,
    )
    m.prepare(lambda model, opt: (model, opt))
    return m


def snapshot(m) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.prediction_weights().items()}


def changed(a, b, prefix):
    return any(not torch.equal(a[k], b[k]) for k in a if k.startswith(prefix))


def all_finite(metrics):
    return all(math.isfinite(v) for v in metrics.values())


def run(cfg, ctx, epochs):
    m = make_method(cfg)
    out = [m.train_epoch(e, ctx) for e in epochs]
    return m, out


@pytest.fixture(scope="module")
def main_run():
    """Warm-up (epoch 0), a Co-Reg epoch without the representation terms (1), one with them (2)."""
    cfg, ctx = make_cfg(), make_ctx()
    m = make_method(cfg)
    snaps, metrics = [snapshot(m)], []
    for e in range(3):
        metrics.append(m.train_epoch(e, ctx))
        snaps.append(snapshot(m))
    return {"m": m, "ctx": ctx, "cfg": cfg, "snaps": snaps, "metrics": metrics}


# ------------------------------------------------------------------------------------------- epochs


def test_warmup_epoch_trains_both_nets(main_run):
    w = main_run["metrics"][0]
    assert w["phase"] == 0.0 and all_finite(w)
    for n in ("net1", "net2"):
        assert {f"{n}/loss", f"{n}/partial_ce", f"{n}/neg_entropy"} <= w.keys()
        assert w[f"{n}/loss"] == pytest.approx(w[f"{n}/partial_ce"] + w[f"{n}/neg_entropy"], rel=1e-5)
        assert w[f"{n}/neg_entropy"] < 0  # Σ p log p of a non-degenerate softmax
        assert changed(main_run["snaps"][0], main_run["snaps"][1], n + ".")


def test_coreg_epochs_train_and_update_state(main_run):
    m = main_run["m"]
    for e in (1, 2):
        r = main_run["metrics"][e]
        assert r["phase"] == 1.0 and all_finite(r)
        for n in ("net1", "net2"):
            for k in ("loss", "l_x", "l_u", "proto", "cont", "n_p", "n_u", "mean_w", "diag_pseudo_acc_p"):
                assert f"{n}/{k}" in r, (e, n, k)
            assert r[f"{n}/n_p"] >= 1 and r[f"{n}/n_p"] + r[f"{n}/n_u"] == N
            assert 0.0 <= r[f"{n}/mean_w"] <= 1.0
            assert changed(main_run["snaps"][e], main_run["snaps"][e + 1], n + ".")
    assert main_run["metrics"][1]["net1/n_u"] > 0 and main_run["metrics"][1]["net1/l_u"] > 0  # U really used
    assert int(m.history["net1"].count) == int(m.history["net2"].count) == 2  # one division per Co-Reg epoch
    assert int(m.queues["net1"].filled) == int(m.queues["net2"].filled) == 32  # enqueued every step
    assert torch.isfinite(m.protos.prototypes).all()
    norms = m.protos.prototypes.norm(dim=1)
    assert torch.allclose(norms, torch.ones(C), atol=1e-5)  # every class was seen; rows are unit vectors
    assert m.raw["net1"].training and m.raw["net2"].training  # eval-mode phases restore train mode


def test_same_seed_same_weights(main_run):
    m, metrics = run(main_run["cfg"], make_ctx(), range(3))
    again = snapshot(m)
    assert again.keys() == main_run["snaps"][-1].keys()
    for k, v in main_run["snaps"][-1].items():
        assert torch.equal(again[k], v), k
    assert metrics == main_run["metrics"]


def test_other_seed_other_weights(main_run):
    m, _ = run(main_run["cfg"], make_ctx(seed=1), range(2))  # same init (torch seed), other counter-RNG seed
    assert changed(snapshot(m), main_run["snaps"][2], "net1.")


# ------------------------------------------------------------------------------------------- orchestration


def test_co_division_order_and_key_resync():
    """Both nets divided before either trains; net1 trains on net2's split and vice versa; keys re-synced."""
    m, ctx = make_method(make_cfg()), make_ctx()
    log = []

    def divide(epoch, i, n, ctx, cand, top=None):
        log.append(("divide", n))
        return {"tag": n, "counts": torch.ones(C)}

    def train(epoch, i, n, partner, div, own, ctx):
        log.append(("train", n, partner, div["tag"], own["tag"]))
        return {}

    m._divide, m._train = divide, train
    with torch.no_grad():
        for p in m.keys["net1"].parameters():
            p.add_(1.0)
    m.train_epoch(0, ctx)  # warm-up: no division, keys untouched
    assert log == []
    assert not torch.equal(m.keys["net1"].fc.weight, m.raw["net1"].fc.weight)
    m.train_epoch(1, ctx)
    assert log == [("divide", "net1"), ("divide", "net2"), ("train", "net1", "net2", "net2", "net1"),
                   ("train", "net2", "net1", "net1", "net2")]  # fmt: skip
    for n in ("net1", "net2"):
        for (name, k), q in zip(m.keys[n].named_parameters(), m.raw[n].parameters(), strict=True):
            assert torch.equal(k, q), (n, name)


def test_modes_division_in_eval_partner_in_eval_trained_in_train():
    m, ctx = make_method(make_cfg(warmup_epochs=0)), make_ctx()
    seen = {"net1": [], "net2": []}
    for n in seen:
        m.raw[n].register_forward_pre_hook(lambda mod, args, n=n: seen[n].append(mod.training))
    cand = m._candidates(ctx)
    m._divide(0, 0, "net1", ctx, cand)
    assert seen["net1"] and not any(seen["net1"]) and seen["net2"] == []
    seen["net1"].clear()
    div = m._divide(0, 1, "net2", ctx, cand)
    seen["net2"].clear()
    m._train(0, 0, "net1", "net2", div, div, ctx)
    assert seen["net1"] and all(seen["net1"])  # own K views, mixup, queries
    assert seen["net2"] and not any(seen["net2"])  # partner's U views only, eval mode
    assert m.raw["net2"].training


def test_division_history_gmm_and_split():
    cfg = make_cfg(warmup_epochs=0, gmm_history=2)
    m, ctx = make_method(cfg), make_ctx()
    cand = m._candidates(ctx)
    d0 = m._divide(0, 0, "net1", ctx, cand)
    assert d0["p"].dtype == torch.bool and d0["p"].shape == (N,)
    assert torch.equal(d0["p"], d0["w"] > cfg.p_threshold) or int(d0["p"].sum()) == 1
    assert torch.allclose(d0["scores"].sum(1), torch.ones(N), atol=1e-5)
    assert ((d0["scores"] > 0) <= cand).all()  # partner scores live on the candidate set (no empty rows here)
    for e in (1, 2, 3):
        m._divide(e, 0, "net1", ctx, cand)
    assert int(m.history["net1"].count) == 4 and int(m.history["net2"].count) == 0
    assert m.history["net1"].losses.min() >= 0 and m.history["net1"].losses.max() <= 1  # min-max normalised


def test_step_params_ramp_and_delayed_start():
    m = make_method(make_cfg(warmup_epochs=2, start_cont=3, rampup_epochs=16, lambda_u=2.0))
    assert m._step_params(2, 2.0).lambda_u == 0.0
    assert m._step_params(10, 10.0).lambda_u == pytest.approx(1.0)  # 2 * 8/16
    assert m._step_params(10, 10.5).lambda_u == pytest.approx(2 * 8.5 / 16)  # fractional epochs
    assert m._step_params(40, 40.0).lambda_u == 2.0
    assert not m._step_params(5, 5.0).representation  # epoch > warm_up + start_cont, strictly
    assert m._step_params(6, 6.0).representation


# ------------------------------------------------------------------------------------------- one step


def _step(m, ctx, *, representation, co=True, partner_epoch=0, keys=("t", 0)):
    """One coreg_step of net1 on P = rows 0..7, U = rows 8..15, with fresh divisions of both nets
    (`partner_epoch` picks the weak view of net2's division)."""
    cand = m._candidates(ctx)
    d1, d2 = m._divide(0, 0, "net1", ctx, cand), m._divide(partner_epoch, 1, "net2", ctx, cand)
    p, u = torch.arange(8), torch.arange(8, 16)
    nets = StepNets(
        m.wrapped["net1"], m.raw["net1"], m.keys["net1"], m.queues["net1"], m.raw["net2"], m.protos
    )
    hp = StepParams(k_views=2, sharpen_t=0.5, mixup_alpha=4.0, lambda_u=0.5, proto_m=0.999, proto_t=0.3, cont_t=0.07,
                    moco_m=0.999, lambda_proto=0.1, lambda_cont=0.1, representation=representation,
                    co_pseudo_labels=co, prototypes=True, contrast="noisy")  # fmt: skip
    m.opts["net1"].zero_grad(set_to_none=True)
    return coreg_step(ctx, nets, hp, p_idx=p, u_idx=u, n_p=8, n_u=8, p_w=d2["w"][p], p_scores=d2["scores"][p],
                      p_self_scores=d1["scores"][p], p_self_w=d1["w"][p], keys=keys)  # fmt: skip


def test_step_loss_composition():
    m, ctx = make_method(make_cfg()), make_ctx()
    off = _step(m, ctx, representation=False)
    assert float(off["loss"]) == pytest.approx(float(off["l_x"] + 0.5 * off["l_u"]), rel=1e-6)
    assert off["proto"] > 0 and off["cont"] > 0  # computed (and logged) but not trained on yet
    on = _step(m, ctx, representation=True, keys=("t", 1))
    expect = on["l_x"] + 0.5 * on["l_u"] + 0.1 * on["proto"] + 0.1 * on["cont"]
    assert float(on["loss"]) == pytest.approx(float(expect), rel=1e-6)
    assert m.raw["net1"].proj[0].weight.grad.abs().sum() > 0  # the projector trains once the terms are on
    for t in (on["targets_p"], on["targets_u"]):
        assert t.shape == (8, C) and torch.allclose(t.sum(1), torch.ones(8))


def test_without_co_pseudo_labels_partner_scores_are_ignored():
    """Same step twice, the second time with another division of the partner (other weak view, second
    history entry): the P targets follow the partner's scores with Co-PL and ignore them without."""
    ctx = make_ctx()
    targets = {}
    for co in (True, False):
        m = make_method(make_cfg())
        a = _step(m, ctx, representation=False, co=co)
        b = _step(m, ctx, representation=False, co=co, partner_epoch=5)
        targets[co] = (a["targets_p"], b["targets_p"])
    assert not torch.allclose(*targets[True])
    assert torch.equal(*targets[False])


# ------------------------------------------------------------------------------------------- trusted rows


TRUSTED = (0, 1, 2, 3, 4, 5)


def test_trusted_rows_forced_clean_with_one_hot_targets(monkeypatch):
    ctx = make_ctx(trusted=TRUSTED)
    labels = ctx.diag_label
    t = torch.tensor(TRUSTED)
    ctx.candidates[t] = ~torch.nn.functional.one_hot(labels[t], C).bool()  # the VLM's set misses the label
    m = make_method(make_cfg())
    cand = m._candidates(ctx)
    assert torch.equal(cand[t], torch.nn.functional.one_hot(labels[t], C).bool())
    for i, n in enumerate(("net1", "net2")):
        d = m._divide(0, i, n, ctx, cand)
        assert d["p"][t].all() and (d["w"][t] == 1).all()
        assert torch.equal(d["scores"][t], torch.nn.functional.one_hot(labels[t], C).float())

    seen = []
    real = method_mod.coreg_step

    def spy(ctx, nets, hp, **kw):
        out = real(ctx, nets, hp, **kw)
        seen.append((kw["p_idx"], out["targets_p"]))
        return out

    monkeypatch.setattr(method_mod, "coreg_step", spy)
    m.train_epoch(0, ctx)
    m.train_epoch(1, ctx)
    rows = torch.cat([p for p, _ in seen])
    targets = torch.cat([tp for _, tp in seen])
    trusted_hits = ctx.trusted[rows]
    # P is cut into full batches of 8 (the short tail waits for the next epoch), so most, not all, appear.
    assert int(trusted_hits.sum()) >= len(TRUSTED)
    one_hot = torch.nn.functional.one_hot(labels[rows[trusted_hits]], C).float()
    assert torch.equal(targets[trusted_hits], one_hot)


# ------------------------------------------------------------------------------------------- switches & edges


def test_without_unlabeled_no_u_loss():
    _, (_, r) = run(make_cfg(use_unlabeled=False), make_ctx(), range(2))
    assert all_finite(r)
    for n in ("net1", "net2"):
        assert r[f"{n}/n_u"] > 0  # U exists but is discarded
        assert r[f"{n}/l_u"] == 0.0
        assert f"{n}/diag_pseudo_acc_u" not in r  # no U row was pseudo-labelled


def test_u_confidence_trains_only_on_confident_u_rows(monkeypatch):
    """--u-confidence: the U rows of a step are those whose two networks' mean division-pass prediction reaches
    the threshold; 1.0 keeps none of them (so no U loss), and it needs U switched on."""
    from pipeline.coreg import method as method_mod
    from pipeline.errors import CoregError

    seen = []
    real = method_mod.coreg_step
    monkeypatch.setattr(method_mod, "coreg_step", lambda ctx, nets, hp, **kw: seen.append(kw["u_idx"]) or real(ctx, nets, hp, **kw))
    m = make_method(make_cfg(use_unlabeled=True, u_confidence=0.55))
    ctx = make_ctx()
    m.train_epoch(0, ctx)
    divs = {}
    real_divide = m._divide
    monkeypatch.setattr(m, "_divide", lambda *a: divs.setdefault(a[2], real_divide(*a)))
    r = m.train_epoch(1, ctx)
    conf = (divs["net1"]["raw"] + divs["net2"]["raw"]).max(1).values / 2
    allowed = ~divs["net2"]["p"] & (conf >= 0.55)  # net1 trains on net2's division
    used = torch.cat([u for u in seen[: len(seen) // 2]])
    assert used.numel() > 0 and bool(allowed[used].all())
    assert 0 < r["net1/n_u_used"] < r["net1/n_u"]
    _, (_, r1) = run(make_cfg(use_unlabeled=True, u_confidence=1.0), make_ctx(), range(2))
    assert r1["net1/n_u_used"] == 0 and r1["net1/l_u"] == 0.0 and r1["net1/n_u"] > 0
    with pytest.raises(CoregError, match="add --use-unlabeled"):
        make_method(make_cfg(use_unlabeled=False, u_confidence=0.9))


@pytest.mark.parametrize(
    "switch", [{"co_pseudo_labels": False}, {"prototypes": False}, {"contrast": "supcon"}]
)
def test_ablations_run(switch):
    m, (r0, r1) = run(make_cfg(warmup_epochs=0, **switch), make_ctx(), range(2))  # epoch 1 has all terms on
    assert all_finite(r0) and all_finite(r1)
    assert r1["net1/l_x"] > 0 and r1["net2/cont"] != 0
    if switch.get("prototypes") is False:
        assert "net1/proto" not in r1 and not m.protos.prototypes.any()
    else:
        assert "net1/proto" in r1 and m.protos.prototypes.any()


def test_unknown_contrast_is_refused():
    from pipeline.errors import CoregError

    with pytest.raises(CoregError, match="contrast"):
        make_method(make_cfg(contrast="moco"))


def test_empty_and_all_class_candidate_rows():
    ctx = make_ctx(empty=(0, 1, 2, 3), all_class=(4, 5, 6, 7))
    m, rs = run(make_cfg(), ctx, range(3))
    assert all(all_finite(r) for r in rs)
    assert all(torch.isfinite(v).all() for v in snapshot(m).values())
    assert torch.isfinite(m.history["net1"].losses).all()


def test_all_clean_dataset_trains():
    ctx = make_ctx(clean=True)
    m = make_method(make_cfg())
    before = snapshot(m)
    rs = [m.train_epoch(e, ctx) for e in range(2)]
    assert all(all_finite(r) for r in rs)
    assert rs[1]["net1/diag_p_valid"] == 1.0 and rs[1]["net1/n_p"] >= 1
    assert changed(before, snapshot(m), "net1.") and changed(before, snapshot(m), "net2.")


def test_p_smaller_than_batch_and_empty_u():
    # τ = 1: no row passes, so P falls back to the single best row (|P| = 1 < batch 8), U = the rest.
    _, (r,) = run(make_cfg(warmup_epochs=0, p_threshold=1.0), make_ctx(), [0])
    assert r["net1/n_p"] == 1 and r["net2/n_p"] == 1 and all_finite(r)
    # τ < 0: every row is in P, U is empty.
    _, (r,) = run(make_cfg(warmup_epochs=0, p_threshold=-1.0), make_ctx(), [0])
    assert r["net1/n_u"] == 0 and r["net1/l_u"] == 0.0 and all_finite(r)


def test_cycle_yields_empty_batches_when_u_too_small_for_the_world():
    ctx = replace(make_ctx(), dist=Dist(rank=0, world=2))
    it = cycle(torch.tensor([7]), 0, ctx, ("u",))
    assert next(it).numel() == 0 and next(it).numel() == 0
    it = cycle(torch.arange(10), 4, ctx, ("u",))
    first = [next(it) for _ in range(2)]  # one pass = 2 full batches of 4 (the short tail is dropped)
    assert all(b.numel() == 4 for b in first) and len(set(torch.cat(first).tolist())) == 8


# ------------------------------------------------------------------------------------------- prediction


def test_predict_logits(main_run):
    m, ctx = main_run["m"], main_run["ctx"]
    x = ctx.augment.normalize(ctx.images[:5])
    l1, l2 = m.predict_logits(x, which="net1"), m.predict_logits(x, which="net2")
    ens = m.predict_logits(x, which="ensemble")
    assert l1.shape == l2.shape == (5, C) and not torch.allclose(l1, l2)
    assert torch.allclose(ens, l1 + l2)
    assert torch.equal(m.predict_logits(x), ens)  # default = cfg.predict_with = ensemble
    m.cfg = replace(m.cfg, predict_with="net2")
    try:
        assert torch.equal(m.predict_logits(x), l2)
    finally:
        m.cfg = replace(m.cfg, predict_with="ensemble")
    assert m.raw["net1"].training and m.raw["net2"].training
    with torch.no_grad():
        m.raw["net1"].eval()
        assert torch.allclose(l1, m.raw["net1"](x))  # eval-mode logits
        m.raw["net1"].train()


def test_prior_penalty_option():
    """--prior-penalty (off by default, not in the paper) adds DivideMix's uniform-prior term to the loss."""
    from pipeline.coreg.losses import prior_penalty
    from pipeline.errors import CoregError

    _, (_, r0) = run(make_cfg(), make_ctx(), [0, 1])
    assert "net1/prior" not in r0
    _, (_, r1) = run(make_cfg(prior_penalty=2.0), make_ctx(), [0, 1])
    assert r1["net1/prior"] >= 0.0 and all_finite(r1)
    # epoch 1 has no representation terms: loss = l_x + ramp(t) * l_u + 2 * prior, with 0 <= ramp <= 1
    rest = r1["net1/loss"] - r1["net1/l_x"] - 2.0 * r1["net1/prior"]
    assert r1["net1/prior"] > 0 and -1e-5 <= rest <= r1["net1/l_u"] + 1e-5
    uniform = torch.zeros(4, 3)
    assert float(prior_penalty(uniform.softmax(1))) == 0.0  # a balanced batch costs nothing
    assert float(prior_penalty(torch.tensor([[10.0, 0, 0]] * 4).softmax(1))) > 1.0  # a collapsed one does
    with pytest.raises(CoregError, match="--prior-penalty"):
        make_method(make_cfg(prior_penalty=-1.0))


def test_default_preset_mechanisms_run_and_take_n_over_b_steps(monkeypatch):
    """The default preset's mechanisms (not in the paper): the ranked warm-up (soft CE to the annotator's
    probabilities inside the set), the class-wise division, N/B steps per post-warm-up epoch whatever |P|, and
    partner scores times the annotator's probabilities."""
    import pipeline.coreg.method as method_mod

    cfg = make_cfg(division="class", epoch_steps="all", warmup_loss="vlm", partner_scores="vlm")
    ctx = make_ctx()
    calls = []
    real = method_mod.coreg_step
    monkeypatch.setattr(method_mod, "coreg_step", lambda *a, **k: calls.append(k["p_idx"].numel()) or real(*a, **k))
    m, metrics = run(cfg, ctx, range(2))
    w, c = metrics
    assert {"net1/soft_ce", "net2/soft_ce"} <= w.keys() and "net1/partial_ce" not in w and all_finite(w)
    assert w["net1/loss"] == pytest.approx(w["net1/soft_ce"])
    assert all_finite(c)
    # N // B steps per network (drop_last over all N rows), each with a full P batch from the cycling loader,
    # where the paper's one pass over P would take ceil(|P| / B)
    assert len(calls) == 2 * (N // cfg.batch_size)
    assert all(n == min(cfg.batch_size, int(c["net1/n_p"]), int(c["net2/n_p"])) for n in calls) or all(n == cfg.batch_size for n in calls)
    div = m._divide(2, 0, "net1", ctx, m._candidates(ctx))
    assert (div["scores"][~ctx.candidates] == 0).all()  # partner scores stay inside the set
    assert torch.allclose(div["scores"].sum(1), torch.ones(N))


def test_epoch_steps_rows_share_one_batch_between_p_and_u(monkeypatch):
    """--epoch-steps rows (not in the paper): N // B steps, each with B rows in all, P's share of the batch
    equal to P's share of the rows (to one row), so an epoch is one pass over every row."""
    import pipeline.coreg.method as method_mod

    cfg = make_cfg(division="class", epoch_steps="rows", warmup_loss="vlm-hard", partner_scores="vlm")
    ctx = make_ctx()
    calls = []
    real = method_mod.coreg_step
    monkeypatch.setattr(method_mod, "coreg_step", lambda *a, **k: calls.append((k["n_p"], k["n_u"])) or real(*a, **k))
    m, (w, c) = run(cfg, ctx, range(2))
    assert all_finite(c)
    assert len(calls) == 2 * (N // cfg.batch_size)
    for net, half in (("net1", calls[: len(calls) // 2]), ("net2", calls[len(calls) // 2 :])):
        n_p = int(c[f"{net}/n_p"])  # the P it trained on (its partner's split)
        assert all(p + u == cfg.batch_size for p, u in half)
        assert all(abs(p - cfg.batch_size * n_p / N) <= 1 for p, _ in half)


def test_bad_mechanism_option_is_refused():
    from pipeline.errors import CoregError

    with pytest.raises(CoregError, match="--division"):
        make_method(make_cfg(division="perclass"))


def test_sharpened_ranked_warmup_trains():
    cfg = make_cfg(warmup_loss="vlm-sharp")
    m, (w,) = run(cfg, make_ctx(), range(1))
    assert {"net1/soft_ce", "net2/soft_ce"} <= w.keys() and all_finite(w)


def test_hard_ranked_warmup_targets_are_the_annotators_top_class_inside_the_set(monkeypatch):
    """--warmup-loss vlm-hard: one-hot on the top of the annotator's probabilities inside the set; where the
    top is tied (a synthetic annotator's uniform set) the target stays uniform over the tie."""
    import pipeline.coreg.method as method_mod
    from pipeline.coreg.losses import ranked_targets

    seen = []
    real = method_mod.warmup_step
    monkeypatch.setattr(method_mod, "warmup_step", lambda *a, **k: seen.append(k["targets"]) or real(*a, **k))
    ctx = make_ctx()
    g = torch.Generator().manual_seed(0)
    ctx.vlm_probs = torch.rand(N, C, generator=g).softmax(1)  # an annotator that ranks every set ...
    ctx.vlm_probs[:10] = 1.0 / C  # ... but ten rows
    m, (w,) = run(make_cfg(warmup_loss="vlm-hard"), ctx, range(1))
    t, cand = seen[0], m._candidates(ctx)
    ranked = ranked_targets(ctx.vlm_probs, cand)
    assert all_finite(w) and torch.allclose(t.sum(1), torch.ones(N))
    assert torch.allclose(t[:10], ranked[:10])  # tied: uniform over the set, as the soft target
    assert torch.equal(t[10:].amax(1), torch.ones(N - 10))  # untied: one-hot ...
    assert torch.equal(t[10:].argmax(1), ranked[10:].argmax(1)) and cand[torch.arange(N), t.argmax(1)].all()  # ... on the top


def test_disambiguated_targets_are_the_annotator_times_the_network_inside_the_set():
    """--warmup-loss vlm-net[-soft]: the ranking inside the set times the network's softmax, renormalised; the
    hard form is one-hot on its top. A uniform (synthetic) set follows the network; a ranked set moves only
    where the network outweighs the annotator; the mass never leaves the set."""
    from pipeline.coreg.losses import disambiguated_targets

    ranked = torch.tensor([[0.5, 0.5, 0.0], [0.9, 0.1, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0]])
    probs = torch.tensor([[0.2, 0.7, 0.1], [0.3, 0.6, 0.1], [0.05, 0.9, 0.05], [0.9, 0.1, 0.0]])
    soft = disambiguated_targets(ranked, probs, hard=False)
    assert torch.allclose(soft[0], torch.tensor([2 / 9, 7 / 9, 0.0]))  # uniform set: the network's own ranking
    assert torch.allclose(soft[1], torch.tensor([0.27, 0.06, 0.0]) / 0.33)
    assert torch.equal(soft[3], ranked[3])  # the network gives the set no mass: the annotator's target stays
    hard = disambiguated_targets(ranked, probs, hard=True)
    assert hard.argmax(1).tolist() == [1, 0, 1, 2] and torch.equal(hard.amax(1), torch.ones(4))
    assert (hard[ranked == 0] == 0).all() and (soft[ranked == 0] == 0).all()


def test_hard_net_warmup_trains_exactly_as_hard_where_the_annotator_ranks_and_uses_the_network_on_ties(monkeypatch):
    """--warmup-loss vlm-hard-net: with a ranking on every set it is vlm-hard bit for bit; on a uniform
    (synthetic) annotator the tied sets' targets follow the network after the first step instead of staying flat."""
    import pipeline.coreg.step as step_mod

    g = torch.Generator().manual_seed(3)
    ranked_probs = torch.rand(N, C, generator=g).softmax(1)  # no two classes tied
    weights = {}
    for loss in ("vlm-hard", "vlm-hard-net"):
        ctx = make_ctx()
        ctx.vlm_probs = ranked_probs.clone()
        m, _ = run(make_cfg(warmup_loss=loss), ctx, range(1))
        weights[loss] = {k: v.clone() for k, v in m.raw["net1"].state_dict().items()}
    assert all(torch.equal(weights["vlm-hard"][k], weights["vlm-hard-net"][k]) for k in weights["vlm-hard"])
    seen = []
    real = step_mod.ranked_warmup_loss
    monkeypatch.setattr(step_mod, "ranked_warmup_loss", lambda logits, t: seen.append(t) or real(logits, t))
    ctx = make_ctx()
    ctx.vlm_probs = torch.full((N, C), 1.0 / C)
    run(make_cfg(warmup_loss="vlm-hard-net"), ctx, range(1))
    first, last = seen[0], seen[-1]
    assert torch.allclose(first.amax(1), 1.0 / (first > 0).sum(1))  # weight 0 at the first step: flat, as vlm-hard
    multi = (last > 0).sum(1) > 1
    assert multi.any() and not torch.allclose(last[multi].amax(1), 1.0 / (last[multi] > 0).sum(1))  # then not flat


@pytest.mark.parametrize("loss", ["vlm-net", "vlm-net-soft"])
def test_disambiguating_warmup_trains_on_targets_inside_the_set(monkeypatch, loss):
    import pipeline.coreg.step as step_mod

    seen = []
    real = step_mod.ranked_warmup_loss
    monkeypatch.setattr(step_mod, "ranked_warmup_loss", lambda logits, t: seen.append(t) or real(logits, t))
    ctx = make_ctx()
    ctx.vlm_probs = torch.full((N, C), 1.0 / C)  # uniform: vlm-hard would keep every target flat over the set
    m, (w,) = run(make_cfg(warmup_loss=loss), ctx, range(1))
    cand = m._candidates(ctx)
    assert all_finite(w) and seen
    t = torch.cat(seen)
    assert torch.allclose(t.sum(1), torch.ones(len(t)))
    multi = cand.sum(1) > 1  # some rows of the test problem have sets of several classes
    assert multi.any()
    # the network's weight ramps from 0: the first step's targets are the annotator's (uniform over each set) ...
    first = seen[0]
    assert torch.allclose(first.amax(1), 1.0 / (first > 0).sum(1))  # flat over the set at the first step
    assert len(seen) > 1
    if loss == "vlm-net":  # ... and later ones one-hot even on a uniform set: the network broke the tie
        assert torch.equal(seen[-1].amax(1), torch.ones(len(seen[-1])))


def test_warmup_loss_pair_warms_each_network_with_its_own_loss(monkeypatch):
    """--warmup-loss A,B (not in the paper): net1 trains on A's targets, net2 on B's: here vlm-net-soft (soft,
    the network's product) and vlm-hard (one-hot on the annotator's in-set top); a bad pair is refused."""
    import pipeline.coreg.step as step_mod
    from pipeline.errors import CoregError

    seen = []
    real = step_mod.ranked_warmup_loss
    monkeypatch.setattr(step_mod, "ranked_warmup_loss", lambda logits, t: seen.append(t) or real(logits, t))
    ctx = make_ctx()
    m, (w,) = run(make_cfg(warmup_loss="vlm-net-soft,vlm-hard"), ctx, range(1))
    assert all_finite(w) and len(seen) % 2 == 0
    first, second = torch.cat(seen[: len(seen) // 2]), torch.cat(seen[len(seen) // 2 :])  # net1's epoch, then net2's
    top = second.amax(1, keepdim=True)
    assert torch.allclose(second[second > 0], top.expand_as(second)[second > 0])  # vlm-hard: flat over its (tied) top
    assert not torch.allclose(first[first > 0], first.amax(1, keepdim=True).expand_as(first)[first > 0])  # soft
    for bad in ("vlm,foo", "vlm,vlm,vlm"):
        with pytest.raises(CoregError, match="--warmup-loss"):
            make_method(make_cfg(warmup_loss=bad))


@pytest.mark.parametrize("views", ["strong", "weak"])
def test_mix_views_option_picks_the_augmentation_of_the_self_training_views(monkeypatch, views):
    """--mix-views weak (not in the paper): the mixup and contrastive views are weak, so no strong
    augmentation is drawn after warm-up; strong (the paper) draws four per step (P and U, two views each)."""
    ctx = make_ctx()
    m = make_method(make_cfg(mix_views=views))
    m.train_epoch(0, ctx)  # warm-up (paper loss: strong views), before counting
    calls = []
    real = ctx.augment.apply_strong
    monkeypatch.setattr(ctx.augment, "apply_strong", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = m.train_epoch(1, ctx)
    assert all_finite(out)
    assert (len(calls) == 0) if views == "weak" else (len(calls) > 0 and len(calls) % 4 == 0)


def test_annotator_prior_of_the_prior_penalty():
    """--prior annotator: the penalty pulls the batch-mean prediction towards the annotator's own class shares
    inside the sets (no balance assumed), not towards uniform; zero exactly at that prior."""
    from pipeline.coreg.losses import prior_penalty, ranked_targets

    ctx = make_ctx()
    m, (_, r) = run(make_cfg(prior_penalty=1.0, prior="annotator"), ctx, [0, 1])
    expected = ranked_targets(ctx.vlm_probs, m._candidates(ctx)).mean(0)
    assert torch.allclose(m.prior, expected) and r["net1/prior"] >= 0 and all_finite(r)
    skewed = torch.tensor([0.6, 0.3, 0.1])
    assert float(prior_penalty(skewed.expand(4, 3), prior=skewed)) == pytest.approx(0.0, abs=1e-6)
    assert float(prior_penalty(torch.full((4, 3), 1 / 3), prior=skewed)) > 0.05


def test_class_floor_lifts_only_classes_under_the_floor(monkeypatch):
    """--class-floor F (not in any paper): the penalty is zero for any batch whose classes all hold at least F/C
    of it (a long tail included) and positive for a vanished class; the warm-up's balancing divides by
    min(mean, F/C), so classes above the floor keep their ratios and one below it is lifted; the run reaches
    the warm-up's scores through it; with --prior annotator it is refused."""
    import pipeline.coreg.step as step_mod
    from pipeline.coreg.losses import balanced_scores, prior_penalty
    from pipeline.errors import CoregError

    tail = torch.tensor([0.5, 0.3, 0.15, 0.05]).expand(6, 4)  # truly rare last class at 0.2 of a balanced share
    assert float(prior_penalty(tail)) > 0.1  # DivideMix's term pulls it to 1/C ...
    assert float(prior_penalty(tail, floor=0.2)) == pytest.approx(0.0, abs=1e-7)  # ... the floor leaves it
    uniform = torch.full((4,), 0.25)  # --align-targets sets this prior tensor: the floor still applies
    assert float(prior_penalty(tail, prior=uniform, floor=0.2)) == pytest.approx(0.0, abs=1e-7)
    gone = torch.tensor([0.55, 0.3, 0.15, 0.0]).expand(6, 4)
    assert float(prior_penalty(gone, floor=0.2)) > 1.0  # a vanished class is still pulled back
    assert float(prior_penalty(tail, floor=0.4)) == pytest.approx(0.25 * math.log(0.1 / 0.05), rel=1e-5)
    q = torch.softmax(torch.randn(5, 4), 1)
    mean = tail[0]
    assert torch.allclose(balanced_scores(q, mean), q / mean)  # 0: full balancing
    b = balanced_scores(q, mean, floor=0.4)  # floor share 0.1: only the last class (0.05) is lifted, by 2x
    r = b / q
    assert torch.allclose(r[:, :3], torch.full((5, 3), 10.0)) and torch.allclose(r[:, 3], torch.full((5,), 20.0))
    calls = []
    real = step_mod.balanced_scores
    monkeypatch.setattr(step_mod, "balanced_scores", lambda q, m, floor=0.0: calls.append(floor) or real(q, m, floor=floor))
    _, (w, r1) = run(make_cfg(warmup_loss="vlm-net-soft", class_floor=0.5, prior_penalty=1.0), make_ctx(), [0, 1])
    assert calls and set(calls) == {0.5} and all_finite(w) and all_finite(r1) and r1["net1/prior"] >= 0
    with pytest.raises(CoregError, match="--class-floor"):
        make_method(make_cfg(class_floor=0.5, prior_penalty=1.0, prior="annotator"))


def test_align_of_a_guess():
    """DA of a guess: scaled by prior / mean prediction and renormalised; a network whose mean already is the
    prior keeps its guesses; an under-predicted class is raised."""
    from pipeline.coreg.pseudo_labels import align

    p = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.45, 0.05]])
    assert align(p, None) is p
    assert torch.allclose(align(p, torch.ones(3)), p)
    prior, mean = torch.tensor([0.5, 0.25, 0.25]), torch.tensor([0.5, 0.45, 0.05])  # class 2 under-predicted 5x
    q = align(p, prior / mean)
    assert torch.allclose(q.sum(1), torch.ones(2))
    assert q[0, 2] > p[0, 2] and q[1, 2] > p[1, 2] and q[1, 1] < p[1, 1]


@pytest.mark.parametrize("prior", ["uniform", "annotator"])
def test_align_targets_option(prior):
    """--align-targets: the step gets prior / own mean and prior / partner mean from the division pass, and the
    training targets (not the division) change; off by default, so the paper's run is untouched."""
    from pipeline.coreg.losses import ranked_targets

    ctx = make_ctx()
    assert make_cfg().align_targets is False
    m_off, (_, r_off) = run(make_cfg(), ctx, [0, 1])
    m, (_, r) = run(make_cfg(align_targets=True, prior=prior), ctx, [0, 1])
    expected = torch.full((C,), 1 / C) if prior == "uniform" else ranked_targets(ctx.vlm_probs, m._candidates(ctx)).mean(0)
    assert torch.allclose(m.prior, expected) and all_finite(r)
    div = m._divide(2, 0, "net1", ctx, m._candidates(ctx))
    hp = m._step_params(2, 2.0, own=div, partner=div)
    assert torch.allclose(hp.align_self * div["mean"], expected, atol=1e-6)
    assert m._step_params(2, 2.0).align_self is None  # no division given: nothing to align to
    assert r["net1/n_p"] == r_off["net1/n_p"]  # the division of epoch 1 comes before any aligned target
    assert r["net1/l_x"] != pytest.approx(r_off["net1/l_x"], abs=1e-7)


def test_weight_average_predicts_without_changing_training(main_run):
    """--ema-epochs: the trained weights are exactly those of a run without it; prediction and the exported
    weights are each network's exponential moving average (decay 1 - 1/(ema_epochs x steps per epoch))."""
    cfg, ctx = replace(main_run["cfg"], ema_epochs=0.5), make_ctx()
    m, metrics = run(cfg, ctx, range(3))
    assert metrics == main_run["metrics"]  # training reads only the trained networks
    trained = {f"{n}.{k}": v for n in ("net1", "net2") for k, v in m.raw[n].state_dict().items()}
    for k, v in main_run["snaps"][-1].items():
        assert torch.equal(trained[k], v), k
    avg = m.prediction_weights()
    assert avg.keys() == trained.keys() and changed(avg, trained, "net1.") and changed(avg, trained, "net2.")
    assert int(m.avg["net1"].n_averaged) >= 3 and int(m.avg["net2"].n_averaged) >= 3  # updated after every step
    x = ctx.augment.normalize(ctx.images[:5])
    with torch.no_grad():
        m.avg["net1"].module.eval()
        assert torch.allclose(m.predict_logits(x, which="net1"), m.avg["net1"].module(x))
        m.avg["net1"].module.train()
        m.raw["net1"].eval()
        assert torch.allclose(m.predict_logits(x, which="net1", averaged=False), m.raw["net1"](x))
        m.raw["net1"].train()
    assert {"net1_avg", "net2_avg"} <= m.modules().keys()  # checkpointed: a resume continues the average
    assert "net1_avg" not in main_run["m"].modules()  # off (the paper): nothing extra to save


def test_weight_average_decay_follows_the_run_length(monkeypatch):
    from pipeline import two_networks

    seen, real = [], two_networks.get_ema_multi_avg_fn
    monkeypatch.setattr(two_networks, "get_ema_multi_avg_fn", lambda decay: seen.append(decay) or real(decay))
    make_method(make_cfg(ema_epochs=2.0, batch_size=4))  # 9 steps per epoch: an average over ~18 steps
    assert seen == [pytest.approx(1 - 1 / 18)]


def test_weight_average_as_teacher_changes_training_and_needs_an_average(main_run):
    """--ema-teach: the division pass and the partner's guesses use the averages, so training differs from
    the trained-networks teacher from the first Co-Reg epoch (the warm-up, which reads no teacher, does not)."""
    cfg, ctx = replace(main_run["cfg"], ema_epochs=0.5, ema_teach=True), make_ctx()
    m, metrics = run(cfg, ctx, range(3))
    assert metrics[0] == main_run["metrics"][0] and metrics[2] != main_run["metrics"][2]
    assert all_finite(metrics[2]) and m.raw["net1"].training and m.raw["net2"].training
    from pipeline.errors import CoregError

    with pytest.raises(CoregError, match="--ema-teach needs a weight average"):
        make_method(replace(main_run["cfg"], ema_teach=True))
