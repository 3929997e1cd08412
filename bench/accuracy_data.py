"""The images and annotations of bench/accuracy.py: the fixed reported/dev subsets of an image folder, the
instance-dependent annotator written in the stage contract, the synthetic one through `coreg annotate`, and
`cli` (a `coreg` command in a fresh process) that both this file and accuracy.py run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str, threads: int) -> float:
    """Run `coreg ...` in a fresh process (as a user would); returns its wall time in seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}  # fmt: skip
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "stages.cli", *args], cwd=REPO, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"coreg {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0




# ----------------------------------------------------------------------------------------------- data
def class_counts(n: int, n_classes: int, imbalance: float = 1.0) -> list[int]:
    """Images per class (in the sorted class order) for `n` per class at the head: a long tail whose i-th class
    keeps n · imbalance^(−i/(C−1)) images, so the last class has `imbalance` times fewer than the first (the
    profile of the CIFAR-10-LT benchmarks). imbalance 1 = balanced."""
    if imbalance == 1.0 or n_classes < 2:
        return [n] * n_classes
    return [max(1, round(n * imbalance ** (-i / (n_classes - 1)))) for i in range(n_classes)]


def image_folder(data: Path, work: Path, *, train: int, test: int, pool: int, subset: str = "report",
                 imbalance: float = 1.0) -> tuple[Path, Path, list[str]]:  # fmt: skip
    """Symlinked subsets: work/images/{train,test}/<class>/ for the student, work/pool/<class>/ for the
    instance annotator. The subset is fixed (seed 1234), so every seed and method sees the same images.
    `subset="dev"` is the held-out set for choosing defaults: its train and test images are both drawn from the
    training images the reported subset leaves unused (the annotator's pool is the same), so nothing tuned
    on it has seen a reported image. `imbalance` R > 1: the training and test images both follow the long tail
    of `class_counts` (a user's folder and the images the student then meets share their class mix), each
    class's images a prefix of its balanced subset's; the annotator's pool stays balanced (a VLM's knowledge
    does not follow the user's folder)."""
    classes = sorted(p.name for p in (data / "train").iterdir() if p.is_dir())
    keep = {"train": class_counts(train, len(classes), imbalance), "test": class_counts(test, len(classes), imbalance)}
    rng = np.random.default_rng(1234)
    images, pool_dir = work / "images", work / "pool"
    stamp = (f"train={train} test={test} pool={pool} data={data.resolve()}" + ("" if subset == "report" else f" subset={subset}")
             + ("" if imbalance == 1.0 else f" imbalance={imbalance:g}"))  # fmt: skip
    if (images / "done").exists() and (images / "done").read_text() not in ("", stamp):
        raise SystemExit(f"{work} holds another subset ({(images / 'done').read_text()}); use another --work")
    if not (images / "done").exists():
        for split, n in (("train", train), ("test", test)):
            for ci, c in enumerate(classes):
                files = sorted((data / split / c).iterdir())
                order = rng.permutation(len(files))  # drawn for both subsets: the same pool, the same stream
                if split == "test" and subset == "dev":
                    continue
                if subset == "dev":  # train and test from the training images after the reported train + pool
                    rest = order[train + pool :]
                    if len(rest) < train + test:
                        raise SystemExit(f"{data}/train/{c} has {len(files)} images; the dev subset needs {2 * train + pool + test}")
                    picks = {"": rest[: keep["train"][ci]], "pool": order[train : train + pool],
                             "dev-test": rest[train : train + keep["test"][ci]]}  # fmt: skip
                else:
                    k = keep[split][ci]
                    picks = {"": order[:k]} if split == "test" else {"": order[:k], "pool": order[n : n + pool]}
                for kind, idx in picks.items():
                    dst = {"pool": pool_dir / c, "dev-test": images / "test" / c}.get(kind, images / split / c)
                    dst.mkdir(parents=True, exist_ok=True)
                    for i in idx:
                        (dst / files[i].name).symlink_to(files[i].resolve())
                if split == "train" and len(files) < train + pool:
                    raise SystemExit(f"{data}/train/{c} has {len(files)} images; need {train + pool}")
        (images / "done").write_text(stamp)
    return images, pool_dir, classes


def load_folder(root: Path, classes: list[str]):
    """(uint8 (N, 3, H, W) tensor, labels, relative paths) of <root>/<class>/*."""
    import torch
    from PIL import Image

    xs, ys, paths = [], [], []
    for c, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            xs.append(np.asarray(Image.open(f).convert("RGB")))
            ys.append(c)
            paths.append(f"{name}/{f.name}")
    return torch.as_tensor(np.stack(xs)).permute(0, 3, 1, 2).contiguous(), np.array(ys), paths


# ------------------------------------------------------------------------------------------ annotate
def annotate_instance(images: Path, pool: Path, classes: list[str], out: Path, *, seed: int, shots: int, reg: float = 1.0,
                      prompts: tuple[str, ...] | None = None) -> None:
    """The instance-dependent annotator → a dataset in the stage contract (DESIGN.md) + annotation.json.
    `shots` (labelled pool images per class per prompt) and `reg` (inverse L2 strength) set its accuracy;
    `prompts` (a subset of PROMPTS; None = all five) its coverage: a union of fewer prompts misses more true labels."""
    import datasets

    from bench.instance_annotator import PROMPTS, InstanceAnnotator
    from pipeline.schema import features

    px, py, _ = load_folder(pool, classes)
    ann = InstanceAnnotator(shots=shots, seed=seed, reg=reg, prompts=prompts or PROMPTS).fit(px, py)
    feats = features(classes)
    feats["votes"] = datasets.Sequence(datasets.Value("int32"))
    splits, stats = {}, {}
    for split in ("train", "test"):
        x, y, paths = load_folder(images / split, classes)
        a = ann.annotate(x)
        cand = a["candidates"]
        splits[split] = datasets.Dataset.from_dict({
            "image": [{"bytes": (images / split / p).read_bytes(), "path": None} for p in paths],
            "path": paths, "label": y.tolist(), "trusted": [False] * len(y),
            "candidates": [np.flatnonzero(r).tolist() for r in cand], "vlm_probs": a["vlm_probs"].tolist(),
            "vlm_pred": a["vlm_pred"].tolist(), "votes": a["votes"].tolist(),
        }, features=feats)  # fmt: skip
        stats[split] = annotator_stats(cand, a["vlm_pred"], y)
    datasets.DatasetDict(splits).save_to_disk(str(out))
    info = {"annotator": "bench-instance", "prompts": list(ann.prompts), "shots_per_class": shots, "reg": reg, "seed": seed,
            "candidate_rule": "union", "classes": classes, "stats": stats}  # fmt: skip
    (out / "annotation.json").write_text(json.dumps(info, indent=1))


def annotator_stats(cand: np.ndarray, pred: np.ndarray, y: np.ndarray) -> dict:
    return {"n": int(len(y)), "zero_shot_accuracy": float((pred == y).mean()),
            "coverage": float(cand[np.arange(len(y)), y].mean()), "mean_candidates": float(cand.sum(1).mean())}  # fmt: skip


def annotate(setting: str, seed: int, images: Path, pool: Path, classes: list[str], work: Path, args) -> Path:
    out = work / "annotated" / setting.replace(":", "_").replace(",", "_").replace("=", "") / f"seed{seed}"
    if (out / "dataset_dict.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    if setting == "instance" or setting.startswith("instance:"):
        opts = dict(kv.split("=", 1) for kv in setting.split(":", 1)[1].split(",")) if ":" in setting else {}
        if set(opts) - {"shots", "reg", "prompts"}:
            raise SystemExit(f"setting {setting!r}: instance takes shots=K, reg=R and prompts=A+B only")
        annotate_instance(images, pool, classes, out, seed=seed, shots=int(opts.get("shots", args.shots)),
                          reg=float(opts.get("reg", 1.0)),
                          prompts=tuple(opts["prompts"].split("+")) if "prompts" in opts else None)  # fmt: skip
    elif setting == "clean" or setting.startswith("synthetic:"):
        noise = "q=0,eta=0" if setting == "clean" else setting.split(":", 1)[1]
        cli("annotate", str(images), str(out), "--annotator", "synthetic", "--noise", noise,
            "--seed", str(seed), "--num-workers", "1", threads=args.threads)  # fmt: skip
    else:
        raise SystemExit(f"unknown setting {setting!r}: use clean, synthetic:q=Q,eta=E, instance or instance:shots=K,reg=R,prompts=A+B")
    return out
