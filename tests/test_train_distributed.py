"""Two CPU processes under Accelerate (torchrun-style launch, gloo) train exactly like one process: the same
division (|P|, |U|, mean clean probability) every epoch, the same loss history, and the same weights (up to
float summation order), because every row is drawn from the same counter-based RNG and everything that couples
rows is built on the gathered global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.annotated import make_annotated

ARGS = ["--arch", "small_cnn", "--batch-size", "8", "--warmup-epochs", "1", "--epochs", "3", "--start-cont", "0",
        "--queue-size", "32", "--num-workers", "0", "--cpu"]  # fmt: skip


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, ann, out, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # torchrun sets RANK/WORLD_SIZE; Accelerator(cpu=True) then runs multi-CPU on gloo, as under
    # `accelerate launch` on several machines.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()),
           "-m", "pipeline.cli", "train", str(ann), str(out), *ARGS]  # fmt: skip
    r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"{nproc} process(es)" in r.stdout  # really distributed


def metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_equal_one(tmp_path):
    ann = make_annotated(tmp_path / "ann", n_train=32, n_test=8)
    one, two = tmp_path / "one", tmp_path / "two"
    launch(1, ann, one, tmp_path)
    launch(2, ann, two, tmp_path)
    m1, m2 = metrics(one), metrics(two)
    assert len(m1) == len(m2) == 3
    for a, b in zip(m1, m2, strict=True):
        for k in a:
            if "seconds" in k or k == "images_per_second":
                continue
            if k.endswith(("n_p", "n_u")) or k in ("epoch", "phase"):
                assert a[k] == b[k], (a["epoch"], k)  # the split is identical
            else:
                assert a[k] == pytest.approx(b[k], rel=1e-3, abs=1e-4), (a["epoch"], k, a[k], b[k])
    w1, w2 = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-4, rtol=1e-3), k
