"""Issue 10: bad input and failures end in one actionable line (or a correct result), nothing lost."""

from __future__ import annotations

import json

import datasets
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from tests.annotated import make_rows

runner = CliRunner()
TINY = ["--arch", "small_cnn", "--batch-size", "8", "--warmup-epochs", "1", "--queue-size", "32", "--num-workers", "0"]
CLASSES = ["red", "green", "blue"]


def write(path, rows):
    from pipeline.schema import features

    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features(CLASSES))}).save_to_disk(str(path))
    return path


def train(ann, out, *extra):
    return runner.invoke(app, ["train", str(ann), str(out), *TINY, *extra])


def one_line_error(r, *needles):
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output, r.output
    err = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(err) == 1, r.output
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


# --- contract: vlm_probs finite and non-negative; empty candidate sets ------------------------------------


@pytest.mark.parametrize("bad, needle", [(float("nan"), "non-finite"), (float("inf"), "non-finite"), (-0.5, "negative")])
def test_non_finite_or_negative_vlm_probs_are_refused(tmp_path, bad, needle):
    rows = make_rows(12, CLASSES, seed=0)
    p = rows["vlm_probs"][3]
    p[0], p[1] = bad, (1.5 if bad == -0.5 else p[1])  # -0.5 + 1.5 + p[2]: still sums near 1 on purpose
    p[2] = 1 - p[0] - p[1] if bad == -0.5 else p[2]
    ann = write(tmp_path / "ann", rows)
    r = train(ann, tmp_path / "m", "--method", "kd", "--epochs", "1")
    one_line_error(r, "'vlm_probs'", "row 3", needle)
    assert not (tmp_path / "m" / "model.safetensors").exists()


def test_all_empty_candidate_sets_are_refused_some_empty_warned(tmp_path):
    rows = make_rows(12, CLASSES, seed=0)
    rows["candidates"] = [[] for _ in rows["candidates"]]
    r = train(write(tmp_path / "empty", rows), tmp_path / "m", "--method", "cc", "--epochs", "1")
    one_line_error(r, "'candidates'", "all 12 candidate sets are empty")

    rows = make_rows(12, CLASSES, seed=0)
    rows["candidates"][0] = []
    rows["candidates"][5] = []
    r = train(write(tmp_path / "some", rows), tmp_path / "m2", "--method", "cc", "--epochs", "1")
    assert r.exit_code == 0, r.output
    assert "warning:" in r.output and "2 of 12 rows have an empty candidate set" in r.output


# --- non-finite loss: stop at once, keep the last good checkpoint, never write a NaN model ---------------


@pytest.fixture(scope="module")
def ann(tmp_path_factory):
    from tests.annotated import make_annotated

    return make_annotated(tmp_path_factory.mktemp("ann") / "ann", n_train=24, n_test=0)


def test_diverging_training_stops_at_the_first_non_finite_loss(ann, tmp_path):
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "m"
    r = train(ann, out, "--method", "ce", "--epochs", "4", "--lr", "1e4")
    line = one_line_error(r, "the loss is not finite", "net1/loss", "--lr 10000")
    epoch = int(line.split("epoch ")[1].split(":")[0])  # 1-based, as in the progress lines
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == epoch - 1  # the bad epoch is not logged as if it were fine
    if epoch > 1:  # the last good epoch is kept, and its weights are finite
        assert f"checkpoint of epoch {epoch - 1} is kept" in line
        assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == epoch - 2
        assert all(bool(v.isfinite().all()) for v in load_file(str(out / "model.safetensors")).values())


def test_nan_loss_at_once_saves_nothing(ann, tmp_path):
    r = train(ann, tmp_path / "m", "--method", "ce", "--epochs", "2", "--lr", "1e10")
    one_line_error(r, "epoch 1: the loss is not finite", "nothing was saved")
    assert not (tmp_path / "m" / "model.safetensors").exists()


def test_non_finite_weights_are_never_written(tmp_path):
    import torch

    from pipeline.errors import CoregError
    from stages.train import _save_model

    class M:
        def prediction_weights(self):
            return {"net1.w": torch.tensor([1.0, float("inf")])}

    def save_model(*a, **k):
        raise AssertionError("must not be called")

    with pytest.raises(CoregError, match="non-finite"):
        _save_model(tmp_path, M(), {"train_config": {"predict_with": "net1"}}, save_model)
