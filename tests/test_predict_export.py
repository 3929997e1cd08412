"""`coreg predict` (CSV, unreadable files reported) and `coreg export` (ONNX / TorchScript match predict)."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_model_io import CLASSES, model_config, student_weights
from typer.testing import CliRunner

from pipeline.data import image_to_tensor
from pipeline.errors import CoregError
from pipeline.model_io import load_model, save_model
from stages import export
from stages.cli import app


@pytest.fixture
def model(tmp_path):
    cfg = model_config()
    save_model(tmp_path / "model", weights=student_weights(cfg, seed=1), config=cfg)
    return tmp_path / "model"


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (24, 16)), ("sub/b.jpg", (16, 16)), ("c.png", (40, 30))):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / name)
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def reference_probs(model_dir, paths):
    m = load_model(model_dir)
    x = torch.stack([image_to_tensor(Image.open(p), m.image_size) for p in paths])  # (N, 3, S, S)
    return m.probs(x).numpy(), x


def test_predict_writes_a_csv_and_reports_unreadable_files(tmp_path, model, images):
    out = tmp_path / "pred.csv"
    res = CliRunner().invoke(app, ["predict", str(model), str(images), "--out", str(out), "--cpu", "--batch-size", "2", "--top-k", "2"])
    assert res.exit_code == 0, res.output
    assert "broken.jpg: unreadable image" in res.output and "3 image(s) classified, 1 unreadable" in res.output
    rows = read_csv(out)
    by_name = {r["path"].split("imgs/")[1]: r for r in rows}
    assert sorted(by_name) == ["a.png", "broken.jpg", "c.png", "sub/b.jpg"]
    assert by_name["broken.jpg"]["error"] == "unreadable image" and by_name["broken.jpg"]["class"] == ""
    good = [r for r in rows if not r["error"]]
    want, _ = reference_probs(model, [r["path"] for r in good])
    for r, p in zip(good, want, strict=True):
        assert r["class"] == CLASSES[int(p.argmax())]
        assert float(r["probability"]) == pytest.approx(p.max(), abs=1e-6)
        top = [t.split(":") for t in r["top_k"].split(";")]
        assert len(top) == 2 and top[0][0] == r["class"]
        assert float(top[1][1]) == pytest.approx(np.sort(p)[-2], abs=1e-6)
    # a second run may overwrite its own CSV, but never someone else's file
    assert CliRunner().invoke(app, ["predict", str(model), str(images / "a.png"), "--out", str(out), "--cpu"]).exit_code == 0
    assert len(read_csv(out)) == 1
    other = tmp_path / "notes.csv"
    other.write_text("my,own,data\n")
    res = CliRunner().invoke(app, ["predict", str(model), str(images), "--out", str(other), "--cpu"])
    assert res.exit_code == 2 and "not a `coreg predict` CSV" in res.output
    res = CliRunner().invoke(app, ["predict", str(model), str(tmp_path / "missing.png"), "--cpu"])
    assert res.exit_code == 2 and "no such file or folder" in res.output


def test_predict_to_stdout(model, images):
    res = CliRunner().invoke(app, ["predict", str(model), str(images / "a.png"), "--cpu"])
    assert res.exit_code == 0, res.output
    assert "path,class,probability,top_k,error" in res.output and "a.png," in res.output


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_reproduces_predict(tmp_path, model, images, fmt):
    out = tmp_path / "pred.csv"
    assert CliRunner().invoke(app, ["predict", str(model), str(images), "--out", str(out), "--cpu", "--top-k", "3"]).exit_code == 0
    res = CliRunner().invoke(app, ["export", str(model), "--format", fmt])
    assert res.exit_code == 0, res.output
    path = model / ("model.onnx" if fmt == "onnx" else "model.pt")
    meta = json.loads(path.with_name(path.name + ".json").read_text())
    assert meta["classes"] == CLASSES and meta["input"]["dtype"] == "uint8" and meta["input"]["shape"] == ["batch", 3, 16, 16]
    assert meta["max_abs_difference_at_export"] < 1e-5
    rows = [r for r in read_csv(out) if not r["error"]]
    _, x = reference_probs(model, [r["path"] for r in rows])
    got = export._run_onnx(path, x) if fmt == "onnx" else export._run_torchscript(path, x)  # (N, C)
    for r, p in zip(rows, got, strict=True):
        csv_probs = {c: float(v) for c, v in (t.split(":") for t in r["top_k"].split(";"))}
        assert r["class"] == CLASSES[int(p.argmax())]
        for i, c in enumerate(CLASSES):
            assert csv_probs[c] == pytest.approx(p[i], abs=2e-6)
    if fmt == "onnx":
        import onnx

        props = {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}
        assert props["classes"] == CLASSES


def test_export_errors(tmp_path, model):
    with pytest.raises(CoregError, match="--format 'tflite' is unknown"):
        export.run(model=str(model), format="tflite")
    with pytest.raises(CoregError, match="is a folder"):
        export.run(model=str(model), format="onnx", out=str(tmp_path))
    foreign = tmp_path / "x.onnx"
    foreign.write_bytes(b"mine")
    with pytest.raises(CoregError, match="not written by `coreg export`"):
        export.run(model=str(model), format="onnx", out=str(foreign))
    with pytest.raises(CoregError, match="model directory not found"):
        export.run(model=str(tmp_path / "nope"), format="onnx")
