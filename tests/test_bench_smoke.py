"""Every speed benchmark still runs: each script on a tiny image folder, in a fresh process, as a user runs it.

Sizes are a few images so each script takes seconds beyond its imports; the numbers are meaningless, the
point is that a change in the code they drive (a new argument, a moved function) breaks this test instead of
the benchmark silently. Their tables go to temporary files, never to bench/results/.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import make_image_folder, make_tiny_clip

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    make_image_folder(root / "cifar", classes=("cat", "dog", "bird"), n_per_class=4, size=32, split=("train", "test"), fmt="jpg")
    return root


def bench(script: str, *args: str, cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, f"{script}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def test_annotate_speed(data):
    clip = make_tiny_clip(data / "clip")
    # DATA relative to the working directory: the stage run symlinks its images, and must resolve them.
    out = bench("annotate_speed.py", "cifar", "--n", "6", "--batch-size", "3", "--num-workers", "1", "--model", clip,
                "--write", str(data / "annotate.md"), cwd=data)
    assert "loop / floor" in out and "whole `coreg annotate` stage, 6 images" in out
    assert (data / "annotate.md").read_text().startswith("# `coreg annotate` speed")


def test_augment_speed(data):
    out = bench("augment_speed.py", "--data", str(data / "cifar" / "test"), "--batch", "8", "--size", "16",
                "--repeats", "1", "--results", str(data / "augment.md"), cwd=data)
    assert "preact_resnet18 forward+backward" in out and "decode_images: 12 CIFAR-10 JPEGs" in out
    assert (data / "augment.md").is_file()


def test_train_speed(data):
    out = bench("train_speed.py", str(data / "cifar"), "--n", "24", "--batch-size", "8", "--repeats", "1",
                "--threads", "1", "--cpu", "--out", str(data / "train.md"), cwd=data)
    assert "median ratio pipeline / floor" in out
    assert "| 1 |" in (data / "train.md").read_text()


def test_accuracy(data):
    """bench/accuracy.py end to end on 3 classes x 2 images: the clean ceiling, an instance-dependent and a
    synthetic setting, the default Co-Reg and one baseline, then the table from the cache alone."""
    common = ["--data", str(data / "cifar"), "--work", str(data / "acc"), "--train-per-class", "2",
              "--test-per-class", "2", "--pool-per-class", "2", "--shots", "1", "--epochs", "2", "--warmup", "1",
              "--rampup", "1", "--start-cont", "1", "--queue-size", "8", "--batch-size", "2", "--seeds", "0",
              "--jobs", "1", "--out", str(data / "acc.md")]  # fmt: skip
    bench("accuracy.py", *common, "--settings", "clean;instance:shots=1;synthetic:q=0.1,eta=0.2",
          "--methods", "coreg,ce", cwd=data)
    table = (data / "acc.md").read_text()
    assert "## clean" in table and "Ceiling check" in table and "| coreg |" in table and "| ce |" in table
    import json

    from pipeline.prior_shift import RULE

    saved = json.loads((data / "acc.json").read_text())
    presets = {r["method"]: r["preset"] for r in saved}  # bench/accuracy.py writes a list of results
    assert presets["coreg"]["prior_shift_rule"] == RULE  # a change of the shift's guards retrains
    assert "prior_shift_rule" not in (presets["ce"] or {})  # the baselines run --preset paper: no fingerprint
    coreg = [r for r in saved if r["method"] == "coreg" and r.get("diag")]
    assert coreg and all(isinstance(r["diag"]["classes_raised"], int) for r in coreg) and "(raised: " in table
    out = bench("accuracy.py", *common, "--settings", "clean;instance:shots=1", "--methods", "coreg,ce,kd",
                "--table-only", cwd=data)
    assert "table written" in out and "| kd |" not in (data / "acc.md").read_text()  # nothing new was trained
    # a later session: a fresh --work that takes every run from the committed JSON instead of retraining
    out = bench("accuracy.py", *[a if a != str(data / "acc") else str(data / "acc2") for a in common],
                "--settings", "clean;instance:shots=1", "--methods", "coreg,ce", "--reuse", str(data / "acc.json"),
                "--out", str(data / "acc2.md"), cwd=data)  # fmt: skip
    assert "test acc" not in out and "| coreg |" in (data / "acc2.md").read_text()
    assert "another environment" not in (data / "acc2.md").read_text()  # reused from this machine: paired runs
    assert all(r["env"]["torch"] and r["env"]["cpu"] for r in saved)  # every run records where it was made
    # --table-only over committed runs made under other preset rules: shown and flagged, never retrained
    saved = json.loads((data / "acc.json").read_text())
    for r in saved:
        if r["method"] == "coreg":
            r["preset"] = {**r["preset"], "warmup_loss": "an-older-rule"} if isinstance(r.get("preset"), dict) else "older"
            del r["env"]  # made before the benchmark recorded its environment
    (data / "old.json").write_text(json.dumps(saved))
    out = bench("accuracy.py", *[a if a != str(data / "acc") else str(data / "acc3") for a in common],
                "--settings", "clean;instance:shots=1", "--methods", "coreg,ce", "--reuse", str(data / "old.json"),
                "--out", str(data / "acc3.md"), "--table-only", cwd=data)  # fmt: skip
    text = (data / "acc3.md").read_text()
    assert "test acc" not in out and "| coreg |" in text and "earlier default-preset rules" in text
    assert "runs were made in another environment" in text and "## Runs from another environment" in text


def test_accuracy_methods_keep_a_comma_inside_options():
    from bench.accuracy import split_methods

    assert split_methods("coreg,coreg~--warmup-loss vlm-net-soft,vlm-hard-net --prior-penalty 1,ce,") == [
        "coreg", "coreg~--warmup-loss vlm-net-soft,vlm-hard-net --prior-penalty 1", "ce"]  # fmt: skip


def test_accuracy_dev_subset_is_disjoint(tmp_path):
    """`--subset dev` (for choosing defaults) never shows a reported image: its train and test images come
    from training images the reported subset leaves unused, and the annotator's pool is the same."""
    sys.path.insert(0, str(REPO))
    from bench.accuracy_data import image_folder

    make_image_folder(tmp_path / "d", classes=("a", "b"), n_per_class=9, size=8, split=("train", "test"))
    names = {}
    for subset in ("report", "dev"):
        images, pool, classes = image_folder(tmp_path / "d", tmp_path / subset, train=2, test=2, pool=3, subset=subset)
        names[subset] = {part: {p.resolve() for p in root.rglob("*.png")}
                         for part, root in (("train", images / "train"), ("test", images / "test"), ("pool", pool))}  # fmt: skip
    rep, dev = names["report"], names["dev"]
    assert rep["pool"] == dev["pool"] and len(dev["train"]) == len(dev["test"]) == 4
    assert not (dev["train"] | dev["test"]) & (rep["train"] | rep["test"] | rep["pool"])
    assert not dev["train"] & dev["test"]


def test_accuracy_long_tailed_subset(tmp_path):
    """`--imbalance R`: class i keeps n·R^(−i/(C−1)) training and test images, each a prefix of the balanced
    subset's (the same images, fewer of them), and the annotator's pool is untouched."""
    sys.path.insert(0, str(REPO))
    from bench.accuracy_data import class_counts, image_folder

    assert class_counts(200, 10, 10.0)[0] == 200 and class_counts(200, 10, 10.0)[-1] == 20
    assert class_counts(200, 10, 1.0) == [200] * 10
    assert class_counts(5, 3, 100.0) == [5, 1, 1]  # 0.5 and 0.05 images: never an empty class
    make_image_folder(tmp_path / "d", classes=("a", "b", "c"), n_per_class=9, size=8, split=("train", "test"))
    found = {}
    for name, r in (("bal", 1.0), ("lt", 4.0)):
        images, pool, _ = image_folder(tmp_path / "d", tmp_path / name, train=4, test=4, pool=3, imbalance=r)
        found[name] = {(part, c): {p.resolve() for p in (root / c).glob("*.png")}
                       for part, root in (("train", images / "train"), ("test", images / "test"), ("pool", pool))
                       for c in ("a", "b", "c")}  # fmt: skip
    for part in ("train", "test"):
        assert [len(found["lt"][part, c]) for c in ("a", "b", "c")] == [4, 2, 1]
        assert all(found["lt"][part, c] <= found["bal"][part, c] for c in ("a", "b", "c"))
    assert all(found["lt"]["pool", c] == found["bal"]["pool", c] for c in ("a", "b", "c"))


def test_annotation_probe(tmp_path):
    """bench/annotation_probe.py runs on a dataset in the stage contract, and its Dawid-Skene aggregation beats a
    majority vote where the labellers differ in quality (three votes: one right 90% of the time, two at 40%)."""
    import datasets
    import numpy as np

    from bench.annotation_probe import dawid_skene
    from tests.annotated import make_annotated

    ann = make_annotated(tmp_path / "ann", n_train=30, n_test=0)
    out = bench("annotation_probe.py", str(ann), cwd=tmp_path)
    header, _, row = out.strip().splitlines()
    cells = dict(zip(header.strip("| ").split(" | "), row.strip("| ").split(" | "), strict=True))
    train = datasets.load_from_disk(str(ann))["train"]
    assert cells["dataset"] == str(ann) and "dawid_skene" not in cells  # no votes column: no aggregation
    assert float(cells["top1"]) == round(100 * np.mean(np.array(train["vlm_pred"]) == np.array(train["label"])), 1)

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 3000)
    votes = np.stack([np.where(rng.random(3000) < acc, y, (y + rng.integers(1, 4, 3000)) % 4) for acc in (0.9, 0.4, 0.4)], 1)
    majority = np.array([np.bincount(v, minlength=4).argmax() for v in votes])
    assert (dawid_skene(votes, 4).argmax(1) == y).mean() > (majority == y).mean() + 0.05


def test_fit_probe(tmp_path):
    """bench/fit_probe.py scores a trained model on its training rows, split by whether the set holds the label."""
    import datasets
    import numpy as np
    from typer.testing import CliRunner

    from bench.fit_probe import probe
    from stages.cli import app
    from tests.annotated import make_annotated

    ann = make_annotated(tmp_path / "ann", n_train=30, n_test=0, eta=0.3)
    model = tmp_path / "model"
    r = CliRunner().invoke(app, ["train", str(ann), str(model), "--epochs", "2", "--arch", "small_cnn", "--cpu", "--num-workers", "0"])
    assert r.exit_code == 0, r.output
    out = bench("fit_probe.py", str(ann), str(model), cwd=tmp_path)
    header, _, row = out.strip().splitlines()
    cells = dict(zip(header.strip("| ").split(" | "), row.strip("| ").split(" | "), strict=True))
    train = datasets.load_from_disk(str(ann))["train"]
    valid = np.mean([y in c for y, c in zip(train["label"], train["candidates"], strict=True)])
    assert 0 < valid < 1 and float(cells["valid rows (%)"]) == round(100 * valid, 1)
    res = probe(str(ann), str(model))
    assert all(0 <= v <= 100 for v in res.values()) and cells["model"] == str(model)


def test_gpu_script_plans_and_runs_its_ceiling_table(data, tmp_path):
    """bench/gpu.sh end to end as a smoke run without a GPU (DEVICE=cpu, a tiny student): the speed step, the
    epoch plan read from its printed epoch time, and the accuracy table with the clean ceiling beside the
    annotator's setting. A GPU session runs the same script with the defaults."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DEVICE": "cpu", "ARCH": "small_cnn",
           "SPEED_N": "24", "THREADS": "1", "BATCH_SIZE": "2", "BUDGET": "600", "OVERHEAD": "599", "SETTING": "clean;instance:shots=1",
           "POOL_PER_CLASS": "2", "TRAIN_PER_CLASS": "2", "WORK": str(tmp_path / "work")}  # fmt: skip
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), str(data / "cifar"), str(tmp_path / "res")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "2 epochs (warm-up 1) on 6 images" in r.stdout
    table = (tmp_path / "res" / "accuracy_gpu.md").read_text()
    assert "Ceiling check" in table and "| coreg |" in table and "| ce |" in table
    assert (tmp_path / "res" / "train_speed_gpu.md").is_file()
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), str(data / "cifar"), str(tmp_path / "res2")], cwd=REPO,
                       env={**env, "POOL_PER_CLASS": "4"}, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2 and "not more than POOL_PER_CLASS=4" in r.stderr


def test_instance_annotator_prompts_subset():
    """`instance:...,prompts=A+B` (bench/accuracy_data.py): the union of fewer prompts, so smaller sets and lower
    coverage; each kept prompt sees the same few shots as in the five-prompt annotator; a typo stops the run."""
    import numpy as np
    import torch

    from bench.instance_annotator import PROMPTS, InstanceAnnotator

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (60, 3, 16, 16), generator=g, dtype=torch.uint8)
    y = np.repeat(np.arange(3), 20)
    full = InstanceAnnotator(shots=5, seed=1).fit(x, y).annotate(x)
    two = InstanceAnnotator(shots=5, seed=1, prompts=("layout", "gradient")).fit(x, y).annotate(x)
    assert full["votes"].shape == (60, len(PROMPTS)) and two["votes"].shape == (60, 2)
    assert (two["candidates"].sum(1) <= 2).all() and (two["candidates"].sum(1) >= 1).all()
    # the kept prompts keep their draws and votes: gradient and layout are prompts 1 and 2 of the five
    assert (two["votes"] == full["votes"][:, [1, 2]]).all()
    with pytest.raises(SystemExit, match="unknown prompts"):
        InstanceAnnotator(prompts=("colour", "texture"))
