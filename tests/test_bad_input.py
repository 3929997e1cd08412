"""Issue 10: bad input and failures end in one actionable line (or a correct result), nothing lost."""

from __future__ import annotations

import json

import datasets
import pytest
from typer.testing import CliRunner

from stages.cli import app
from tests.annotated import make_rows

runner = CliRunner()
TINY = ["--arch", "small_cnn", "--batch-size", "8", "--warmup-epochs", "1", "--queue-size", "32", "--num-workers", "0",
        "--lr-period", "800", "--rampup-epochs", "1", "--start-cont", "1", "--gmm-history", "1"]  # a schedule not following --epochs
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
    from stages.train_checks import save_checked

    class M:
        def prediction_weights(self):
            return {"net1.w": torch.tensor([1.0, float("inf")])}

    def save_model(*a, **k):
        raise AssertionError("must not be called")

    with pytest.raises(CoregError, match="non-finite"):
        save_checked(tmp_path, M(), {"train_config": {"predict_with": "net1"}}, save_model)


# --- options: one declaration per field, checked before any work, shown in --help ------------------------


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--p-threshold", "7"], "--p-threshold 7.0 must be 0 <= x <= 1"),
        (["--p-threshold", "-1"], "--p-threshold -1.0 must be 0 <= x <= 1"),
        (["--warmup-epochs", "5", "--epochs", "2"], "--warmup-epochs 5 is longer than the run (--epochs 2)"),
        (["--num-workers", "-3"], "--num-workers -3 must be x >= 0"),
        (["--mixup-alpha", "-1"], "--mixup-alpha -1.0 must be x > 0"),
        (["--k-views", "0"], "--k-views 0 must be x >= 1"),
        (["--sharpen-t", "0"], "--sharpen-t 0.0 must be x > 0"),
        (["--save-every", "0"], "--save-every 0 must be x >= 1"),
        (["--lr", "-1"], "--lr -1.0 must be x > 0"),
        (["--lr", "nan"], "--lr nan must be a finite number"),
        (["--lr", "inf"], "--lr inf must be a finite number"),
        (["--queue-size", "0"], "--queue-size 0 must be x >= 1"),
        (["--gmm-history", "0"], "--gmm-history 0 must be x >= 1"),
        (["--method", "nope"], "--method 'nope' is unknown; choose one of: coreg, ce, kd"),
        (["--contrast", "x"], "--contrast 'x' is unknown; choose one of: noisy, supcon"),
    ],
)
def test_bad_train_options_are_refused_before_any_work(tmp_path, args, needle, monkeypatch):
    import pipeline.schema

    def no_data(*a, **k):
        raise AssertionError("options must be checked before the data is read")

    monkeypatch.setattr(pipeline.schema, "load_annotated", no_data)
    r = train(tmp_path / "missing", tmp_path / "m", "--epochs", "3", *args)
    one_line_error(r, needle)
    assert not (tmp_path / "m").exists()


def test_help_shows_choices_ranges_and_a_line_for_every_option():
    import dataclasses

    from pipeline.config import AnnotateConfig, EvaluateConfig, PredictConfig, TrainConfig, describe

    r = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "300"})
    assert r.exit_code == 0
    assert "(one of: coreg, ce, kd, proden, cc, cr_dpll, pico, alim, dividemix)" in r.output
    assert "(0 <= x <= 1)" in r.output and "(x > 0)" in r.output
    for title in ("Data", "Model", "Schedule", "Co-Reg", "Baselines", "System"):
        assert f"─ {title} " in r.output, title
    for cls in (AnnotateConfig, TrainConfig, EvaluateConfig, PredictConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help line"
    f = {x.name: x for x in dataclasses.fields(TrainConfig)}
    assert describe(f["lr"]) == "(x > 0)" and describe(f["k_views"]) == "(x >= 1)"


def test_fields_without_a_declaration_stay_valid():
    """Other code adds fields with plain `_f(default, help)`: they need no declaration and pass the check."""
    from dataclasses import dataclass

    from pipeline.config import _f, check, describe

    @dataclass(frozen=True)
    class Cfg:
        a: str = _f("x", "free text")
        b: int = _f(-5, "any integer")
        c: float = _f(0.5, "a fraction", range=(0, 1))

    check(Cfg())
    assert describe(Cfg.__dataclass_fields__["a"]) == ""
    from pipeline.errors import CoregError

    with pytest.raises(CoregError, match="--c 2 must be 0 <= x <= 1"):
        check(Cfg(c=2))


def test_run_checks_every_stage_before_annotating(tmp_path, monkeypatch):
    import stages.annotate
    from tests.tiny import make_image_folder

    def no_annotation(cfg):
        raise AssertionError("annotation must not start")

    monkeypatch.setattr(stages.annotate, "run", no_annotation)
    img = make_image_folder(tmp_path / "img", n_per_class=2)
    base = ["run", str(img), str(tmp_path / "out"), "--annotator", "synthetic"]
    for args, needle in [
        (["--k-views", "0"], "--k-views 0"),
        (["--arch", "resnet9000"], "--arch 'resnet9000' is unknown"),
        (["--overrule-sheet", "-1"], "--overrule-sheet -1 must be x >= 0"),
        (["--annotate-batch-size", "0"], "--annotate-batch-size 0 must be x >= 1"),
        (["--batch-size", "0"], "--batch-size 0 must be x >= 1"),
        (["--warmup-epochs", "9", "--epochs", "3"], "--warmup-epochs 9 is longer"),
    ]:
        one_line_error(runner.invoke(app, [*base, *args]), needle)


# --- resume: refuse only the changes that would change the epochs already run ----------------------------


def test_resume_may_change_what_the_epochs_so_far_did_not_use(ann, tmp_path):
    import torch
    from safetensors.torch import load_file

    # Co-Reg in its warm-up: options read only after the warm-up may change, and the resumed run equals an
    # uninterrupted run with the new values. --warmup-epochs too, where the warm-up does not read it
    # (`vlm-hard`; the default `vlm-hard-net` ramps the network's weight over it: refused, below).
    a, b = tmp_path / "a", tmp_path / "b"
    assert train(ann, a, "--epochs", "2", "--warmup-epochs", "2", "--warmup-loss", "vlm-hard").exit_code == 0
    d = tmp_path / "d"  # the default warm-up loss: the ramp of the epochs already run would change
    assert train(ann, d, "--epochs", "2", "--warmup-epochs", "2").exit_code == 0
    one_line_error(train(ann, d, "--epochs", "4", "--resume", "--warmup-epochs", "3"), "--warmup-epochs 2 -> 3")
    new = ["--mixup-alpha", "2", "--p-threshold", "0.6", "--k-views", "1", "--warmup-epochs", "3", "--warmup-loss", "vlm-hard"]
    r = train(ann, a, "--epochs", "4", "--resume", *new)
    assert r.exit_code == 0, r.output
    assert train(ann, b, "--epochs", "4", *new).exit_code == 0
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wb)
    # after the warm-up they shaped the result: refused, naming them
    r = train(ann, a, "--epochs", "5", "--resume", *new[4:], "--mixup-alpha", "3", "--p-threshold", "0.7")
    line = one_line_error(r, "--mixup-alpha 2.0 -> 3.0", "--p-threshold 0.6 -> 0.7")
    assert "--k-views" not in line
    # an option only another method reads may change; one of this method may not
    c = tmp_path / "c"
    assert train(ann, c, "--method", "kd", "--epochs", "1").exit_code == 0
    assert train(ann, c, "--method", "kd", "--epochs", "2", "--resume", "--pico-loss-weight", "0.9").exit_code == 0
    one_line_error(train(ann, c, "--method", "kd", "--epochs", "3", "--resume", "--kd-t", "2"), "--kd-t 1.0 -> 2.0")
    one_line_error(train(ann, c, "--method", "kd", "--epochs", "3", "--resume", "--lr", "0.5"), "--lr 0.01 -> 0.5")


# --- symbolic links in the image folder: each real file once ---------------------------------------------


def test_symlink_loop_and_alias_visit_each_real_file_once(tmp_path, capsys):
    import os

    from pipeline.images import discover
    from tests.tiny import make_image_folder

    img = make_image_folder(tmp_path / "img", classes=("cat", "dog"), n_per_class=3)
    os.symlink("..", img / "cat" / "up")  # a loop: img/cat/up/cat/up/...
    os.symlink("../dog", img / "cat" / "dogs")  # an alias of another class folder
    os.symlink("0000.png", img / "dog" / "again.png")  # a second name for one image
    outside = make_image_folder(tmp_path / "extra", classes=("more",), n_per_class=2)
    os.symlink(outside / "more", img / "cat" / "more")  # a link out of the tree is followed
    layout = discover(img)
    err = capsys.readouterr().err
    rows = [(p.relative_to(img).as_posix(), label) for split in layout.splits.values() for p, label in split]
    assert len(rows) == 3 + 3 + 2, rows
    assert sorted(p for p, label in rows if layout.classes[label] == "dog") == ["dog/0000.png", "dog/0001.png", "dog/0002.png"]
    assert "skipped 3 symbolic link(s)" in err and err.count("\n") == 1


# --- memory: refuse an image size that cannot fit, before decoding ----------------------------------------


def test_image_size_too_large_for_memory_is_refused_before_decoding(ann, tmp_path, monkeypatch):
    import pipeline.data
    import stages.train_checks

    monkeypatch.setattr(stages.train_checks, "available_memory", lambda gpu: 2**30)  # 1 GiB free

    def no_decoding(*a, **k):
        raise AssertionError("must refuse before decoding")

    monkeypatch.setattr(pipeline.data, "decode_images", no_decoding)
    line = one_line_error(train(ann, tmp_path / "m", "--epochs", "1", "--image-size", "5000"), "--image-size 5000")
    assert "GiB" in line and "1.0 GiB of memory is free" in line
    fits = int(line.split("use --image-size ")[1].split()[0])
    assert 8 <= fits <= 224
    assert stages.train_checks.check_memory(fits, 24, 0, 8, fits, gpu=False) is None  # the suggestion does fit


# --- export without the optional onnx packages ------------------------------------------------------------


def test_export_without_onnx_names_the_extra(tmp_path, monkeypatch):
    import importlib.util

    from pipeline.model_io import save_model
    from tests.test_model_io import model_config, student_weights

    cfg = model_config()
    save_model(tmp_path / "model", weights=student_weights(cfg, seed=1), config=cfg)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("onnx") else real(name, *a))
    r = runner.invoke(app, ["export", str(tmp_path / "model"), "--format", "onnx"])
    one_line_error(r, 'pip install -e ".[export]"', "onnx and onnxruntime")
    assert not (tmp_path / "model" / "model.onnx").exists()


# --- the printed loss shows its terms (the warm-up total is often negative) -----------------------------


def test_epoch_line_shows_the_loss_terms():
    from stages.train_log import summary

    warm = {"epoch": 0, "net1/loss": -0.127, "net1/partial_ce": 0.949, "net1/neg_entropy": -1.076, "epoch_seconds": 0.1}
    assert "net1/loss=-0.1270 = partial_ce 0.9490 + neg_entropy -1.0760" in summary(warm, 3)
    main = {"epoch": 1, "net1/loss": 1.14, "net1/l_x": 1.1, "net1/l_u": 0.01, "net1/proto": 0.8, "epoch_seconds": 1.0}
    assert "net1/loss=1.1400 (l_x 1.1000, l_u 0.0100, proto 0.8000)" in summary(main, 3)
    one = {"epoch": 0, "net1/loss": 0.07, "net1/ce": 1.15, "epoch_seconds": 0.1}
    assert "net1/loss=0.0700 = ce 1.1500 + other terms -1.0800" in summary(one, 3)
    assert "net1/loss=0.5000  " in summary({"epoch": 0, "net1/loss": 0.5, "epoch_seconds": 0.1}, 3)


# --- Ctrl-C: one instruction, and one that works for that command ---------------------------------------


def test_ctrl_c_says_one_thing_that_works(tmp_path, monkeypatch):
    import stages.run
    import stages.train

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages.train, "run", interrupted)
    r = runner.invoke(app, ["train", str(tmp_path / "a"), str(tmp_path / "m")])
    assert r.exit_code == 130
    assert "run the same command with --resume" in r.output and "again to continue" not in r.output
    monkeypatch.setattr(stages.run, "run", interrupted)
    r = runner.invoke(app, ["run", str(tmp_path / "img"), str(tmp_path / "o")])
    assert r.exit_code == 130
    assert "run the same command again to continue" in r.output and "--resume" not in r.output


def test_run_has_no_ignored_resume_option():
    r = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "300"})
    assert r.exit_code == 0 and "--resume" not in r.output and "--epochs" in r.output
    assert "OUT/annotated, OUT/model, OUT/report" in r.output


def test_every_option_and_argument_of_every_command_has_a_help_line():
    import typer.main

    group = typer.main.get_command(app)
    for name, cmd in group.commands.items():
        for p in cmd.params:
            if p.name != "help":
                assert getattr(p, "help", None), f"coreg {name}: {p.name} has no help line"
        assert cmd.params, name


# --- a very large image: one warning line naming the file --------------------------------------------------


def test_decompression_bomb_warning_is_one_line_naming_the_file(tmp_path, monkeypatch):
    from PIL import Image

    from tests.tiny import make_image_folder

    img = make_image_folder(tmp_path / "img", classes=("cat", "dog"), n_per_class=2, size=32)
    import warnings

    from pipeline.messages import install

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 32 x 32 = 1024 px: over the limit, under 2x (an error)
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # pytest records warnings: restore after
    monkeypatch.setattr(warnings, "filters", list(warnings.filters))
    install()  # as the CLI does at import, here inside pytest's own warning capture
    r = runner.invoke(app, ["annotate", str(img), str(tmp_path / "out"), "--annotator", "synthetic", "--num-workers", "2"])
    assert r.exit_code == 0, r.output
    lines = [x for x in r.output.splitlines() if "very large image" in x]
    assert len(lines) == 4, r.output
    assert any(f"warning: {img / 'cat' / '0000.png'}: a very large image (1,024 pixels" in x for x in lines), lines
    assert "DecompressionBombWarning" not in r.output and "decompression bomb" not in r.output


# --- default CLIP / LLaVA without network: fast, one line, the whole cause, how to pass local weights -----


LONG = "Failed to download weights: " + " ".join(f"word{i}" for i in range(80)) + "\nsecond line ends here"


def _no_network(monkeypatch):
    """A machine without network: offline mode unset, the probe's connection fails."""
    import socket

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)

    def refuse(*a, **k):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(socket, "create_connection", refuse)
    return constants


def test_default_clip_without_network_fails_at_once_in_one_line(tmp_path, monkeypatch):
    import logging

    import open_clip

    from tests.tiny import make_image_folder

    constants = _no_network(monkeypatch)
    seen = {}

    def load(*a, **k):
        seen["offline"] = constants.HF_HUB_OFFLINE  # the load ran cache-only: no retries
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 8s [Retry 5/5].")
        raise RuntimeError(LONG)

    monkeypatch.setattr(open_clip, "create_model_and_transforms", load)
    img = make_image_folder(tmp_path / "img", classes=("cat", "dog"), n_per_class=1)
    r = runner.invoke(app, ["annotate", str(img), str(tmp_path / "out")])
    line = one_line_error(r, "huggingface.co cannot be reached", "--pretrained /path/to/", "HF_HUB_OFFLINE=1")
    assert " ".join(LONG.split()) in line  # the cause whole, not cut mid-word
    assert seen["offline"] is True and constants.HF_HUB_OFFLINE is False  # restored after the load
    assert "Retrying" not in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_default_llava_without_network_fails_at_once_in_one_line(tmp_path, monkeypatch):
    import transformers

    from annotators.llava import LlavaAnnotator
    from pipeline.errors import CoregError

    _no_network(monkeypatch)

    def load(*a, **k):
        raise OSError(LONG)

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", load)
    with pytest.raises(CoregError) as e:
        LlavaAnnotator.from_pretrained("", classes=["cat", "dog"], questions=["what is it? {}"], device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and "cannot be reached" in msg and "--model /path/to/folder" in msg
    assert " ".join(LONG.split()) in msg


def test_a_non_finite_model_is_refused_where_it_is_loaded(tmp_path):
    import torch

    from pipeline.model_io import save_model
    from tests.test_model_io import model_config, student_weights

    cfg = model_config()
    w = student_weights(cfg, seed=1)
    k = next(k for k, v in w.items() if v.is_floating_point())
    w[k] = torch.full_like(w[k], float("nan"))
    save_model(tmp_path / "model", weights=w, config=cfg)  # as a diverged run on an older version wrote it
    img = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (16, 16)).save(img)
    one_line_error(runner.invoke(app, ["predict", str(tmp_path / "model"), str(img)]), "NaN or infinite", k)
