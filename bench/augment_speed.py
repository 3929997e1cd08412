"""How expensive are decoding and batch augmentation next to the student's own forward/backward pass?

    python bench/augment_speed.py [--device cpu|cuda] [--threads 1] [--batch 512] [--size 32] [--results FILE]

Decodes the CIFAR-10 test images (10,000 JPEGs, /work/shared/data/cifar10/test by default) with
`decode_images`, then times on one batch: weak and strong augmentation (`BatchAugment`; strong also with
RandAugment's two implementations forced: rows grouped by op, which reads the per-op counts on the host, and
masked, every op on every row with no host read, the default off the CPU) and one forward+backward pass of
`small_cnn` and `preact_resnet18`. Appends a table to
bench/results/augment_speed.md (`--results FILE` elsewhere, `--results ""` nowhere). Milliseconds are the median of several repeats after one warm-up.
"""

from __future__ import annotations

import argparse
import glob
import platform
import statistics
import time
from pathlib import Path

import torch

from pipeline.augment import BatchAugment
from pipeline.data import channel_stats, decode_images
from pipeline.networks import build_student

RESULTS = Path(__file__).parent / "results" / "augment_speed.md"


def _ms(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels, lazy init
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="/work/shared/data/cifar10/test")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--results", default=str(RESULTS), help='markdown file the table is appended to; "" = print only')
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from datasets import Dataset, Image

    paths = sorted(glob.glob(f"{args.data}/*/*.jpg"))
    ds = Dataset.from_dict({"image": [{"bytes": Path(p).read_bytes(), "path": None} for p in paths]})
    ds = ds.cast_column("image", Image())
    t = time.perf_counter()
    images = decode_images(ds, size=args.size, num_workers=2, progress=False)  # (N, 3, S, S) uint8
    decode_s = time.perf_counter() - t
    mean, std = channel_stats(images)

    x = images[: args.batch].to(device)  # (B, 3, S, S) uint8
    aug = BatchAugment(image_size=args.size, mean=mean, std=std)
    g = torch.Generator(device=device).manual_seed(0)
    grouped, masked = (BatchAugment(image_size=args.size, mean=mean, std=std, group_ops=v) for v in (True, False))
    rows = [
        ("weak augmentation", _ms(lambda: aug.weak(x, g), device, args.repeats)),
        ("strong augmentation", _ms(lambda: aug.strong(x, g), device, args.repeats)),
        ("strong, ops grouped (host read)", _ms(lambda: grouped.strong(x, g), device, args.repeats)),
        ("strong, ops masked (no host read)", _ms(lambda: masked.strong(x, g), device, args.repeats)),
    ]
    xn = aug.normalize(x)
    for arch in ("small_cnn", "preact_resnet18"):
        net = build_student(arch, num_classes=10, image_size=args.size).to(device)

        def step(net=net):
            net.zero_grad(set_to_none=True)
            net(xn, with_embedding=True)[0].logsumexp(1).mean().backward()

        rows.append((f"{arch} forward+backward", _ms(step, device, max(2, args.repeats // 2))))

    ref = dict(rows)["small_cnn forward+backward"]
    lines = [
        f"\n## {args.batch}x3x{args.size}x{args.size}, {device.type}, {args.threads} thread(s), "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}\n",
        f"decode_images: {len(paths)} CIFAR-10 JPEGs in {decode_s:.2f} s (2 threads)\n",
        "| step | ms per batch | vs small_cnn fwd+bwd |",
        "| --- | ---: | ---: |",
        *[f"| {name} | {ms:.1f} | {ms / ref:.1%} |" for name, ms in rows],
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.results:
        return
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    if not results.exists():
        results.write_text("# Augmentation and decoding speed (bench/augment_speed.py)\n")
    with results.open("a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
