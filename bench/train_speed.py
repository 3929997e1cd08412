"""One Co-Reg epoch through `coreg train` next to its compute floor.

    python bench/train_speed.py [DATA] [--n 2000] [--arch small_cnn] [--batch-size 256] [--threads 2]

DATA is a CIFAR-10 folder with train/<class>/*.jpg (default ../shared/data/cifar10); --n images are taken
evenly from its classes (replicated when --n exceeds what the folder holds, for the GPU setting of 50,000).
Candidate sets come from the paper's synthetic generator (q = 0.03, eta = 0.2): no VLM is needed to time
training.

The run trains 1 warm-up epoch and 1 Co-Reg epoch with the real stage (stages/train.py). While the Co-Reg
epoch runs, every forward call of a student network is recorded (input shape, gradient on/off, embedding
head on/off) with a global forward hook, and every backward. The *floor* replays exactly those forward and
backward passes (plus the optimiser steps) on fresh networks of the same architecture with pre-made input
tensors: no data pipeline, no augmentation, no division, no losses. ratio = pipeline epoch / floor.
Appends the table to bench/results/train_speed.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).parent / "results" / "train_speed.md"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def synthetic_dataset(data: Path, n: int, seed: int = 0, q: float = 0.03, eta: float = 0.2):
    import datasets

    from pipeline.images import scan_images
    from pipeline.schema import features

    classes = sorted(p.name for p in (data / "train").iterdir() if p.is_dir())
    files = {c: scan_images(data / "train" / c) for c in classes}
    rng = np.random.default_rng(seed)
    rows = {k: [] for k in ("image", "path", "label", "trusted", "candidates", "vlm_probs", "vlm_pred")}
    C = len(classes)
    for i in range(n):
        y = i % C
        f = files[classes[y]][(i // C) % len(files[classes[y]])]
        cand = {j for j in range(C) if j != y and rng.random() < q} | {y}
        if rng.random() < eta:  # paper generator: the true label is swapped for a random non-candidate
            others = [j for j in range(C) if j not in cand]
            cand.discard(y)
            cand.add(int(rng.choice(others)))
        cand = sorted(cand)
        rows["image"].append(str(f))
        rows["path"].append(str(f.relative_to(data)))
        rows["label"].append(y)
        rows["trusted"].append(False)
        rows["candidates"].append(cand)
        rows["vlm_probs"].append([1 / len(cand) if j in cand else 0.0 for j in range(C)])
        rows["vlm_pred"].append(cand[0])
    return datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features(classes))}), classes


class Recorder:
    """Records student forward calls and backward calls during one chosen epoch."""

    def __init__(self):
        self.epoch, self.target, self.events = -1, 1, []

    def forward_hook(self, module, args, kwargs, output):
        from pipeline.networks import Student

        if isinstance(module, Student) and self.epoch == self.target:
            x = args[0]
            self.events.append(("f", id(module), tuple(x.shape), torch.is_grad_enabled(), bool(kwargs.get("with_embedding", False) or (len(args) > 1 and args[1]))))


def replay(events, *, arch: str, num_classes: int, size: int, device: torch.device, autocast_dtype) -> float:
    """Run the recorded passes on fresh networks and pre-made tensors; returns seconds."""
    from pipeline.networks import build_student

    nets, opts, inputs = {}, {}, {}
    for e in events:
        if e[0] == "f" and e[1] not in nets:
            nets[e[1]] = build_student(arch, num_classes=num_classes, image_size=size).to(device)
            if device.type == "cuda":
                nets[e[1]].to(memory_format=torch.channels_last)
            opts[e[1]] = torch.optim.SGD(nets[e[1]].parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
        if e[0] == "f" and e[2] not in inputs:
            inputs[e[2]] = torch.randn(e[2], device=device)
    outs = []

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    for e in events:
        if e[0] == "f":
            _, key, shape, grad, emb = e
            with torch.set_grad_enabled(grad), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = nets[key](inputs[shape], with_embedding=emb)
            if grad:
                outs.extend(out if isinstance(out, tuple) else (out,))
        else:  # backward, then the optimiser step of every network that received gradients
            sum(o.float().square().mean() for o in outs).backward()
            outs = []
            for k, net in nets.items():
                if any(p.grad is not None for p in net.parameters()):
                    opts[k].step()
                    opts[k].zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", nargs="?", default=str(DEFAULT_DATA))
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--arch", default="small_cnn")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--repeats", type=int, default=3, help="Co-Reg epochs to time (after 1 warm-up epoch)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import accelerate

    import pipeline.coreg.method as method_mod
    from pipeline.config import TrainConfig
    from stages import train as train_stage

    data = Path(args.data)
    if not (data / "train").is_dir():
        sys.exit(f"error: {data}/train not found; pass the CIFAR-10 folder (train/<class>/*.jpg) as DATA")
    dsd, classes = synthetic_dataset(data, args.n)
    rec = Recorder()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    size = 32
    pairs = []  # (pipeline seconds, floor seconds, events) per Co-Reg epoch, measured back to back
    original_epoch, original_backward = method_mod.CoReg.train_epoch, accelerate.Accelerator.backward

    def train_epoch(self, epoch, ctx):
        rec.epoch, rec.target, rec.events = epoch, epoch, []
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = original_epoch(self, epoch, ctx)
        if device.type == "cuda":
            torch.cuda.synchronize()
        pipe = time.perf_counter() - t0
        if epoch >= 1:  # Co-Reg epochs: replay this epoch's passes right away, so both see the same load
            events, rec.epoch = rec.events, -1
            floor = replay(events, arch=args.arch, num_classes=len(classes), size=size, device=device, autocast_dtype=autocast_dtype)
            pairs.append((pipe, floor, events, out))
        return out

    def backward(self, loss, **kw):
        original_backward(self, loss, **kw)
        if rec.epoch == rec.target:
            rec.events.append(("b",))

    method_mod.CoReg.train_epoch, accelerate.Accelerator.backward = train_epoch, backward
    handle = torch.nn.modules.module.register_module_forward_hook(rec.forward_hook, with_kwargs=True)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(annotated="(in memory)", out=f"{tmp}/model", preset="paper", arch=args.arch, epochs=1 + args.repeats,
                          warmup_epochs=1, batch_size=args.batch_size, cpu=args.cpu, num_workers=2, save_every=1000)  # fmt: skip
        cfg = train_stage.resolve_preset(cfg, n_rows=len(dsd["train"]), quiet=True)  # the paper's Co-Reg epoch
        train_stage.train(cfg, dsd, classes, method_mod)
    handle.remove()
    ratios = sorted(p / f for p, f, _, _ in pairs)
    median = ratios[len(ratios) // 2]
    events = pairs[0][2]
    n_fwd = sum(1 for e in events if e[0] == "f")
    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {args.threads} thread(s)"
    lines = [
        f"\n## {args.arch}, {args.n} images at {size}px, batch {args.batch_size}, {dev}, torch {torch.__version__}, {platform.machine()}\n",
        "Each row: one Co-Reg epoch (both networks) through `coreg train`, then at once its floor: the same "
        f"forward and backward passes ({n_fwd} forwards, {len(events) - n_fwd} backwards in the first epoch) "
        "on pre-made tensors.\n",
        "| Co-Reg epoch | pipeline (s) | floor (s) | ratio | net1 |P| / |U| |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for i, (p, f, _, m) in enumerate(pairs):
        lines.append(f"| {i + 1} | {p:.2f} | {f:.2f} | {p / f:.2f} | {m['net1/n_p']:.0f} / {m['net1/n_u']:.0f} |")
    lines.append(f"\n**median ratio pipeline / floor: {median:.2f}** (goal: at most 1.3)")
    where = "GPU" if device.type == "cuda" else "CPU"  # bench/gpu.sh reads this line to plan its accuracy run
    lines.append(f"\nseconds per Co-Reg epoch on this {where} (median): {sorted(p for p, _, _, _ in pairs)[len(pairs) // 2]:.2f}")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        out.write_text("# Co-Reg epoch speed vs compute floor (bench/train_speed.py)\n")
    with open(out, "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
