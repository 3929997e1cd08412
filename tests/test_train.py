"""`coreg train` end to end on tiny hand-made data: model directory, resume, label-shuffle invariance, errors."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from stages.cli import app
from tests.annotated import make_annotated

runner = CliRunner()
TINY = ["--arch", "small_cnn", "--batch-size", "8", "--warmup-epochs", "1", "--queue-size", "32", "--num-workers", "0"]


def train(ann, out, *extra):
    r = runner.invoke(app, ["train", str(ann), str(out), *TINY, *extra])
    return r


@pytest.fixture(scope="module")
def ann(tmp_path_factory):
    return make_annotated(tmp_path_factory.mktemp("ann") / "ann", n_train=40, n_test=12)


def weights(out):
    return load_file(str(out / "model.safetensors"))


def test_train_writes_model_directory(ann, tmp_path):
    out = tmp_path / "model"
    r = train(ann, out, "--epochs", "3", "--start-cont", "0")
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["classes"] == ["red", "green", "blue"] and cfg["nets"] == ["net1", "net2"]
    assert cfg["predict_with"] == "ensemble" and cfg["image_size"] == 16
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [0, 1, 2]
    last = lines[-1]
    for k in ("net1/l_x", "net1/l_u", "net1/proto", "net1/cont", "net1/n_p", "net1/n_u", "net1/mean_w",
              "net2/loss", "lr", "epoch_seconds", "images_per_second", "test_acc", "test_acc_net1",
              "net1/diag_pseudo_acc_p", "net1/diag_p_valid", "net1/pred_classes", "net1/pred_min_share"):
        assert k in last, k
    assert all(np.isfinite(v) for m in lines for v in m.values() if isinstance(v, float))
    assert last["net1/n_p"] + last["net1/n_u"] == 40 and last["net1/kept_classes"] == 0  # --keep-classes is off
    assert 1 <= last["net1/pred_classes"] <= 3 and "net1/pred_classes" in lines[0]  # warm-up epochs log it too
    w = weights(out)
    assert any(k.startswith("net1.") for k in w) and any(k.startswith("net2.") for k in w)

    from pipeline.model_io import load_model

    model = load_model(out)
    x = torch.randint(0, 255, (2, 3, 16, 16), dtype=torch.uint8)
    assert model.probs(x).shape == (2, 3)


@pytest.mark.parametrize("extra", [(), ("--ema-epochs", "1", "--ema-teach"), ("--keep-classes", "1")],
                         ids=["default", "weight-average", "keep-classes"])
def test_resume_equals_uninterrupted(ann, tmp_path, extra):
    full, part = tmp_path / "full", tmp_path / "part"
    # a fixed cosine period: "interrupted" is emulated by a shorter --epochs, and with the default preset's
    # --lr-period 0 the schedule (rightly) follows --epochs, so a resume to 3 would be refused. With a weight
    # average (exported, and teaching) the checkpoint must carry it for the resumed run to equal this one.
    fixed = ("--lr-period", "800", *extra)
    assert train(ann, full, "--epochs", "3", *fixed).exit_code == 0
    assert train(ann, part, "--epochs", "2", *fixed).exit_code == 0  # "interrupted" after epoch 2
    r = train(ann, part, "--epochs", "3", "--resume", *fixed)
    assert r.exit_code == 0, r.output
    if "--keep-classes" in extra:  # at F = 1 a class predicted for fewer rows than the annotator names is kept
        kept = [json.loads(x).get("net1/kept_classes", 0) for x in (full / "metrics.jsonl").read_text().splitlines()]
        assert any(k >= 1 for k in kept), kept
    a, b = weights(full), weights(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma = (full / "metrics.jsonl").read_text().splitlines()
    mb = (part / "metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if "second" not in k} for x in lines]  # noqa: E731
    assert strip(ma) == strip(mb)


def test_labels_are_diagnostics_only(ann, tmp_path):
    """Shuffling the train split's `label` column changes nothing in training."""
    dsd = datasets.load_from_disk(str(ann))
    perm = np.random.default_rng(1).permutation(len(dsd["train"]))
    shuffled = dsd["train"].remove_columns("label").add_column(
        "label", [dsd["train"]["label"][int(i)] for i in perm], feature=dsd["train"].features["label"]
    )
    shuffled = shuffled.select_columns(dsd["train"].column_names).cast(dsd["train"].features)
    assert list(shuffled["label"]) != list(dsd["train"]["label"])
    ann2 = tmp_path / "shuffled"
    datasets.DatasetDict({"train": shuffled, "test": dsd["test"]}).save_to_disk(str(ann2))
    a, b = tmp_path / "a", tmp_path / "b"
    assert train(ann, a, "--epochs", "3", "--start-cont", "0").exit_code == 0
    assert train(ann2, b, "--epochs", "3", "--start-cont", "0").exit_code == 0
    wa, wb = weights(a), weights(b)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    la = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(la, lb, strict=True):
        keep = lambda m: {k: v for k, v in m.items() if "diag_" not in k and "second" not in k}  # noqa: E731
        assert keep(x) == keep(y)


def test_unlabeled_train_split_with_trusted_rows_and_tensorboard(tmp_path):
    ann = make_annotated(tmp_path / "ann", n_train=24, n_test=0, labeled_train=False, trusted=3)
    r = train(ann, tmp_path / "m", "--epochs", "2", "--tensorboard")
    assert r.exit_code == 0, r.output
    last = json.loads((tmp_path / "m" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "test_acc" not in last
    assert "net1/diag_p_valid" in last  # only the 3 trusted rows have a label to diagnose with
    assert list((tmp_path / "m").glob("coreg/events.out.tfevents.*"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", "1000"], "larger than the 40 training images"),
        (["--method", "nope"], "--method 'nope' is unknown"),
        (["--arch", "resnet9000"], "resnet9000"),
        (["--mixed-precision", "fp8"], "--mixed-precision 'fp8' is unknown"),
        (["--image-size", "4"], "--image-size 4"),
    ],
)
def test_bad_options(ann, tmp_path, args, message):
    r = runner.invoke(app, ["train", str(ann), str(tmp_path / "m"), *TINY, "--epochs", "1", *args])
    assert r.exit_code == 2
    assert message.lower() in r.output.lower(), r.output


def test_bad_dataset_and_output(ann, tmp_path):
    dsd = datasets.load_from_disk(str(ann))
    broken = tmp_path / "broken"
    datasets.DatasetDict({"train": dsd["train"].remove_columns("candidates")}).save_to_disk(str(broken))
    r = train(broken, tmp_path / "m", "--epochs", "1")
    assert r.exit_code == 2 and "'candidates'" in r.output and "'train'" in r.output
    r = train(tmp_path / "missing", tmp_path / "m", "--epochs", "1")
    assert r.exit_code == 2 and "not found" in r.output
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    r = train(ann, tmp_path / "other", "--epochs", "1")
    assert r.exit_code == 2 and "holds other files" in r.output
    # a resume with other options is refused, naming the option
    assert train(ann, tmp_path / "m2", "--epochs", "1").exit_code == 0
    r = train(ann, tmp_path / "m2", "--epochs", "2", "--resume", "--lr", "0.5")
    assert r.exit_code == 2 and "--lr" in r.output
    r = train(ann, tmp_path / "m2", "--epochs", "2")
    assert r.exit_code == 2 and "--resume" in r.output


def test_ctrl_c_saves_the_epoch_and_resume_finishes(ann, tmp_path):
    """A real SIGINT during training: the epoch finishes, is saved, the run stops; --resume completes it."""
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "m"
    # the default preset derives the ramp, the delayed start, the cosine and the self-training views from --epochs:
    # fix them, so that a resume with fewer epochs continues the same run
    fixed = ["--lr-period", "800", "--rampup-epochs", "1", "--start-cont", "1", "--mix-views", "weak"]
    cmd = [sys.executable, "-m", "stages.cli", "train", str(ann), str(out), *TINY, *fixed, "--epochs", "200"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    for line in p.stdout:
        if line.startswith("epoch 2/"):
            p.send_signal(signal.SIGINT)
            break
    rest = p.communicate(timeout=300)[0]
    assert p.returncode == 130, rest
    assert "stopped after epoch" in rest
    state = torch.load(out / "checkpoint.pt", weights_only=True)  # plain tensors and values only
    logged = (out / "metrics.jsonl").read_text().splitlines()
    assert len(logged) == state["epoch"] + 1 < 200
    r = train(ann, out, "--epochs", str(state["epoch"] + 3), "--resume", *fixed)
    assert r.exit_code == 0, r.output
    assert len((out / "metrics.jsonl").read_text().splitlines()) == state["epoch"] + 3


def testcollapse_warning(capsys):
    from stages.train_checks import collapse_warning

    assert not collapse_warning({"epoch": 0, "net1/pred_classes": 3.0, "net2/pred_classes": 3.0}, 3)
    assert capsys.readouterr().out == ""
    assert collapse_warning({"epoch": 4, "net1/pred_classes": 3.0, "net2/pred_classes": 2.0}, 3)
    out = capsys.readouterr().out
    assert out.startswith("warning: epoch 5: net2 predicts only 2 of 3 classes") and "--prior-penalty" in out
    assert out.count("\n") == 1


def test_buffers_are_synced_before_each_epoch_and_each_test_pass(ann, tmp_path, monkeypatch):
    """The loop calls `sync_buffers` on every module before the epoch (its eval-mode division pass) and
    before the test pass; the 2-process behaviour of the helper is in test_train_distributed.py."""
    import pipeline.training

    calls = []
    real = pipeline.training.sync_buffers
    monkeypatch.setattr(pipeline.training, "sync_buffers", lambda m, dist: calls.append(type(m).__name__) or real(m, dist))
    r = train(ann, tmp_path / "m", "--epochs", "2")
    assert r.exit_code == 0, r.output
    n_modules = len(calls) // 4  # 2 epochs x (epoch start + test pass)
    assert n_modules >= 2 and len(calls) == 4 * n_modules
