"""The model directory contract: save_model / load_model round trip, inference helpers, clear errors.

`model_config` and `save_constant_model` are imported by the other evaluate/predict/export tests.
"""

import json
import os

import pytest
import torch

from pipeline.errors import CoregError
from pipeline.model_io import CONFIG_FILE, WEIGHTS_FILE, library_versions, load_model, save_model
from pipeline.networks import build_student

CLASSES = ["cat", "dog", "fox"]


def model_config(classes=CLASSES, *, nets=("net1", "net2"), image_size=16, predict_with=None) -> dict:
    return {
        "classes": list(classes),
        "arch": "small_cnn",
        "image_size": image_size,
        "mean": [0.5, 0.4, 0.3],
        "std": [0.25, 0.2, 0.3],
        "proj_dim": 8,
        "nets": list(nets),
        "predict_with": predict_with or ("ensemble" if len(nets) == 2 else "net1"),
        "method": "coreg",
        "preprocessing": "test: resize shorter side, centre crop",
        "train_config": {"epochs": 1},
        "seed": 0,
        "versions": library_versions(),
    }


def student_weights(config: dict, *, biases: dict[str, list[float]] | None = None, seed: int = 0) -> dict:
    """Random small_cnn weights per net; with `biases`, a net's fc weight is zeroed so its logits are exactly
    its bias for every image (a model whose predictions a test knows)."""
    torch.manual_seed(seed)
    weights = {}
    for name in config["nets"]:
        net = build_student(
            config["arch"], num_classes=len(config["classes"]), image_size=config["image_size"], proj_dim=config["proj_dim"]
        )
        if biases is not None:
            with torch.no_grad():
                net.fc.weight.zero_()
                net.fc.bias.copy_(torch.tensor(biases[name]))
        weights.update({f"{name}.{k}": v for k, v in net.state_dict().items()})
    return weights


def save_constant_model(out, *, classes=CLASSES, biases=None, image_size=16, predict_with=None) -> dict:
    """A two-network model whose logits are the given per-net biases for every image."""
    biases = biases or {"net1": [0.0, 2.0, 0.0], "net2": [0.0, 0.0, 1.0]}
    nets = tuple(biases)
    cfg = model_config(classes, nets=nets, image_size=image_size, predict_with=predict_with)
    save_model(out, weights=student_weights(cfg, biases=biases), config=cfg)
    return cfg


def test_round_trip_reproduces_the_networks(tmp_path):
    cfg = model_config()
    weights = student_weights(cfg, seed=3)
    save_model(tmp_path / "m", weights=weights, config=cfg)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]  # no temp files left
    umask = os.umask(0)
    os.umask(umask)
    for f in (CONFIG_FILE, WEIGHTS_FILE):  # as readable as any file the user writes, not mkstemp's 0600
        assert (tmp_path / "m" / f).stat().st_mode & 0o777 == 0o666 & ~umask
    m = load_model(tmp_path / "m")
    assert m.classes == CLASSES and m.image_size == 16 and sorted(m.nets) == ["net1", "net2"]
    assert not m.nets["net1"].training
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    # Reference: the same weights in fresh networks, normalised by hand.
    xn = (x.float() / 255 - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    ref = {}
    for name in ("net1", "net2"):
        net = build_student("small_cnn", num_classes=3, image_size=16, proj_dim=8).eval()
        net.load_state_dict({k[5:]: v for k, v in weights.items() if k.startswith(name + ".")})
        ref[name] = net(xn).detach()
    torch.testing.assert_close(m.logits(x, "net1"), ref["net1"])
    torch.testing.assert_close(m.logits(x, "net2"), ref["net2"])
    torch.testing.assert_close(m.logits(x), ref["net1"] + ref["net2"])  # default = ensemble = sum of logits
    torch.testing.assert_close(m.probs(x), (ref["net1"] + ref["net2"]).softmax(1))
    # A [0, 1] float image is the same input as its uint8 form.
    torch.testing.assert_close(m.logits(x.float() / 255), m.logits(x))
    saved = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    assert saved["input"].startswith("RGB image as uint8")


def test_counts_leave_out_the_training_only_projection_head(tmp_path):
    save_constant_model(tmp_path)
    m = load_model(tmp_path)
    net = m.nets["net1"]
    proj = sum(p.numel() for p in net.proj.parameters())
    total = sum(p.numel() for p in net.parameters())
    assert m.num_parameters("net1") == total - proj
    assert m.num_parameters() == m.num_parameters("ensemble") == 2 * (total - proj)
    floats = sum(v.numel() for k, v in net.state_dict().items() if not k.startswith("proj."))
    assert m.weights_bytes("net2") == 4 * floats
    assert m.file_bytes() == (tmp_path / WEIGHTS_FILE).stat().st_size


def test_single_network_model(tmp_path):
    save_constant_model(tmp_path, biases={"net1": [1.0, 0.0, 0.0]})
    m = load_model(tmp_path)
    x = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    assert m.logits(x).argmax(1).tolist() == [0, 0]
    with pytest.raises(CoregError, match="'ensemble' needs two"):
        m.logits(x, "ensemble")
    with pytest.raises(CoregError, match="no network 'net2'"):
        m.logits(x, "net2")


def test_save_rejects_inconsistent_input(tmp_path):
    cfg = model_config(nets=("net1",))
    with pytest.raises(ValueError, match="weight prefixes"):
        save_model(tmp_path, weights=student_weights(model_config()), config=cfg)
    with pytest.raises(ValueError, match="lacks"):
        save_model(tmp_path, weights={}, config={"classes": CLASSES})


def test_missing_directory(tmp_path):
    with pytest.raises(CoregError, match="model directory not found; train one"):
        load_model(tmp_path / "nope")


def test_incomplete_directory_names_the_missing_file(tmp_path):
    save_constant_model(tmp_path)
    (tmp_path / WEIGHTS_FILE).unlink()
    with pytest.raises(CoregError, match="missing model.safetensors; point to"):
        load_model(tmp_path)
    (tmp_path / "checkpoint-last.pt").write_bytes(b"")
    with pytest.raises(CoregError, match="training has not finished"):
        load_model(tmp_path)


def test_weights_that_do_not_match_the_config(tmp_path):
    save_constant_model(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    cfg["classes"] = ["a", "b", "c", "d"]  # fc has 3 outputs
    (tmp_path / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(CoregError, match="net1 weights do not match config.json.*4 classes"):
        load_model(tmp_path)


def test_broken_config(tmp_path):
    save_constant_model(tmp_path)
    (tmp_path / CONFIG_FILE).write_text("{")
    with pytest.raises(CoregError, match="not valid JSON"):
        load_model(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"classes": CLASSES}))
    with pytest.raises(CoregError, match="lacks.*not written by `coreg train`"):
        load_model(tmp_path)
