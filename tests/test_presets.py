"""Presets (pipeline/presets.py): `paper` is every published constant; `default` derives the schedule and
time constants from the data size and device; an explicit option always wins."""

from __future__ import annotations

import pytest

from pipeline.config import TrainConfig
from pipeline.presets import PAPER, resolve


def cfg(**kw):
    return TrainConfig(annotated="a", out="o", **kw)


def test_paper_preset_is_the_published_constants():
    c, filled = resolve(cfg(preset="paper"), n_rows=50_000, gpu=True)
    assert filled == PAPER
    assert (c.epochs, c.warmup_epochs, c.batch_size, c.lr_period, c.rampup_epochs, c.start_cont) == (800, 50, 256, 800, 16, 10)
    assert (c.gmm_history, c.proto_m, c.moco_m, c.queue_size) == (5, 0.999, 0.999, 8192)
    assert (c.division, c.epoch_steps, c.warmup_loss, c.partner_scores, c.arch) == ("global", "p", "paper", "net", "preact_resnet18")
    assert c.mix_views == "strong" and c.mixup_alpha == 4.0 and c.prior_shift == "off"


def test_default_preset_derives_from_data_size_and_device():
    c, _ = resolve(cfg(), n_rows=2000, gpu=False)
    assert c.arch == "small_cnn" and c.batch_size == 64  # 256 halved until an epoch has >= 30 steps
    assert c.epochs == 38  # ceil(1200 steps / ceil(2000 / 64) = 32 steps per epoch)
    assert c.warmup_epochs == 10 and c.rampup_epochs == 4 and c.start_cont == 4 and c.lr_period == 0  # 320 of 1,216 steps
    assert c.gmm_history == 1
    assert c.proto_m == pytest.approx(1 - 0.001 * 25)  # the paper's refresh per epoch at 50k rows
    assert c.moco_m == pytest.approx(0.999 ** (195 / 32))
    assert c.queue_size == 328  # 16% of the rows, like 8192 of 50k
    assert (c.division, c.epoch_steps, c.warmup_loss, c.partner_scores) == ("class", "rows", "vlm-hard-net", "net")
    assert c.mix_views == "strong"  # 1,216 steps: the paper's views (accuracy_notes.md §33)
    assert c.mixup_alpha == 0.1 and c.use_unlabeled is False  # bench/results/accuracy_dev_u_mixup.md
    assert c.prior_shift == "em"  # pipeline/prior_shift.py, accuracy_notes.md §30
    for method in ("dividemix", "alim"):  # the baselines that mix keep their papers' alpha under every preset
        b = resolve(cfg(method=method), n_rows=2000, gpu=False)[0]
        assert b.mixup_alpha == 4.0 and b.prior_shift == "off"  # trained on the annotator's top: its mix, not a balance
    g, _ = resolve(cfg(), n_rows=50_000, gpu=True)
    assert g.arch == "preact_resnet18" and g.batch_size == 256 and g.proto_m == pytest.approx(0.999)
    assert g.epochs == 205 and g.queue_size == 8192  # ceil(40000 / 196)


def test_self_training_views_follow_the_run_length():
    # STRONG_VIEWS_STEPS = 900: 28 epochs of 32 steps = 896 steps keep the weak views, 29 = 928 take the paper's
    assert resolve(cfg(epochs=28), n_rows=2000, gpu=False)[0].mix_views == "weak"
    assert resolve(cfg(epochs=29), n_rows=2000, gpu=False)[0].mix_views == "strong"
    assert resolve(cfg(epochs=20), n_rows=2000, gpu=False)[0].mix_views == "weak"  # the 640-step tables
    assert resolve(cfg(epochs=29, mix_views="weak"), n_rows=2000, gpu=False)[0].mix_views == "weak"  # explicit wins
    assert resolve(cfg(), n_rows=50_000, gpu=True)[0].mix_views == "strong"
    # the very weak recipe takes the strong views at any length (notes §35), unless the warm-up or views are given
    very = (0.1, 0, 0.2)
    assert resolve(cfg(epochs=20), n_rows=2000, gpu=False, skew=very)[0].mix_views == "strong"
    assert resolve(cfg(epochs=20, warmup_loss="vlm-hard-net"), n_rows=2000, gpu=False, skew=very)[0].mix_views == "weak"
    assert resolve(cfg(epochs=20, mix_views="weak"), n_rows=2000, gpu=False, skew=very)[0].mix_views == "weak"


def test_explicit_options_win_over_the_preset():
    c, filled = resolve(cfg(epochs=10, warmup_epochs=3, division="global", proto_m=0.5), n_rows=2000, gpu=False)
    assert (c.epochs, c.warmup_epochs, c.division, c.proto_m) == (10, 3, "global", 0.5)
    assert "epochs" not in filled and "division" not in filled
    assert c.rampup_epochs == 1  # derived from the explicit run length
    p, _ = resolve(cfg(preset="paper", epochs=30, warmup_epochs=5), n_rows=2000, gpu=False)
    assert (p.epochs, p.warmup_epochs, p.proto_m) == (30, 5, 0.999)


def test_unknown_preset_is_refused_on_the_command_line(tmp_path):
    from typer.testing import CliRunner

    from stages.cli import app

    r = CliRunner().invoke(app, ["train", str(tmp_path / "a"), str(tmp_path / "m"), "--preset", "fast"])
    assert r.exit_code == 2 and "--preset" in r.output and "paper" in r.output


def test_default_batch_fits_a_tiny_train_split():
    """Fewer than 64 images: the preset's batch is half the split (a batch above the split is refused), not 32."""
    c, filled = resolve(TrainConfig(annotated="-", out="-"), n_rows=30, gpu=False)
    assert c.batch_size == filled["batch_size"] == 15
    assert resolve(TrainConfig(annotated="-", out="-"), n_rows=64, gpu=False)[0].batch_size == 32


def _annotation(top_counts, *, n_classes=4, tie_rows=0, top=0.6):
    """Candidate matrix and probabilities whose in-set top is class c on top_counts[c] rows (sets of two
    labels, the top at `top`, the other label at `1 - top` of the pair), plus tie_rows rows whose two-label set
    is tied."""
    import numpy as np

    cand, probs = [], []
    for c, k in enumerate(top_counts):
        other = (c + 1) % n_classes
        for _ in range(k):
            row = np.full(n_classes, 0.0)
            row[c], row[other] = 0.8 * top, 0.8 * (1 - top)  # 0.2 outside the set: renormalised away
            row[[j for j in range(n_classes) if j not in (c, other)]] = 0.2 / (n_classes - 2)
            cand.append([j in (c, other) for j in range(n_classes)])
            probs.append(row)
    for _ in range(tie_rows):
        cand.append([j in (0, 1) for j in range(n_classes)])
        probs.append(np.full(n_classes, 1.0 / n_classes))
    return np.array(cand), np.array(probs)


def test_annotator_skew_is_the_rarest_in_set_top_class_share_without_labels():
    from pipeline.presets import annotator_skew

    share, c, margin = annotator_skew(*_annotation([100, 100, 100, 100]))
    assert share == pytest.approx(1.0) and margin == pytest.approx(0.2)  # 0.6 - 0.4 inside every set
    share, c, margin = annotator_skew(*_annotation([150, 150, 90, 10]))
    assert c == 3 and share == pytest.approx(10 * 4 / 400)
    # tied sets carry no ranking: left out, so they neither dilute nor fill a class's share nor the margin
    assert annotator_skew(*_annotation([150, 150, 90, 10], tie_rows=500)) == pytest.approx((0.1, 3, 0.2))
    assert annotator_skew(*_annotation([150, 150, 90, 10], top=0.52))[2] == pytest.approx(0.04)  # a flat ranking
    assert annotator_skew(*_annotation([20, 20, 20, 20])) is None  # under 30 ranked rows per class: too few to tell
    assert annotator_skew(*_annotation([0, 0, 0, 0], tie_rows=1000)) is None  # a synthetic annotator: nothing ranked


def test_default_warmup_length_is_320_steps_within_a_quarter_to_half_for_coreg_hard_warmup_only():
    # accuracy_notes.md §8 (half at 640 steps) and §28 (a quarter at 1,216 steps, the soft warm-up keeps half)
    assert resolve(cfg(epochs=20), n_rows=2000, gpu=False)[0].warmup_epochs == 10  # 640 steps: half = 320
    assert resolve(cfg(epochs=10), n_rows=2000, gpu=False)[0].warmup_epochs == 5  # 320 steps: capped at half
    assert resolve(cfg(epochs=100), n_rows=2000, gpu=False)[0].warmup_epochs == 25  # 3,200 steps: a quarter
    assert resolve(cfg(batch_size=32), n_rows=818, gpu=False)[0].warmup_epochs == 12  # 47 x 26 steps: 320 / 26
    assert resolve(cfg(), n_rows=50_000, gpu=True)[0].warmup_epochs == 51  # a quarter of 205 epochs
    very = (0.1, 0, 0.2)
    assert resolve(cfg(), n_rows=2000, gpu=False, skew=very)[0].warmup_epochs == 19  # the soft warm-up: half
    for other in (cfg(method="dividemix"), cfg(method="cr_dpll"), cfg(warmup_loss="vlm"), cfg(warmup_loss="paper")):
        assert resolve(other, n_rows=2000, gpu=False)[0].warmup_epochs == 19
    assert resolve(cfg(warmup_loss="vlm-hard-net"), n_rows=2000, gpu=False, skew=very)[0].warmup_epochs == 10
    assert resolve(cfg(warmup_epochs=19), n_rows=2000, gpu=False)[0].warmup_epochs == 19  # explicit wins


def test_default_warmup_turns_soft_for_a_very_weak_annotator_that_ranks_only():
    from pipeline.presets import RANKS_MARGIN, VERY_WEAK_SHARE

    assert resolve(cfg(), n_rows=2000, gpu=False, skew=None)[0].warmup_loss == "vlm-hard-net"
    assert resolve(cfg(), n_rows=2000, gpu=False, skew=(VERY_WEAK_SHARE + 0.01, 0, 0.2))[0].warmup_loss == "vlm-hard-net"
    assert resolve(cfg(), n_rows=2000, gpu=False, skew=(0.1, 0, RANKS_MARGIN - 0.01))[0].warmup_loss == "vlm-hard-net"  # flat
    assert resolve(cfg(), n_rows=2000, gpu=False, skew=(0.5, 0, 0.2))[0].prior_penalty == 0.0
    c, filled = resolve(cfg(), n_rows=2000, gpu=False, skew=(0.1, 0, 0.2))
    assert c.warmup_loss == filled["warmup_loss"] == "vlm-net-soft" and c.prior_penalty == filled["prior_penalty"] == 1.0
    very = (0.1, 0, 0.2)
    assert resolve(cfg(prior_penalty=0.0), n_rows=2000, gpu=False, skew=very)[0].prior_penalty == 0.0  # explicit wins
    # an explicit warm-up turns the recipe off as a whole: no prior penalty either
    c = resolve(cfg(warmup_loss="vlm-hard"), n_rows=2000, gpu=False, skew=very)[0]
    assert c.warmup_loss == "vlm-hard" and c.prior_penalty == 0.0
    p = resolve(cfg(preset="paper"), n_rows=2000, gpu=False, skew=very)[0]
    assert p.warmup_loss == "paper" and p.prior_penalty == 0.0
    d = resolve(cfg(method="dividemix"), n_rows=2000, gpu=False, skew=very)[0]
    assert d.warmup_loss == "vlm-hard-net" and d.prior_penalty == 0.0  # coreg's rule


def test_train_stage_reads_the_skew_from_the_annotation_and_says_why(capsys):
    import datasets

    from stages.train import annotation_skew, resolve_preset

    def dataset(**kw):
        cand, probs = _annotation([150, 150, 90, 10], **kw)
        return datasets.Dataset.from_dict({"candidates": [list(map(int, r.nonzero()[0])) for r in cand], "vlm_probs": probs.tolist()})

    ds = dataset()
    skew = annotation_skew(ds)
    assert skew == pytest.approx((0.1, 3, 0.2))
    c = resolve_preset(cfg(cpu=True), n_rows=len(ds), skew=skew, classes=["a", "b", "c", "dog"])
    out = capsys.readouterr().out
    assert c.warmup_loss == "vlm-net-soft" and c.prior_penalty == 1.0
    assert "'dog'" in out and "10%" in out and "prior penalty 1" in out and "--warmup-loss vlm-hard-net" in out
    c = resolve_preset(cfg(cpu=True, warmup_loss="vlm-hard-net"), n_rows=len(ds), skew=skew, classes=["a", "b", "c", "dog"])
    assert c.warmup_loss == "vlm-hard-net" and c.prior_penalty == 0.0 and "very weak" not in capsys.readouterr().out
    flat = annotation_skew(dataset(top=0.52))
    assert resolve_preset(cfg(cpu=True), n_rows=len(ds), skew=flat, classes=None).warmup_loss == "vlm-hard-net"


def test_the_skew_is_read_only_when_coregs_warm_up_is_left_to_the_preset(capsys):
    """The skew reads the whole annotation (0.6 s at 50k x 100): `coreg train` passes it as a function, called
    only by Co-Reg's default preset with the warm-up unset, never for a baseline, the paper preset or an explicit
    warm-up; when it is called it decides exactly as the value would, and the terminal line still names the class."""
    from stages.train import resolve_preset

    calls = []

    def skew():
        calls.append(1)
        return (0.1, 3, 0.2)

    for c in (cfg(cpu=True, method="ce"), cfg(cpu=True, preset="paper"), cfg(cpu=True, warmup_loss="vlm-hard-net")):
        resolve_preset(c, n_rows=2000, skew=skew, classes=["a", "b", "c", "dog"])
    assert calls == []
    c = resolve_preset(cfg(cpu=True), n_rows=2000, skew=skew, classes=["a", "b", "c", "dog"])
    assert calls and c.warmup_loss == "vlm-net-soft" and c.prior_penalty == 1.0 and "'dog'" in capsys.readouterr().out
