"""`coreg evaluate` on a hand-made annotated dataset and a model whose predictions are known exactly.

The model's networks have zeroed classifier weights, so their logits are their biases for every image:
net1 -> [0, 2, 0] (predicts dog), net2 -> [0, 0, 1] (predicts fox), ensemble sum [0, 2, 1] (dog).
"""

import json
import os
import subprocess
import sys

import datasets
import numpy as np
import pytest
from PIL import Image
from test_model_io import CLASSES, save_constant_model
from typer.testing import CliRunner

from pipeline.config import EvaluateConfig
from pipeline.errors import CoregError
from pipeline.schema import features
from pipeline.training import Dist
from stages import evaluate
from stages.cli import app

# cat=0 dog=1 fox=2; the student always says dog
LABELS = [1, 1, 0, 1, 1, 0]
VLM_PRED = [1, 0, 0, 2, 2, 1]
CANDS = [[1], [0], [0, 1], [2], [1, 2], [0]]


def make_dataset(path, *, labels=LABELS, classes=CLASSES, splits=("train", "test"), info=None, n=6):
    """The first n of the six hand-made rows, in every split given."""
    rows = {
        "image": [Image.new("RGB", (20, 16), (40 * i, 90, 200 - 30 * i)) for i in range(n)],
        "path": [f"img{i}.png" for i in range(n)],
        "label": list(labels)[:n],
        "trusted": [False] * n,
        "candidates": CANDS[:n],
        "vlm_probs": [np.eye(len(classes), dtype=np.float32)[p].tolist() for p in VLM_PRED[:n]],
        "vlm_pred": VLM_PRED[:n],
    }
    ds = datasets.Dataset.from_dict(rows, features=features(classes))
    datasets.DatasetDict({s: ds for s in splits}).save_to_disk(str(path))
    if info is not None:
        (path / "annotation.json").write_text(json.dumps(info))
    return path


@pytest.fixture
def model(tmp_path):
    save_constant_model(tmp_path / "model")
    return tmp_path / "model"


def test_exact_report_on_known_predictions(tmp_path, model, capsys):
    data = make_dataset(tmp_path / "data", info={"annotator": "clip", "model": "ViT-X", "images_per_second": 10.0, "parameters": 10**6})
    out = evaluate.run(EvaluateConfig(model=str(model), annotated=str(data), cpu=True, batch_size=4))
    assert out == model / "eval-test"
    r = json.loads((out / "report.json").read_text())
    assert r["split"] == "test" and r["n"] == 6 and r["labels_known"]
    assert r["student_accuracy"] == pytest.approx(4 / 6)
    assert r["zero_shot_accuracy"] == pytest.approx(2 / 6)
    assert r["gain_over_zero_shot"] == pytest.approx(2 / 6)
    assert r["student_balanced_accuracy"] == pytest.approx(0.5)  # cat 0/2, dog 4/4
    assert r["zero_shot_balanced_accuracy"] == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert r["variants"]["ensemble"]["accuracy"] == pytest.approx(4 / 6)
    assert r["variants"]["net1"]["accuracy"] == pytest.approx(4 / 6)
    assert r["variants"]["net2"]["accuracy"] == 0.0
    assert r["per_class"]["cat"] == {"count": 2, "student_accuracy": 0.0, "zero_shot_accuracy": 0.5}
    assert r["per_class"]["dog"] == {"count": 4, "student_accuracy": 1.0, "zero_shot_accuracy": 0.25}
    assert r["per_class"]["fox"]["count"] == 0 and r["per_class"]["fox"]["student_accuracy"] is None
    assert r["candidate_coverage"] == pytest.approx(4 / 6)
    assert r["mean_candidates"] == pytest.approx(8 / 6)
    out_c = r["outside_candidates"]  # dog is outside the set on rows 1, 3, 5; right on 1 and 3
    assert (out_c["count"], out_c["labeled"], out_c["student_correct"], out_c["vlm_correct"]) == (3, 3, 2, 0)
    dis = r["disagree_with_vlm"]  # rows 1-4; student right on 1, 3, 4; VLM on 2
    assert (dis["count"], dis["student_correct"], dis["vlm_correct"]) == (4, 3, 1)
    assert r["agreement_with_vlm"] == pytest.approx(2 / 6)
    err = r["vlm_errors"]  # the VLM is wrong on 4 rows: the student is right on 3 of them and repeats the 4th
    assert (err["count"], err["copied"], err["student_correct"]) == (4, 1, 3)
    assert r["prediction_counts"] == {"cat": 0, "dog": 6, "fox": 0}
    # cost: the VLM figures come from annotation.json; ratios follow from them
    s, v = r["cost"]["student"], r["cost"]["vlm"]
    assert v["source"] == "annotation.json" and v["images_per_second"] == 10.0
    assert s["parameters"] > 0 and s["images_per_second"] > 0 and s["timed_images"] == 6
    assert r["cost"]["faster_x"] == pytest.approx(s["images_per_second"] / 10)
    assert r["cost"]["smaller_x"] == pytest.approx(10**6 / s["parameters"])
    assert set(r["figures"]) == {"confusion_student", "confusion_vlm", "distribution", "overrules"}
    for f in r["figures"].values():
        assert (out / f).stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "the student repeats its class on 1 (25.0%) and is right on 3 (75.0%)" in md
    assert "points more accurate" in md and "| dog | 4 | 100.0% | 25.0% | +75.0 pts |" in md
    assert "![Student confusion matrix](confusion_student.png)" in md
    printed = capsys.readouterr().out
    assert "66.7%" in printed and "33.3%" in printed and "report.md" in printed


def test_without_labels_reports_agreement_and_says_accuracy_is_unknown(tmp_path, model):
    data = make_dataset(tmp_path / "data", labels=[-1] * 6)
    out = evaluate.run(EvaluateConfig(model=str(model), annotated=str(data), out=str(tmp_path / "r"), cpu=True))
    r = json.loads((out / "report.json").read_text())
    assert not r["labels_known"] and r["student_accuracy"] is None and r["zero_shot_accuracy"] is None
    assert r["candidate_coverage"] is None and r["mean_candidates"] == pytest.approx(8 / 6)
    assert r["agreement_with_vlm"] == pytest.approx(2 / 6)
    assert r["vlm_errors"]["count"] == 0 and r["vlm_errors"]["copied_share"] is None  # no label, no known error
    assert r["outside_candidates"]["count"] == 3 and r["outside_candidates"]["labeled"] == 0
    assert set(r["figures"]) == {"distribution", "overrules"}
    assert not (out / "confusion_student.png").exists()
    md = (out / "report.md").read_text()
    assert "Accuracy cannot be measured" in md
    assert any("cannot be measured" in n for n in r["notes"])
    assert any("speed is unknown" in n for n in r["notes"])


def test_single_network_model_and_train_split(tmp_path):
    save_constant_model(tmp_path / "m", biases={"net1": [3.0, 0.0, 0.0]})  # always cat
    data = make_dataset(tmp_path / "data", splits=("train",))
    out = evaluate.run(EvaluateConfig(model=str(tmp_path / "m"), annotated=str(data), split="train", cpu=True))
    r = json.loads((out / "report.json").read_text())
    assert out.name == "eval-train"
    assert r["student_accuracy"] == pytest.approx(2 / 6) and list(r["variants"]) == ["net1"]
    assert any("training split" in n for n in r["notes"])


def test_rerun_replaces_the_report_but_never_foreign_files(tmp_path, model):
    data = make_dataset(tmp_path / "data")
    cfg = EvaluateConfig(model=str(model), annotated=str(data), cpu=True, overrule_sheet=0)
    evaluate.run(cfg)
    out = model / "eval-test"
    assert not (out / "overrules.png").exists()  # --overrule-sheet 0 turns the sheet off
    evaluate.run(cfg)  # an earlier report is replaced
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    with pytest.raises(CoregError, match="holds other files"):
        evaluate.run(EvaluateConfig(model=str(model), annotated=str(data), out=str(foreign), cpu=True))


def test_bad_input_gives_one_line_errors(tmp_path, model):
    data = make_dataset(tmp_path / "data", splits=("train",))
    other = make_dataset(tmp_path / "other", classes=["cat", "dog", "wolf"])
    runner = CliRunner()
    cases = [
        ([str(tmp_path / "nope"), str(data)], "model directory not found"),
        ([str(model), str(data)], "has no split 'test' (it has train)"),
        ([str(model), str(other)], "class 2 is 'fox' in the model but 'wolf' in the data"),
        ([str(model), str(tmp_path)], "not an annotated dataset"),
    ]
    for args, message in cases:
        res = runner.invoke(app, ["evaluate", *args, "--cpu"])
        assert res.exit_code == 2, res.output
        assert message in res.output and "Traceback" not in res.output
        assert len(res.output.strip().splitlines()) == 1


def test_shards_cover_every_row_exactly_once():
    for n, world in ((7, 3), (2, 4), (10, 1)):
        shards = [Dist(rank=r, world=world).shard(n) for r in range(world)]
        assert sorted(i for s in shards for i in s) == list(range(n))
    # merging restores row order whatever order the processes report in
    parts = [([3, 4], {"net1": np.array([[3.0], [4.0]])}), ([0, 1, 2], {"net1": np.array([[0.0], [1.0], [2.0]])})]
    assert evaluate.merge_shards(parts, 5)["net1"].ravel().tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(RuntimeError, match="counted twice"):
        evaluate.merge_shards([([0, 1], {"net1": np.zeros((2, 1))}), ([1], {"net1": np.zeros((1, 1))})], 3)


def free_port() -> int:
    """A port nobody listens on now (a fixed one collides with other test runs on the same machine)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_count_every_row_once(tmp_path, model):
    """torchrun with 2 CPU processes (gloo), as under `accelerate launch`: 5 rows split 3 + 2, one report."""
    data = make_dataset(tmp_path / "data", n=5)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "-m", "stages.cli", "evaluate", str(model), str(data),
           "--cpu", "--out", str(tmp_path / "r")]  # fmt: skip
    res = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r = json.loads((tmp_path / "r" / "report.json").read_text())
    assert r["processes"] == 2 and r["n"] == 5
    assert r["student_accuracy"] == pytest.approx(4 / 5) and r["zero_shot_accuracy"] == pytest.approx(2 / 5)
    assert sum(r["prediction_counts"].values()) == 5


def test_headline_and_synthetic_annotator_cost():
    from pipeline.cost import ratios, vlm_from_info
    from pipeline.report import headline

    student = {"parameters": 1000, "images_per_second": 50.0}
    vlm = vlm_from_info({"annotator": "clip", "model": "ViT-B-32", "parameters": 20000, "images_per_second": 200.0})
    r = {"cost": {"student": student, "vlm": vlm, **ratios(student, vlm)}, "gain_over_zero_shot": 0.052}
    assert r["cost"]["smaller_x"] == 20 and r["cost"]["faster_x"] == 0.25
    assert headline(r) == "The student is 20× smaller, 4.0× slower, 5.2 points more accurate than the VLM (ViT-B-32) that annotated its data."
    # a synthetic annotation has no VLM: its generator's speed must not be compared with the student's
    synth = vlm_from_info({"annotator": "synthetic", "images_per_second": 4000.0})
    assert synth["images_per_second"] is None and ratios(student, synth) == {"smaller_x": None, "faster_x": None}


def test_missing_classes_note():
    from stages.evaluate import _missing_classes_note

    assert _missing_classes_note({"a": 3, "b": 1}, {"a": 2, "b": 2}) == []
    assert _missing_classes_note({"a": 4, "b": 0}, {"a": 4, "b": 0}) == []  # the VLM never predicts b either
    (note,) = _missing_classes_note({"a": 4, "b": 0, "c": 0}, {"a": 2, "b": 1, "c": 1})
    assert note.startswith("The student never predicts 2 of the 3 classes that the VLM predicts here (b, c)")
