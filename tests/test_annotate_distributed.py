"""Two processes (torchrun-style launch, as `accelerate launch` does; gloo on CPU) split the shards between
them, and the merged dataset holds every image exactly once, identical to a one-process run."""

from __future__ import annotations

import os
import subprocess
import sys

import datasets

from pipeline.shards import my_shards
from tests.tiny import make_image_folder, make_tiny_clip


def test_shard_assignment_covers_every_shard_once():
    for n, world in ((1, 1), (7, 2), (3, 4), (10, 3)):
        got = sorted(i for r in range(world) for i in my_shards(n, r, world))
        assert got == list(range(n))


def launch(nproc: int, img, out, model, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(29600 + nproc + os.getpid() % 1000), "-m", "stages.cli", "annotate", str(img), str(out),
           "--model", model, "--shard-size", "3", "--batch-size", "2", "--device", "cpu", "--num-workers", "1"]  # fmt: skip
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def test_two_processes_equal_one(tmp_path):
    img = make_image_folder(tmp_path / "img", n_per_class=5, split=("train", "test"))  # 15 + 15 rows, 5 + 5 shards
    model = make_tiny_clip(tmp_path / "clip")
    launch(1, img, tmp_path / "one", model, tmp_path)
    log = launch(2, img, tmp_path / "two", model, tmp_path)
    assert log.count("annotated ") == 1  # only the main process merges and reports
    one, two = datasets.load_from_disk(str(tmp_path / "one")), datasets.load_from_disk(str(tmp_path / "two"))
    for split in ("train", "test"):
        a, b = one[split].to_dict(), two[split].to_dict()
        assert len(b["path"]) == len(set(b["path"])) == 15  # every image exactly once
        assert a == b
