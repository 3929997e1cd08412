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
        "--queue-size", "32", "--num-workers", "0", "--cpu",
        # `rows` (the default) rounds P's share of each batch to a multiple of the process count, so its 1- and
        # 2-process batches can differ by a row; `all` (full P and U batches) splits identically
        "--epoch-steps", "all"]  # fmt: skip


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
           "-m", "stages.cli", "train", str(ann), str(out), *ARGS]  # fmt: skip
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


# --- BatchNorm statistics across processes ---------------------------------------------------------------

WORKER = '''
import json, sys
import torch
from torch import nn
from accelerate import Accelerator
from pipeline.accel import make_dist
from pipeline.coreg.division import division_loss, gmm_clean_prob, minmax, split
from pipeline.training import sync_buffers

sync = sys.argv[2] == "sync"
acc = Accelerator(cpu=True)
dist = make_dist(acc)
torch.manual_seed(0)  # the same initial network on every process, as in coreg train
net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
net.register_buffer("flags", torch.zeros(4, dtype=torch.bool))
net.train()
g = torch.Generator().manual_seed(100 + dist.rank)
for _ in range(3):  # training forwards on each process's own rows: its running statistics drift
    net(torch.randn(6, 5, generator=g) * (1 + dist.rank) + dist.rank)
net.flags[dist.rank] = True
if sync:
    sync_buffers(net, dist)
net.eval()
x = torch.randn(11, 5, generator=torch.Generator().manual_seed(7))  # (N, 5), the same rows everywhere
cand = torch.ones(11, 3, dtype=torch.bool)
cand[::2, 0] = False
with torch.no_grad():
    rows = dist.shard(11)
    probs = dist.gather_shards(net(x[rows.start:rows.stop]).softmax(1), 11)  # (N, 3) the division's view
    alone = net(x).softmax(1)  # what this process's own network would give on every row
w = torch.as_tensor(gmm_clean_prob(minmax(division_loss(probs, cand)).numpy(), seed=0))
p, _ = split(w.float())
out = {"probs": probs.tolist(), "alone": alone.tolist(), "p": p.tolist(),
       "flags": net.flags.tolist(), "mean": net[1].running_mean.tolist()}
json.dump(out, open(f"{sys.argv[1]}/rank{dist.rank}.json", "w"))
'''


def _run_bn_worker(tmp_path, mode):
    script = tmp_path / "bn_worker.py"
    script.write_text(WORKER)
    out = tmp_path / mode
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(script), str(out), mode]  # fmt: skip
    r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [json.loads((out / f"rank{k}.json").read_text()) for k in range(2)]


def test_batchnorm_statistics_are_rank_zeros_before_an_eval_pass(tmp_path):
    r0, r1 = _run_bn_worker(tmp_path, "sync")
    assert r1["mean"] == r0["mean"] and r1["flags"] == r0["flags"] == [True, False, False, False]
    # The gathered eval-mode pass is rank 0's network on every row, so the division is rank 0's alone.
    t = {k: torch.tensor(r0[k]) for k in ("probs", "alone")}
    assert torch.allclose(t["probs"], t["alone"], atol=1e-6) and r1["probs"] == r0["probs"]
    assert torch.allclose(torch.tensor(r1["alone"]), t["alone"], atol=1e-6)
    assert r1["p"] == r0["p"]
    # Without the sync the shards come from two different networks: the test above has teeth.
    n0, n1 = _run_bn_worker(tmp_path, "nosync")
    assert n0["mean"] != n1["mean"]
    assert not torch.allclose(torch.tensor(n0["probs"]), torch.tensor(n0["alone"]), atol=1e-4)


def test_shards_cover_every_row_once_and_gather_back_in_order():
    from pipeline.training import Dist

    for n, world in ((7, 3), (2, 4), (10, 1), (9, 3), (0, 2)):
        shards = [Dist(rank=r, world=world).shard(n) for r in range(world)]
        assert [i for s in shards for i in s] == list(range(n))
        assert all(len(s) <= -(-n // world) for s in shards)
    # gather_shards undoes shard: fake a 3-process gather of each block padded to ceil(7/3) = 3 rows
    x = torch.arange(7.0)
    blocks = [x[s.start : s.stop] for s in (Dist(rank=r, world=3).shard(7) for r in range(3))]
    padded = torch.cat([torch.cat([b, b.new_zeros(3 - b.numel())]) for b in blocks])
    d = Dist(rank=2, world=3, gather=lambda t: padded)
    assert torch.equal(d.gather_shards(blocks[2], 7), x)
