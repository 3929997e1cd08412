"""`coreg run IMAGES OUT` end to end through the CLI with a tiny offline CLIP: labeled and flat folders,
interruption and resume, finished stages kept, changed options redone."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from stages import run as run_stage
from stages.cli import app
from tests.tiny import make_image_folder, make_tiny_clip

CLASSES = ("cat", "dog", "bird")
TINY = [
    "--arch", "small_cnn", "--epochs", "2", "--warmup-epochs", "1", "--batch-size", "8", "--image-size", "16",
    "--queue-size", "32", "--num-workers", "0", "--cpu", "--device", "cpu", "--templates", "imagenet80",
    "--lr-period", "800", "--rampup-epochs", "1", "--start-cont", "1", "--gmm-history", "1",  # not following --epochs
]  # fmt: skip
runner = CliRunner()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


def coreg_run(images, out, clip, *extra):
    res = runner.invoke(app, ["run", str(images), str(out), "--model", clip, *TINY, *extra])
    return res


def stages(out):
    return json.loads((out / "run.json").read_text())["stages"]


def logged_epochs(out):
    return [json.loads(x)["epoch"] for x in (out / "model" / "metrics.jsonl").read_text().splitlines()]


def mtimes(out):
    files = ("annotated/dataset_dict.json", "model/model.safetensors", "report/report.json")
    return {f: (out / f).stat().st_mtime_ns for f in files}


def test_labeled_folder_then_resume_keep_and_redo(tmp_path, clip, monkeypatch):
    images = make_image_folder(tmp_path / "imgs", classes=CLASSES, n_per_class=6, size=16, split=("train", "test"))
    out = tmp_path / "out"
    res = coreg_run(images, out, clip)
    assert res.exit_code == 0, res.output
    r = json.loads((out / "report" / "report.json").read_text())
    assert r["split"] == "test" and r["n"] == 18 and r["labels_known"]
    assert r["student_accuracy"] is not None and r["zero_shot_accuracy"] is not None
    assert (out / "report" / "report.md").is_file() and (out / "report" / "confusion_student.png").is_file()
    vlm = r["cost"]["vlm"]  # the tiny CLIP was re-loaded from annotation.json and timed on the same images
    assert vlm["source"] == "measured" and vlm["images_per_second"] > 0 and vlm["parameters"] > 0
    assert r["cost"]["faster_x"] == pytest.approx(r["cost"]["student"]["images_per_second"] / vlm["images_per_second"])
    assert {k: v["status"] for k, v in stages(out).items()} == {"annotate": "done", "train": "done", "evaluate": "done"}
    assert "predict: coreg predict" in res.output and "test accuracy: student" in res.output
    before = mtimes(out)

    # 1. the same command again: nothing is redone
    res = coreg_run(images, out, clip)
    assert res.exit_code == 0, res.output
    assert "annotate: kept" in res.output and "train: kept" in res.output and "evaluate: kept" in res.output
    assert mtimes(out) == before

    # 2. interrupted during evaluate: annotate and train stay, evaluate finishes on the re-run
    shutil.rmtree(out / "report")
    from stages import evaluate

    real = evaluate.run

    def interrupt(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "run", interrupt)
    res = coreg_run(images, out, clip)
    assert res.exit_code == 130 and stages(out)["evaluate"]["status"] == "running"
    monkeypatch.setattr(evaluate, "run", real)
    res = coreg_run(images, out, clip)
    assert res.exit_code == 0, res.output
    assert "annotate: kept" in res.output and "train: kept" in res.output and "evaluate: done" in res.output
    after = mtimes(out)
    assert after["annotated/dataset_dict.json"] == before["annotated/dataset_dict.json"]
    assert after["model/model.safetensors"] == before["model/model.safetensors"]

    # 3. more epochs: same run, continued from its checkpoint (metrics of epochs 0-1 kept, epoch 2 added)
    first_lines = (out / "model" / "metrics.jsonl").read_text().splitlines()
    res = coreg_run(images, out, clip, "--epochs", "3")
    assert res.exit_code == 0, res.output
    assert "train: resumed from its checkpoint" in res.output and "evaluate: done" in res.output
    lines = (out / "model" / "metrics.jsonl").read_text().splitlines()
    assert lines[:2] == first_lines and [json.loads(x)["epoch"] for x in lines] == [0, 1, 2]

    # 4. a changed training option redoes train (from scratch) and evaluate, not annotate
    res = coreg_run(images, out, clip, "--epochs", "3", "--seed", "1")
    assert res.exit_code == 0, res.output
    assert "annotate: kept" in res.output and "train: started over (its checkpoint was written with other options)" in res.output
    assert (out / "annotated/dataset_dict.json").stat().st_mtime_ns == before["annotated/dataset_dict.json"]
    assert json.loads((out / "model" / "config.json").read_text())["seed"] == 1
    assert logged_epochs(out) == [0, 1, 2]

    # 5. a changed annotate option redoes everything
    res = coreg_run(images, out, clip, "--epochs", "3", "--seed", "1", "--candidates", "topk:2")
    assert res.exit_code == 0, res.output
    assert "annotate: done" in res.output and "train: done" in res.output
    assert (out / "annotated/dataset_dict.json").stat().st_mtime_ns != before["annotated/dataset_dict.json"]


def interrupted_run(images, out, clip, monkeypatch):
    """`coreg run` killed right after the first epoch's checkpoint (TINY: the warm-up's only epoch)."""
    from pipeline import checkpoint

    real = checkpoint.save_checkpoint

    def save_then_stop(out_dir, *, epoch, method, config, scaler=None):
        real(out_dir, epoch=epoch, method=method, config=config, scaler=scaler)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_stop)
    res = coreg_run(images, out, clip)
    monkeypatch.setattr(checkpoint, "save_checkpoint", real)
    return res


def test_interrupted_training_resumes_from_its_checkpoint(tmp_path, clip, monkeypatch):
    images = make_image_folder(tmp_path / "imgs", classes=CLASSES, n_per_class=6, size=16, split=("train", "test"))
    out = tmp_path / "out"
    assert interrupted_run(images, out, clip, monkeypatch).exit_code == 130
    assert stages(out)["annotate"]["status"] == "done" and stages(out)["train"]["status"] == "running"
    annotated = (out / "annotated/dataset_dict.json").stat().st_mtime_ns
    res = coreg_run(images, out, clip)
    assert res.exit_code == 0, res.output
    assert "annotate: kept" in res.output and "train: resumed from its checkpoint" in res.output
    assert "resuming" in res.output and "at epoch 1" in res.output
    assert (out / "annotated/dataset_dict.json").stat().st_mtime_ns == annotated
    assert logged_epochs(out) == [0, 1]


def test_run_continues_a_checkpoint_exactly_where_train_would(tmp_path, clip, monkeypatch):
    # `coreg run` asks train's own question (pipeline/checkpoint.check_resumable, of the preset-resolved options):
    # an option Co-Reg reads only after the warm-up may change while the checkpoint is still in it, so the run
    # continues (a key of the given options restarted it); once self-training has read it, a change starts over
    images = make_image_folder(tmp_path / "imgs", classes=CLASSES, n_per_class=6, size=16, split=("train", "test"))
    out = tmp_path / "out"
    assert interrupted_run(images, out, clip, monkeypatch).exit_code == 130
    res = coreg_run(images, out, clip, "--p-threshold", "0.6")
    assert res.exit_code == 0, res.output
    assert "train: resumed from its checkpoint" in res.output and "at epoch 1" in res.output
    assert logged_epochs(out) == [0, 1]
    assert json.loads((out / "model" / "config.json").read_text())["train_config"]["p_threshold"] == 0.6
    res = coreg_run(images, out, clip, "--p-threshold", "0.6", "--epochs", "3")  # more epochs continue the run
    assert res.exit_code == 0, res.output
    assert "train: resumed from its checkpoint" in res.output and "at epoch 2" in res.output
    res = coreg_run(images, out, clip, "--p-threshold", "0.7", "--epochs", "3")  # read by the epochs run: refused
    assert res.exit_code == 0, res.output
    assert "train: started over (its checkpoint was written with other options)" in res.output
    assert logged_epochs(out) == [0, 1, 2] and "resuming" not in res.output


def test_flat_folder_runs_without_labels_and_says_so(tmp_path, clip):
    labeled = make_image_folder(tmp_path / "src", classes=CLASSES, n_per_class=6, size=16)
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted(labeled.rglob("*.png")):
        shutil.copy(p, flat / f"{p.parent.name}_{p.name}")
    out = tmp_path / "out"
    res = coreg_run(flat, out, clip, "--classes", ",".join(CLASSES))
    assert res.exit_code == 0, res.output
    r = json.loads((out / "report" / "report.json").read_text())
    assert r["split"] == "train" and not r["labels_known"] and r["student_accuracy"] is None
    assert 0 <= r["agreement_with_vlm"] <= 1 and sum(r["prediction_counts"].values()) == 18
    assert "accuracy could not be measured" in res.output and "No test split" in res.output
    assert "purified" not in res.output and not any("purified" in n for n in r["notes"])  # nothing to purify-check
    assert "Accuracy cannot be measured" in (out / "report" / "report.md").read_text()


def test_out_holding_other_files_is_refused(tmp_path, clip):
    images = make_image_folder(tmp_path / "imgs", classes=CLASSES, n_per_class=2, size=16)
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("x")
    res = coreg_run(images, out, clip)
    assert res.exit_code == 2 and "did not write (thesis.tex)" in res.output
    res = coreg_run(images, images / "out", clip)
    assert res.exit_code == 2 and "lies inside IMAGES" in res.output


def test_fingerprints_follow_options_and_files(tmp_path):
    from pipeline.config import AnnotateConfig

    images = make_image_folder(tmp_path / "imgs", classes=CLASSES, n_per_class=2, size=16)
    cfg = AnnotateConfig(images=str(images), out=str(tmp_path / "out"))
    fp = run_stage.annotate_fingerprint(cfg, tmp_path / "out")
    import dataclasses

    assert run_stage.annotate_fingerprint(dataclasses.replace(cfg, num_workers=7), tmp_path / "out") == fp
    assert run_stage.annotate_fingerprint(dataclasses.replace(cfg, candidates="topk:2"), tmp_path / "out") != fp
    assert run_stage.annotate_fingerprint(dataclasses.replace(cfg, seed=3), tmp_path / "out") == fp  # CLIP ignores it
    from pipeline.config import TrainConfig

    train = TrainConfig(annotated="a", out="m")
    full = run_stage.train_fingerprint(train, "data")
    assert run_stage.train_fingerprint(dataclasses.replace(train, epochs=900), "data") != full
    assert run_stage.train_fingerprint(dataclasses.replace(train, resume=True, out="elsewhere"), "data") == full
    assert run_stage.train_fingerprint(train, "other data") != full
    synth = dataclasses.replace(cfg, annotator="synthetic")
    assert run_stage.annotate_fingerprint(dataclasses.replace(synth, seed=3), tmp_path / "out") != run_stage.annotate_fingerprint(synth, tmp_path / "out")
    (images / "cat" / "extra.png").write_bytes((images / "cat" / "0000.png").read_bytes())
    assert run_stage.annotate_fingerprint(cfg, tmp_path / "out") != fp
