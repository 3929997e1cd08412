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
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
METHODS = ("coreg", "coreg_paper", "ce", "kd", "proden", "cc", "cr_dpll", "pico", "alim", "dividemix")
DEFAULT_SETTINGS = ("clean", "instance", "synthetic:q=0.03,eta=0.1", "synthetic:q=0.03,eta=0.3")


def split_methods(text: str) -> list[str]:
    """--methods: comma-separated; a comma inside a method's options (`coreg~--warmup-loss A,B`) stays with it,
    since each method starts with a known name."""
    out: list[str] = []
    for part in text.split(","):
        if not part:
            continue
        if out and part.split("~")[0] not in METHODS:
            out[-1] += "," + part
        else:
            out.append(part)
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


_SKEW: dict[str, tuple | None] = {}
_SKEW_LOCK = threading.Lock()


def annotation_skew_of(ann: Path) -> tuple | None:
    """stages.train.annotation_skew of an annotated dataset, once per path. Under a lock: run_one runs in
    threads, and datasets.load_from_disk in two threads at once trips over tqdm's shared lock."""
    with _SKEW_LOCK:
        if str(ann) not in _SKEW:
            import datasets

            from stages.train import annotation_skew

            _SKEW[str(ann)] = annotation_skew(datasets.load_from_disk(str(ann))["train"])
        return _SKEW[str(ann)]


def preset_fingerprint(args, method: str, ann: Path | None = None) -> dict | None:
    """What the default preset fills in for this run (None under --preset paper): part of a cached result's
    key, so a result trained under older preset rules is never mixed into a table made after they changed.
    `ann` (the annotated dataset): the warm-up rule reads its annotator skew."""
    opts = train_options(args, method)
    if "--preset" in opts and opts[opts.index("--preset") + 1] == "paper":
        return None
    from types import SimpleNamespace

    from pipeline.presets import default_values

    skew = annotation_skew_of(ann) if ann is not None and opts[1] == "coreg" else None  # only coreg's preset reads it
    warmup = opts[opts.index("--warmup-loss") + 1] if "--warmup-loss" in opts else ""  # given: the preset's rule is off
    cfg = SimpleNamespace(batch_size=args.batch_size, epochs=args.epochs, method=opts[1], warmup_loss=warmup)  # opts = ["--method", NAME, ...]
    vals = default_values(cfg, n_rows=args.n_train, gpu=args.device == "gpu", skew=skew)
    if vals.get("prior_shift") == "em":  # its guards live in code, not in the preset: a change of them retrains
        from pipeline.prior_shift import RULE

        vals["prior_shift_rule"] = RULE
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in sorted(vals.items())}


def diagnostics(model: Path) -> dict:
    """For the two-network methods (reported, never used to select anything): the ensemble's test accuracy
    when warm-up ended, and the last epoch's division statistics averaged over both networks."""
    epochs = [json.loads(line) for line in (model / "metrics.jsonl").read_text().splitlines()]
    warm = [e for e in epochs if e.get("phase") == 0.0]
    diag = {"acc_end_warmup": warm[-1].get("test_acc") if warm else None}
    # the last epoch's own test pass is the trained networks' ensemble, before any --prior-shift of the saved model
    diag["acc_last_epoch"] = epochs[-1].get("test_acc") if epochs else None
    shift = json.loads((model / "config.json").read_text()).get("prior_shift")
    diag["prior_shift_applied"] = None if shift is None else bool(shift.get("applied"))
    diag["classes_raised"] = None if shift is None else len(shift.get("raised", {}))  # the presence floor's raise
    for k in ("n_p", "n_u", "n_u_used", "diag_pseudo_acc_p", "diag_pseudo_acc_u", "diag_p_valid", "diag_p_clean"):
        vals = [epochs[-1][f"{n}/{k}"] for n in ("net1", "net2") if f"{n}/{k}" in epochs[-1]]
        diag[k] = sum(vals) / len(vals) if vals else None
    report = model / "eval-test" / "report.json"
    if report.exists():  # how many classes the final model predicts at all on the test images (collapse check)
        counts = json.loads(report.read_text())["prediction_counts"].values()
        diag["test_classes_predicted"] = sum(1 for c in counts if c > 0)
    return diag


def slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._" else "_" for ch in text.replace("|", "__").replace("=", "")).strip("_")


def environment() -> dict:
    """What a run's exact numbers depend on besides the code, its options and its seed: training is deterministic
    on one machine and library set, not across them (a new machine moved single Co-Reg runs by up to 4.8 points at
    the same commit, bench/results/accuracy_notes.md §43). Stored with every result so that a table says which of
    its runs were made elsewhere; per-seed differences between two environments are not paired comparisons."""
    import platform

    import numpy
    import sklearn
    import torch

    cpu = platform.processor()
    try:  # Linux: the CPU's model name; the kernels torch picks follow its instruction set (`cpu` below)
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").open() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "sklearn": sklearn.__version__, "cpu": torch.backends.cpu.get_cpu_capability(), "cpu_model": cpu}  # fmt: skip


def run_one(method: str, setting: str, seed: int, ann: Path, work: Path, args) -> dict:
    from bench.accuracy_data import cli

    tag = f"{setting}|{seed}|{method}"
    res_file = work / "results" / (slug(tag) + ".json")
    options, preset = train_options(args, method), preset_fingerprint(args, method, ann)
    if res_file.exists():
        res = json.loads(res_file.read_text())
        if res["options"] != options:
            raise SystemExit(f"{res_file} was made with other options ({' '.join(res['options'])}); "
                             "use another --work for these options")  # fmt: skip
        if res.get("preset") != preset:
            if args.table_only:  # shown, flagged in the table
                return {**res, "stale_preset": True}
            raise SystemExit(f"{res_file} was trained under other preset rules (pipeline/presets.py changed since); "
                             f"delete it to retrain, or use another --work")  # fmt: skip
        if "test_classes_predicted" not in res.get("diag", {}) and (work / "models" / res_file.stem / "metrics.jsonl").exists():
            res["diag"] = diagnostics(work / "models" / res_file.stem)  # results cached before diagnostics existed
        return res
    for res in args.reused.get(tag, []):  # an earlier session's run of exactly this (options and preset rules)
        if res["options"] == options and res.get("preset") == preset and res.get("subset", "report") == args.subset:
            res_file.parent.mkdir(parents=True, exist_ok=True)
            res_file.write_text(json.dumps(res, indent=1))
            return res
    if args.table_only:  # never train: an earlier session's run under other preset rules is shown, flagged
        stale = [r for r in args.reused.get(tag, []) if r["options"] == options and r.get("subset", "report") == args.subset]
        if stale:
            return {**stale[-1], "stale_preset": True}
        raise SystemExit(f"{tag}: no cached result to show (--table-only trains nothing); run without it")
    model = work / "models" / res_file.stem
    if model.exists():  # an interrupted run: start it again from scratch (its wall time must be whole)
        import shutil

        shutil.rmtree(model)
    wall = cli("train", str(ann), str(model), "--seed", str(seed), *options, threads=args.threads)
    cli("evaluate", str(model), str(ann), "--split", "test", "--no-measure-vlm", "--overrule-sheet", "0", threads=args.threads)
    report = json.loads((model / "eval-test" / "report.json").read_text())
    last = json.loads((model / "metrics.jsonl").read_text().splitlines()[-1])
    train_stats = json.loads((ann / "annotation.json").read_text())["stats"]["train"]
    res = {
        "setting": setting, "seed": seed, "method": method, "test_acc": report["student_accuracy"],
        "test_acc_net1": last.get("test_acc_net1"), "zero_shot_test": report["zero_shot_accuracy"],
        "test_bal_acc": report["student_balanced_accuracy"], "zero_shot_bal_test": report["zero_shot_balanced_accuracy"],
        "train_coverage": train_stats["coverage"], "train_mean_candidates": train_stats["mean_candidates"],
        "train_zero_shot": train_stats["zero_shot_accuracy"], "wall_s": wall, "options": options,
        "diag": diagnostics(model), "preset": preset, "subset": args.subset, "env": args.env,
    }  # fmt: skip
    res_file.parent.mkdir(parents=True, exist_ok=True)
    res_file.write_text(json.dumps(res, indent=1))
    print(f"{tag}: test acc {res['test_acc']:.4f} (zero-shot {res['zero_shot_test']:.4f}), {wall:.0f} s", flush=True)
    return res


def main() -> None:
    from bench.accuracy_data import annotate, class_counts, image_folder
    from bench.accuracy_table import TWO_NETWORK, table

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10"), help="CIFAR-10 image folder (train/, test/)")
    p.add_argument("--work", default="/tmp/coreg-bench-accuracy", help="annotations, models and cached results")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "accuracy.md"))
    p.add_argument("--settings", default=";".join(DEFAULT_SETTINGS), help="';'-separated: clean, synthetic:q=Q,eta=E and/or instance[:shots=K,reg=R,prompts=A+B]")
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
    p.add_argument("--imbalance", type=float, default=1.0, metavar="R",
                   help="a long-tailed subset: class i keeps --train-per-class (and --test-per-class) x R^(-i/(C-1)) "
                        "images, the last class R times fewer than the first (1 = balanced)")  # fmt: skip
    p.add_argument("--subset", choices=("report", "dev"), default="report",
                   help="dev: the held-out subset for choosing defaults (train and test from training images the "
                        "reported subset does not use); report: the subset the committed tables are measured on")  # fmt: skip
    p.add_argument("--reuse", action="append", default=[], metavar="JSON",
                   help="results of an earlier session (a committed bench/results/*.json): a run whose setting, seed, "
                        "method, options and preset rules match is taken from it instead of retrained")  # fmt: skip
    p.add_argument("--table-only", action="store_true", help="write the table from the cached results; train nothing")
    args = p.parse_args()

    if args.imbalance < 1:
        raise SystemExit(f"--imbalance must be at least 1 (the head-to-tail ratio), got {args.imbalance:g}")
    work = Path(args.work)
    images, pool, classes = image_folder(Path(args.data), work, train=args.train_per_class, test=args.test_per_class,
                                        pool=args.pool_per_class, subset=args.subset, imbalance=args.imbalance)  # fmt: skip
    args.classes = classes
    args.n_train = sum(class_counts(args.train_per_class, len(classes), args.imbalance))
    args.n_test = sum(class_counts(args.test_per_class, len(classes), args.imbalance))
    args.env = environment()
    args.reused = {}
    for f in args.reuse:
        for res in json.loads(Path(f).read_text()):
            args.reused.setdefault(f"{res['setting']}|{res['seed']}|{res['method']}", []).append(res)
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = split_methods(args.methods)
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
    tasks.sort(key=lambda t: not t[0].startswith(TWO_NETWORK))  # the long runs first: better packing of --jobs
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
