"""How close does `coreg annotate` get to the bare speed of its model?

Builds a full-size CLIP ViT-B-32 with random weights (open_clip, no download: the compute is that of the
real model), then on the same few hundred images measures
  floor     model.encode_image on pre-made, pre-normalised batches (nothing else),
  loop      the stage's own shard loop (stages.annotate._annotate_shard: read + decode + per-image resize in
            threads, batch normalisation, encode_image, text scores, candidate rule, dataset rows), i.e. what
            the progress bar shows,
  stage     the whole `stages.annotate.run` with this model injected (adds the folder scan, shard writes,
            merge, annotation.json) for reference; the one-off text embeddings are timed on their own.
The floor is measured before and after the loop and averaged, to damp drift from other load on the machine.

    python bench/annotate_speed.py [DATA] [--n 320] [--batch-size 32] [--write bench/results/annotate_speed.md]

`--model local-dir:PATH` times another open_clip model instead (tests/test_bench_smoke.py runs a tiny one).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class _Bar:
    def update(self, n):
        pass


def pick_images(data: Path, n: int) -> tuple[list[tuple[Path, int]], Path, list[str]]:
    from pipeline.images import discover

    layout = discover(data)
    split = "test" if "test" in layout.splits else "train"
    rows = layout.splits[split]
    step = max(1, len(rows) // n)
    return rows[::step][:n], layout.roots[split], layout.classes


def floor_speed(model, batches) -> float:
    import torch

    with torch.inference_mode():
        model.encode_image(batches[0])  # warm-up: allocator, kernel choice
        t0 = time.perf_counter()
        for x in batches:
            model.encode_image(x)
        return sum(len(x) for x in batches) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", nargs="?", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    ap.add_argument("--n", type=int, default=320)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="ViT-B-32", help="open_clip model name (random weights) or local-dir:PATH")
    ap.add_argument("--write", default=None, help="also write the table to this markdown file")
    args = ap.parse_args()

    import open_clip
    import torch

    import stages.annotate as stage
    from annotators.candidates import Rule
    from annotators.clip import ClipAnnotator
    from annotators.templates import load_templates
    from pipeline.config import AnnotateConfig

    load0 = os.getloadavg()[0]
    # Absolute paths: the stage run below symlinks these files from a temporary folder, and a relative
    # target (e.g. DATA = ../shared/data/cifar10) would resolve against the link's folder, not the cwd.
    rows, root, classes = pick_images(Path(args.data).resolve(), args.n)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(args.model, pretrained=None)  # random weights
    tokenizer = open_clip.get_tokenizer(args.model)
    t0 = time.perf_counter()
    ann = ClipAnnotator(model, preprocess, tokenizer, classes=classes, templates=load_templates("paper27"), device=args.device, model_name=args.model)
    text_s = time.perf_counter() - t0

    # pre-made batches for the floor: the exact tensors the model sees, prepared outside the timing
    from pipeline.images import load_rgb

    pre = [ann.pixels([ann.prepare(load_rgb(p)) for p, _ in rows[i : i + args.batch_size]]) for i in range(0, len(rows), args.batch_size)]
    floor_before = floor_speed(ann.model, pre)

    def loop_once() -> float:
        with ThreadPoolExecutor(args.num_workers) as pool:
            t0 = time.perf_counter()
            stage._annotate_shard(rows, root, 0, annotator=ann, synthetic=None, rule=Rule("union"), batch_size=args.batch_size, pool=pool, bar=_Bar())
            return len(rows) / (time.perf_counter() - t0)

    loop_once_warm = loop_once()  # first pass warms the page cache and the thread pool's first decode
    loop = loop_once()
    floor_after = floor_speed(ann.model, pre)
    floor = (floor_before + floor_after) / 2

    # the whole stage, with the same model object injected in place of from_pretrained
    # Whatever the stage passes (config, classes, process state, text cache...), it gets this model.
    stage._build_annotator = lambda *args, **kwargs: ann
    with tempfile.TemporaryDirectory() as tmp:
        img_dir = Path(tmp) / "img"
        for p, y in rows:
            dst = img_dir / classes[y] / p.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(p, dst)
        t0 = time.perf_counter()
        stage.run(AnnotateConfig(images=str(img_dir), out=str(Path(tmp) / "out"), batch_size=args.batch_size, num_workers=args.num_workers, device=args.device))
        stage_s = time.perf_counter() - t0
    load1 = os.getloadavg()[0]

    lines = [
        "| measure | images/s | note |",
        "| --- | ---: | --- |",
        f"| floor: bare `encode_image`, pre-made batches | {floor:.1f} | before {floor_before:.1f}, after {floor_after:.1f} |",
        f"| annotate loop (read, decode, resize, model, rule, rows) | {loop:.1f} | first (cold) pass {loop_once_warm:.1f} |",
        f"| **loop / floor** | **{loop / floor:.1%}** | goal >= 80% |",
        f"| whole `coreg annotate` stage, {len(rows)} images | {len(rows) / stage_s:.1f} | {stage_s:.1f} s: scan, loop, shard writes, merge, annotation.json |",
        f"| once per run: text embeddings | - | {text_s:.1f} s for 27 templates x {len(classes)} classes (not in the rows above) |",
        "",
        f"{args.model} (random weights, {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters), device {args.device}, "
        f"batch {args.batch_size}, {args.num_workers} decode threads, torch threads {torch.get_num_threads()}, "
        f"{os.cpu_count()} CPUs, {len(rows)} images from {Path(args.data).name} ({root.name}), "
        f"load average {load0:.1f} at start / {load1:.1f} at end (other jobs share the machine), "
        f"torch {torch.__version__}, open_clip {open_clip.__version__}, Python {platform.python_version()}.",
    ]
    table = "\n".join(lines)
    print(table)
    if args.write:
        Path(args.write).write_text("# `coreg annotate` speed vs the bare model\n\nCommand: `python bench/annotate_speed.py "
                                    + " ".join(sys.argv[1:]) + "`\n\n" + table + "\n")


if __name__ == "__main__":
    main()
