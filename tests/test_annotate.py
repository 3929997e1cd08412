"""`coreg annotate` end to end with a tiny random open_clip model (local-dir:), through the real CLI."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
from typer.testing import CliRunner

from annotators.templates import load_templates
from pipeline.schema import features, load_annotated
from stages.cli import app
from tests.tiny import make_image_folder, make_tiny_clip

runner = CliRunner()
FAST = ["--shard-size", "5", "--batch-size", "4", "--num-workers", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = make_image_folder(tmp_path_factory.mktemp("img"), n_per_class=4, split=("train", "test"), fmt="jpg")
    (root / "train" / "cat" / "broken.jpg").write_bytes((root / "train" / "cat" / "0000.jpg").read_bytes()[:100])
    (root / "train" / "dog" / "junk.png").write_bytes(b"not a picture")
    return root


def annotate(*args):
    r = runner.invoke(app, ["annotate", *map(str, args)])
    return r, r.output  # stdout and stderr, interleaved


def table(path):
    dsd = datasets.load_from_disk(str(path))
    return {s: ds.remove_columns("image").to_dict() | {"image": [x["bytes"] for x in ds.cast_column("image", datasets.Image(decode=False))["image"]]} for s, ds in dsd.items()}


def test_cli_writes_the_contract(tmp_path, images, clip_model):
    out = tmp_path / "ann"
    r, text = annotate(images, out, "--model", clip_model, *FAST)
    assert r.exit_code == 0, text
    dsd, classes = load_annotated(out, stage="test")  # the contract's own validator accepts it
    assert classes == ["bird", "cat", "dog"] and set(dsd) == {"train", "test"}
    n_templates = len(load_templates("paper27"))
    for ds in dsd.values():
        assert len(ds) == 12
        for name, feat in features(classes).items():
            assert ds.features[name] == feat
        probs = np.array(ds["vlm_probs"])
        assert probs.shape == (12, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
        assert ds["vlm_pred"] == probs.argmax(1).tolist()
        votes = np.array(ds["votes"])
        assert votes.shape == (12, n_templates) and votes.min() >= 0 and votes.max() < 3
        for cand, v in zip(ds["candidates"], votes, strict=True):  # the paper's rule: union of the votes
            assert cand == sorted(set(v.tolist()))
        assert ds["label"] == [0] * 4 + [1] * 4 + [2] * 4 and ds["path"][0] == "bird/0000.jpg"
        assert ds[0]["image"].size == (32, 32)
    info = json.loads((out / "annotation.json").read_text())
    assert info["annotator"] == "clip" and info["model"] == clip_model and info["candidate_rule"] == "union"
    assert info["images_per_second"] > 0 and info["parameters"] > 0 and info["prompts"] == load_templates("paper27")
    assert info["skipped"] == 2 and sorted(info["skipped_files"]) == ["train/cat/broken.jpg", "train/dog/junk.png"]
    train = info["stats"]["train"]
    rows = dsd["train"]
    covered = np.mean([y in c for y, c in zip(rows["label"], rows["candidates"], strict=True)])
    assert train["coverage"] == pytest.approx(covered) and train["eta"] == pytest.approx(1 - covered)
    assert train["zero_shot_accuracy"] == pytest.approx(np.mean(np.array(rows["vlm_pred"]) == np.array(rows["label"])))
    assert train["mean_candidates"] == pytest.approx(np.mean([len(c) for c in rows["candidates"]]))
    votes = np.array(rows["votes"])
    assert train["template_accuracy"] == pytest.approx((votes == np.array(rows["label"])[:, None]).mean(0).tolist())
    assert {"torch", "open_clip_torch", "datasets"} <= set(info["versions"])
    assert not (out / ".coreg-partial").exists()

    r, text = annotate(images, out, "--model", clip_model, *FAST)  # same command again: nothing to redo
    assert r.exit_code == 0 and "already annotated" in text


def test_other_rules_and_unlabeled_folder(tmp_path, clip_model):
    img = make_image_folder(tmp_path / "img", classes=("a", "b", "c", "d"), n_per_class=2)
    r, text = annotate(img / "a", tmp_path / "out", "--model", clip_model, "--classes", "red,green,blue", "--candidates", "topk:2", *FAST)
    assert r.exit_code == 0, text
    ds = datasets.load_from_disk(str(tmp_path / "out"))["train"]
    assert ds["label"] == [-1, -1] and all(len(c) == 2 for c in ds["candidates"])
    assert ds.features["label"].names == ["red", "green", "blue"]
    info = json.loads((tmp_path / "out" / "annotation.json").read_text())
    assert info["stats"]["train"]["zero_shot_accuracy"] is None and info["labeled"] == {"train": False}


class Interrupt(KeyboardInterrupt):
    pass


def test_resume_after_interrupt_matches_an_uninterrupted_run(tmp_path, images, clip_model, monkeypatch):
    from annotators.clip import ClipAnnotator
    from pipeline.shards import ShardStore

    full = tmp_path / "full"
    assert annotate(images, full, "--model", clip_model, *FAST)[0].exit_code == 0

    calls = []
    score = ClipAnnotator.score
    monkeypatch.setattr(ClipAnnotator, "score", lambda self, items: calls.append(len(items)) or score(self, items))
    write = ShardStore.write

    def write_then_die(self, split, i, *a, **k):
        write(self, split, i, *a, **k)
        if len(list(self.root.glob("*/shard-*"))) == 2:
            raise Interrupt

    out = tmp_path / "resumed"
    monkeypatch.setattr(ShardStore, "write", write_then_die)
    r, text = annotate(images, out, "--model", clip_model, *FAST)
    assert r.exit_code == 130 and "run the same command again" in text
    assert not (out / "dataset_dict.json").exists()
    first = sum(calls)
    partial = next((out / ".coreg-partial").iterdir())
    (partial / "train" / ".tmp-shard-00002-999").mkdir()  # a half-written shard left by kill -9

    assert (partial / "clip-text.safetensors").is_file()  # the prompts' embeddings are kept for the resume

    def no_encoding(self):
        raise AssertionError("the resumed run encoded the prompts again")

    monkeypatch.setattr(ClipAnnotator, "_text_classifier", no_encoding)
    monkeypatch.setattr(ShardStore, "write", write)
    calls.clear()
    r, text = annotate(images, out, "--model", clip_model, *FAST)
    assert r.exit_code == 0, text
    assert not (out / ".coreg-partial").exists() or not any((out / ".coreg-partial").iterdir())
    assert first + sum(calls) == 24  # every readable image scored exactly once over both runs
    assert first == 9  # two finished shards of 5 files, one of them unreadable: not scored again
    assert table(out) == table(full)
    assert json.loads((out / "annotation.json").read_text())["stats"] == json.loads((full / "annotation.json").read_text())["stats"]


def test_changed_settings_never_reuse_stale_shards(tmp_path, images, clip_model, monkeypatch):
    from pipeline.shards import ShardStore

    out = tmp_path / "ann"
    write = ShardStore.write

    def die_after_first(self, *a, **k):
        write(self, *a, **k)
        raise Interrupt

    monkeypatch.setattr(ShardStore, "write", die_after_first)
    assert annotate(images, out, "--model", clip_model, *FAST)[0].exit_code == 130
    monkeypatch.setattr(ShardStore, "write", write)
    r, text = annotate(images, out, "--model", clip_model, "--candidates", "topk:1", *FAST)
    assert r.exit_code == 0, text
    ds = datasets.load_from_disk(str(out))
    assert all(len(c) == 1 for s in ds for c in ds[s]["candidates"])  # no union-rule shard survived
    assert len(list((out).glob(".coreg-partial/*"))) == 0
    r, text = annotate(images, out, "--model", clip_model, "--templates", "imagenet80", *FAST)  # done, but other prompts
    assert r.exit_code == 0 and "already annotated" not in text
    assert len(datasets.load_from_disk(str(out))["train"][0]["votes"]) == 80


@pytest.mark.parametrize(
    "args, match",
    [
        (["{missing}", "{out}"], "folder not found"),
        (["{img}", "{out}", "--annotator", "blip"], "--annotator 'blip'"),
        (["{img}", "{out}", "--candidates", "top:2"], "--candidates"),
        (["{img}", "{out}", "--candidates", "topk:9"], "--candidates"),
        (["{img}", "{out}", "--device", "tpu9"], "--device"),
        (["{img}", "{out}", "--templates", "nope"], "--templates"),
        (["{img}", "{out}", "--pretrained", "openai"], "no effect"),
        (["{img}", "{other}"], "holds other things"),
        (["{img}", "{file}"], "is a file"),
        (["{img}/train/cat", "{out}"], "outside class sub-folders"),
        (["{img}", "{out}", "--model", "ViT-Nope-1"], "not an open_clip model"),
        (["{img}", "{out}", "--shard-size", "0"], "--shard-size"),
    ],
)
def test_bad_inputs_fail_with_one_line(tmp_path, images, clip_model, args, match):
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    (tmp_path / "f.txt").write_text("x")
    fill = {"missing": tmp_path / "nope", "out": tmp_path / "out", "img": images, "other": other, "file": tmp_path / "f.txt"}
    argv = [a.format(**fill) for a in args]
    if "--model" not in argv:
        argv += ["--model", clip_model]
    r, text = annotate(*argv)
    assert r.exit_code == 2, text
    assert match in text and text.startswith("error:") and len(text.strip().splitlines()) == 1
    assert (other / "keep.txt").read_text() == "mine"


def test_decoding_stays_a_bounded_number_of_batches_ahead(tmp_path, clip_model, monkeypatch):
    """Streaming: when the model gets batch k, at most PREFETCH_BATCHES further batches have been read."""
    import stages.annotate as stage
    from annotators.clip import ClipAnnotator

    img = make_image_folder(tmp_path / "img", n_per_class=8)  # 24 images, one shard, 6 batches of 4
    reads, at_score = [], []
    read = stage.read_image
    monkeypatch.setattr(stage, "read_image", lambda p, **k: reads.append(p) or read(p, **k))
    score = ClipAnnotator.score
    monkeypatch.setattr(ClipAnnotator, "score", lambda self, items: at_score.append(len(reads)) or score(self, items))
    r, text = annotate(img, tmp_path / "out", "--model", clip_model, "--batch-size", "4", "--shard-size", "100", "--num-workers", "2")
    assert r.exit_code == 0, text
    assert len(at_score) == 6 and len(reads) == 24
    for k, n in enumerate(at_score):
        assert n <= (k + 1 + stage.PREFETCH_BATCHES) * 4


def test_resume_after_kill_9(tmp_path, clip_model, monkeypatch):
    """A real SIGKILL mid-run: the next run redoes only the missing shards and ends identical."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from annotators.clip import ClipAnnotator

    img = make_image_folder(tmp_path / "img", n_per_class=20)  # 60 images, 30 shards of 2
    args = [str(img), "", "--model", clip_model, "--shard-size", "2", "--batch-size", "2", "--num-workers", "1", "--device", "cpu"]
    out = tmp_path / "killed"
    args[1] = str(out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "stages.cli", "annotate", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list(out.glob(".coreg-partial/*/train/shard-*"))) < 3:
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "dataset_dict.json").exists(), "killed too late: the run had already finished"
    done = len(list(out.glob(".coreg-partial/*/train/shard-*")))

    calls = []
    score = ClipAnnotator.score
    monkeypatch.setattr(ClipAnnotator, "score", lambda self, items: calls.append(len(items)) or score(self, items))
    r, text = annotate(*args)
    assert r.exit_code == 0, text
    assert sum(calls) == 60 - 2 * done
    args[1] = str(tmp_path / "full")
    assert annotate(*args)[0].exit_code == 0
    assert table(out) == table(tmp_path / "full")


def test_builtin_name_with_a_local_weights_file(tmp_path, clip_model, images):
    """`--model NAME --pretrained FILE`: registered architecture + weights file, the offline path for real CLIPs."""
    import open_clip

    from tests.tiny import tiny_clip_config

    local = clip_model.removeprefix("local-dir:")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "coreg-tiny-test.json").write_text(json.dumps(tiny_clip_config()["model_cfg"]))
    open_clip.add_model_config(tmp_path / "cfg")  # now a built-in name, like ViT-B-32
    weights = f"{local}/open_clip_model.safetensors"
    r, text = annotate(images, tmp_path / "a", "--model", "coreg-tiny-test", "--pretrained", weights, *FAST)
    assert r.exit_code == 0, text
    same = annotate(images, tmp_path / "b", "--model", clip_model, *FAST)[0]
    assert same.exit_code == 0 and table(tmp_path / "a") == table(tmp_path / "b")  # same weights, same rows
    assert json.loads((tmp_path / "a" / "annotation.json").read_text())["pretrained"] == weights
    r, text = annotate(images, tmp_path / "c", "--model", "coreg-tiny-test", *FAST)
    assert r.exit_code == 2 and "give --pretrained" in text
    r, text = annotate(images, tmp_path / "c", "--model", "coreg-tiny-test", "--pretrained", "laion9b", *FAST)
    assert r.exit_code == 2 and "neither a file nor a tag" in text


def test_clip_text_cache_is_reused_only_when_it_fits(tmp_path, clip_model):
    import torch
    from safetensors.torch import load_file, save_file

    from annotators.clip import ClipAnnotator

    cache = tmp_path / "text.safetensors"
    kw = dict(classes=["cat", "dog", "bird"], templates=["a photo of a {}", "a {}"], device="cpu")
    a = ClipAnnotator.from_pretrained(clip_model, **kw, text_cache=cache)
    assert cache.is_file() and torch.equal(load_file(str(cache))["text"], a.text)
    b = ClipAnnotator.from_pretrained(clip_model, **kw, text_cache=cache)
    assert torch.equal(a.text, b.text)
    save_file({"text": torch.zeros(5, 3, a.text.shape[2])}, str(cache))  # another prompt list: not reused
    c = ClipAnnotator.from_pretrained(clip_model, **kw, text_cache=cache)
    assert torch.equal(c.text, a.text) and load_file(str(cache))["text"].shape == a.text.shape
