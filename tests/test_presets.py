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
    assert c.mix_views == "strong" and c.mixup_alpha == 4.0


def test_default_preset_derives_from_data_size_and_device():
    c, _ = resolve(cfg(), n_rows=2000, gpu=False)
    assert c.arch == "small_cnn" and c.batch_size == 64  # 256 halved until an epoch has >= 30 steps
    assert c.epochs == 38  # ceil(1200 steps / ceil(2000 / 64) = 32 steps per epoch)
    assert c.warmup_epochs == 19 and c.rampup_epochs == 4 and c.start_cont == 4 and c.lr_period == 0
    assert c.gmm_history == 1
    assert c.proto_m == pytest.approx(1 - 0.001 * 25)  # the paper's refresh per epoch at 50k rows
    assert c.moco_m == pytest.approx(0.999 ** (195 / 32))
    assert c.queue_size == 328  # 16% of the rows, like 8192 of 50k
    assert (c.division, c.epoch_steps, c.warmup_loss, c.partner_scores, c.mix_views) == ("class", "rows", "vlm-hard-net", "net", "weak")
    assert c.mixup_alpha == 0.1 and c.use_unlabeled is False  # bench/results/accuracy_dev_u_mixup.md
    for method in ("dividemix", "alim"):  # the baselines that mix keep their papers' alpha under every preset
        assert resolve(cfg(method=method), n_rows=2000, gpu=False)[0].mixup_alpha == 4.0
    g, _ = resolve(cfg(), n_rows=50_000, gpu=True)
    assert g.arch == "preact_resnet18" and g.batch_size == 256 and g.proto_m == pytest.approx(0.999)
    assert g.epochs == 205 and g.queue_size == 8192  # ceil(40000 / 196)


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
