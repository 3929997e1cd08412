"""Accuracy benchmark: Co-Reg against every baseline, same student, same data, same budget (CPU-sized).

    python bench/accuracy.py [--data ../shared/data/cifar10] [--seeds 0,1,2] [--epochs 30] ...

On a fixed, class-balanced subset of CIFAR-10 (`--train-per-class` training images, `--test-per-class` test
images, `--pool-per-class` further training images that only the instance annotator may see), for every
annotation setting and seed:
  1. annotate: `clean` gives every image its true label as a singleton set (only `ce` runs there: the
     supervised ceiling of this student and budget); `synthetic:q=Q,eta=E` runs `coreg annotate IMAGES OUT --annotator synthetic --noise ... --seed S`
     (the paper's generator, coreg-method.md §4); `instance` runs bench/instance_annotator.py (few-shot weak
     classifiers, one per "prompt", whose errors depend on the image) and writes the same stage contract;
  2. train every method with `coreg train --method M` and the SAME shared options (arch, epochs, warm-up,
     batch, LR schedule), then `coreg evaluate` on the test split.
Every run's result is cached as JSON under --work, so an interrupted benchmark resumes where it stopped. The
table (mean ± std test accuracy over seeds, the annotator's own numbers, training time relative to `ce` on the
same setting and seed) goes to --out.
The knobs scaled down from the paper's 800 epochs are listed in the table's header.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
METHODS = ("coreg", "coreg_paper", "ce", "kd", "proden", "cc", "cr_dpll", "pico", "alim", "dividemix")
DEFAULT_SETTINGS = ("clean", "instance", "synthetic:q=0.03,eta=0.1", "synthetic:q=0.03,eta=0.3")


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
def image_folder(data: Path, work: Path, *, train: int, test: int, pool: int, subset: str = "report") -> tuple[Path, Path, list[str]]:
    """Symlinked subsets: work/images/{train,test}/<class>/ for the student, work/pool/<class>/ for the
    instance annotator. The subset is fixed (seed 1234), so every seed and method sees the same images.
    `subset="dev"` is the held-out set for choosing defaults: its train and test images are both drawn from the
    training images the reported subset leaves unused (the annotator's pool is the same), so nothing tuned
    on it has seen a reported image."""
    classes = sorted(p.name for p in (data / "train").iterdir() if p.is_dir())
    rng = np.random.default_rng(1234)
    images, pool_dir = work / "images", work / "pool"
    stamp = f"train={train} test={test} pool={pool} data={data.resolve()}" + ("" if subset == "report" else f" subset={subset}")
    if (images / "done").exists() and (images / "done").read_text() not in ("", stamp):
        raise SystemExit(f"{work} holds another subset ({(images / 'done').read_text()}); use another --work")
    if not (images / "done").exists():
        for split, n in (("train", train), ("test", test)):
            for c in classes:
                files = sorted((data / split / c).iterdir())
                order = rng.permutation(len(files))  # drawn for both subsets: the same pool, the same stream
                if split == "test" and subset == "dev":
                    continue
                picks = {"": order[:n]} if split == "test" else {"": order[:n], "pool": order[n : n + pool]}
                if subset == "dev":  # train and test from the training images after the reported train + pool
                    rest = order[train + pool :]
                    picks = {"": rest[:train], "pool": order[train : train + pool], "dev-test": rest[train : train + test]}
                    if len(rest) < train + test:
                        raise SystemExit(f"{data}/train/{c} has {len(files)} images; the dev subset needs {2 * train + pool + test}")
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
def annotate_instance(images: Path, pool: Path, classes: list[str], out: Path, *, seed: int, shots: int, reg: float = 1.0) -> None:
    """The instance-dependent annotator → a dataset in the stage contract (DESIGN.md) + annotation.json.
    `shots` (labelled pool images per class per prompt) and `reg` (inverse L2 strength) set its accuracy."""
    import datasets

    from bench.instance_annotator import PROMPTS, InstanceAnnotator
    from pipeline.schema import features

    px, py, _ = load_folder(pool, classes)
    ann = InstanceAnnotator(shots=shots, seed=seed, reg=reg).fit(px, py)
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
    info = {"annotator": "bench-instance", "prompts": list(PROMPTS), "shots_per_class": shots, "reg": reg, "seed": seed,
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
        opts = dict(kv.split("=") for kv in setting.split(":", 1)[1].split(",")) if ":" in setting else {}
        annotate_instance(images, pool, classes, out, seed=seed, shots=int(opts.get("shots", args.shots)),
                          reg=float(opts.get("reg", 1.0)))  # fmt: skip
    elif setting == "clean" or setting.startswith("synthetic:"):
        noise = "q=0,eta=0" if setting == "clean" else setting.split(":", 1)[1]
        cli("annotate", str(images), str(out), "--annotator", "synthetic", "--noise", noise,
            "--seed", str(seed), "--num-workers", "1", threads=args.threads)  # fmt: skip
    else:
        raise SystemExit(f"unknown setting {setting!r}: use clean, synthetic:q=Q,eta=E, instance or instance:shots=K,reg=R")
    return out


def train_options(args, method: str = "ce") -> list[str]:
    """The options of one benchmark method. `METHOD~OPTS` adds coreg train options (ablations), e.g.
    `coreg~--division global`. Every method shares the student, epochs, batch, lr and schedule shape;
    `coreg` runs its default preset (which derives warm-up, ramp and time constants from the run);
    `coreg_paper` and the baselines run the paper preset with the scaled-down warm-up/ramp/queue below."""
    name, _, extra = method.partition("~")
    base = ["--arch", args.arch, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
            "--lr", str(args.lr), "--lr-period", "0", "--save-every", str(args.epochs),
            *([] if args.hflip else ["--no-hflip"]),
            *(["--cpu", "--num-workers", "1"] if args.device == "cpu" else ["--num-workers", "4"])]  # fmt: skip
    scaled = ["--preset", "paper", "--warmup-epochs", str(args.warmup), "--rampup-epochs", str(args.rampup),
              "--start-cont", str(args.start_cont), "--queue-size", str(args.queue_size)]  # fmt: skip
    if name == "coreg":
        opts = ["--method", "coreg", *base]
    elif name == "coreg_paper":
        opts = ["--method", "coreg", *base, *scaled]
    else:
        opts = ["--method", name, *base, *scaled]
    return opts + extra.split()


def preset_fingerprint(args, method: str) -> dict | None:
    """What the default preset fills in for this run (None under --preset paper): part of a cached result's
    key, so a result trained under older preset rules is never mixed into a table made after they changed."""
    opts = train_options(args, method)
    if "--preset" in opts and opts[opts.index("--preset") + 1] == "paper":
        return None
    from types import SimpleNamespace

    from pipeline.presets import default_values

    cfg = SimpleNamespace(batch_size=args.batch_size, epochs=args.epochs)
    vals = default_values(cfg, n_rows=args.train_per_class * len(args.classes), gpu=args.device == "gpu")
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in sorted(vals.items())}


def diagnostics(model: Path) -> dict:
    """For the two-network methods (reported, never used to select anything): the ensemble's test accuracy
    when warm-up ended, and the last epoch's division statistics averaged over both networks."""
    epochs = [json.loads(line) for line in (model / "metrics.jsonl").read_text().splitlines()]
    warm = [e for e in epochs if e.get("phase") == 0.0]
    diag = {"acc_end_warmup": warm[-1].get("test_acc") if warm else None}
    for k in ("n_p", "n_u", "diag_pseudo_acc_p", "diag_pseudo_acc_u", "diag_p_valid", "diag_p_clean"):
        vals = [epochs[-1][f"{n}/{k}"] for n in ("net1", "net2") if f"{n}/{k}" in epochs[-1]]
        diag[k] = sum(vals) / len(vals) if vals else None
    report = model / "eval-test" / "report.json"
    if report.exists():  # how many classes the final model predicts at all on the test images (collapse check)
        counts = json.loads(report.read_text())["prediction_counts"].values()
        diag["test_classes_predicted"] = sum(1 for c in counts if c > 0)
    return diag


def slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._" else "_" for ch in text.replace("|", "__").replace("=", "")).strip("_")


def run_one(method: str, setting: str, seed: int, ann: Path, work: Path, args) -> dict:
    tag = f"{setting}|{seed}|{method}"
    res_file = work / "results" / (slug(tag) + ".json")
    if res_file.exists():
        res = json.loads(res_file.read_text())
        if res["options"] != train_options(args, method):
            raise SystemExit(f"{res_file} was made with other options ({' '.join(res['options'])}); "
                             "use another --work for these options")  # fmt: skip
        if res.get("preset") != preset_fingerprint(args, method) and args.table_only:  # shown, flagged in the table
            return {**res, "stale_preset": True}
        if res.get("preset") != preset_fingerprint(args, method):
            raise SystemExit(f"{res_file} was trained under other preset rules (pipeline/presets.py changed since); "
                             f"delete it to retrain, or use another --work")  # fmt: skip
        if "test_classes_predicted" not in res.get("diag", {}) and (work / "models" / res_file.stem / "metrics.jsonl").exists():
            res["diag"] = diagnostics(work / "models" / res_file.stem)  # results cached before diagnostics existed
        return res
    for res in args.reused.get(tag, []):  # an earlier session's run of exactly this (options and preset rules)
        if (res["options"] == train_options(args, method) and res.get("preset") == preset_fingerprint(args, method)
                and res.get("subset", "report") == args.subset):  # fmt: skip
            res_file.parent.mkdir(parents=True, exist_ok=True)
            res_file.write_text(json.dumps(res, indent=1))
            return res
    model = work / "models" / res_file.stem
    if model.exists():  # an interrupted run: start it again from scratch (its wall time must be whole)
        import shutil

        shutil.rmtree(model)
    wall = cli("train", str(ann), str(model), "--seed", str(seed), *train_options(args, method), threads=args.threads)
    cli("evaluate", str(model), str(ann), "--split", "test", "--no-measure-vlm", "--overrule-sheet", "0", threads=args.threads)
    report = json.loads((model / "eval-test" / "report.json").read_text())
    last = json.loads((model / "metrics.jsonl").read_text().splitlines()[-1])
    train_stats = json.loads((ann / "annotation.json").read_text())["stats"]["train"]
    res = {
        "setting": setting, "seed": seed, "method": method, "test_acc": report["student_accuracy"],
        "test_acc_net1": last.get("test_acc_net1"), "zero_shot_test": report["zero_shot_accuracy"],
        "train_coverage": train_stats["coverage"], "train_mean_candidates": train_stats["mean_candidates"],
        "train_zero_shot": train_stats["zero_shot_accuracy"], "wall_s": wall, "options": train_options(args, method),
        "diag": diagnostics(model), "preset": preset_fingerprint(args, method), "subset": args.subset,
    }  # fmt: skip
    res_file.parent.mkdir(parents=True, exist_ok=True)
    res_file.write_text(json.dumps(res, indent=1))
    print(f"{tag}: test acc {res['test_acc']:.4f} (zero-shot {res['zero_shot_test']:.4f}), {wall:.0f} s", flush=True)
    return res


def main() -> None:
    from bench.accuracy_table import table

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10"), help="CIFAR-10 image folder (train/, test/)")
    p.add_argument("--work", default="/tmp/coreg-bench-accuracy", help="annotations, models and cached results")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "accuracy.md"))
    p.add_argument("--settings", default=";".join(DEFAULT_SETTINGS), help="';'-separated: synthetic:q=Q,eta=E and/or instance")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--train-per-class", type=int, default=300)
    p.add_argument("--test-per-class", type=int, default=200)
    p.add_argument("--pool-per-class", type=int, default=300)
    p.add_argument("--shots", type=int, default=100, help="instance annotator: labelled images per class per prompt")
    p.add_argument("--arch", default="small_cnn")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="--warmup-epochs (paper: 50 of 800)")
    p.add_argument("--rampup", type=int, default=5, help="--rampup-epochs (paper: 16 of 800)")
    p.add_argument("--start-cont", type=int, default=2, help="--start-cont (paper: 10 of 800)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--queue-size", type=int, default=1024, help="paper: 8192 for 50k images")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training run")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="gpu: train on the GPU (e.g. --arch preact_resnet18 --jobs 1)")
    p.add_argument("--jobs", type=int, default=2, help="training runs side by side")
    p.add_argument("--no-hflip", dest="hflip", action="store_false", help="no horizontal flips (digits)")
    p.add_argument("--subset", choices=("report", "dev"), default="report",
                   help="dev: the held-out subset for choosing defaults (train and test from training images the "
                        "reported subset does not use); report: the subset the committed tables are measured on")  # fmt: skip
    p.add_argument("--reuse", action="append", default=[], metavar="JSON",
                   help="results of an earlier session (a committed bench/results/*.json): a run whose setting, seed, "
                        "method, options and preset rules match is taken from it instead of retrained")  # fmt: skip
    p.add_argument("--table-only", action="store_true", help="write the table from the cached results; train nothing")
    args = p.parse_args()

    work = Path(args.work)
    images, pool, classes = image_folder(Path(args.data), work, train=args.train_per_class, test=args.test_per_class,
                                        pool=args.pool_per_class, subset=args.subset)  # fmt: skip
    args.classes = classes
    args.reused = {}
    for f in args.reuse:
        for res in json.loads(Path(f).read_text()):
            args.reused.setdefault(f"{res['setting']}|{res['seed']}|{res['method']}", []).append(res)
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    tasks = []
    for setting in [s for s in args.settings.split(";") if s]:
        for seed in seeds:
            ann = annotate(setting, seed, images, pool, classes, work, args)
            for method in ["ce"] if setting == "clean" else methods:  # clean: the supervised ceiling
                tasks.append((method, setting, seed, ann))
    if args.table_only:  # render what is cached, run nothing (a table over several partial invocations)
        tasks = [t for t in tasks if (work / "results" / (slug(f"{t[1]}|{t[2]}|{t[0]}") + ".json")).exists()
                 or f"{t[1]}|{t[2]}|{t[0]}" in args.reused]  # fmt: skip
    order = {t[:3]: i for i, t in enumerate(tasks)}
    tasks.sort(key=lambda t: not t[0].startswith(("coreg", "dividemix")))  # the long runs first: better packing of --jobs
    results: list[dict] = []
    # --jobs > 1 runs trainings side by side (each with --threads): more throughput on an idle machine, but
    # every run's wall time then includes the others' contention.
    with ThreadPoolExecutor(max_workers=args.jobs) as pool_:
        for res in pool_.map(lambda t: run_one(*t, work, args), tasks):
            results.append(res)
            results.sort(key=lambda r: order[(r["method"], r["setting"], r["seed"])])
            Path(args.out).write_text(table(results, args, options=train_options(args), methods=tuple(methods)))  # refreshed after every run
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(f"table written to {args.out}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
