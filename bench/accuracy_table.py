"""The markdown table of bench/accuracy.py: mean ± std per method and setting, the annotator's own numbers,
training time as a ratio to `ce`, and the two-network diagnostics. Rendering only: it reads the result
dicts that accuracy.py's `run_one` writes.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

# the two-network methods: the long runs (bench/accuracy.py starts them first, bench/gpu.sh plans a full epoch's
# cost for each), and the ones with a net1 column and division diagnostics here
TWO_NETWORK = ("coreg", "dividemix")

REPO = Path(__file__).resolve().parent.parent


def ms(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return "–"
    m = statistics.mean(values) * scale
    s = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def ratio(runs: list[dict], same_setting: list[dict]) -> list[float]:
    """Each run's `coreg train` wall time divided by that of `ce` on the same setting and seed: a ratio of two
    runs on the same shared machine, not an absolute time (see the table header for the load)."""
    ce = {r["seed"]: r["wall_s"] for r in same_setting if r["method"] == "ce"}
    return [r["wall_s"] / ce[r["seed"]] for r in runs if r["seed"] in ce]


def table(results: list[dict], args, *, options: list[str], methods: tuple[str, ...]) -> str:
    imbalance = getattr(args, "imbalance", 1.0)
    balance = "class-balanced" if imbalance == 1.0 else (
        f"long-tailed (`--imbalance {imbalance:g}`: class i keeps R^(−i/(C−1)) of the per-class count, in the sorted "
        f"class order, in both the training and the test images; the annotator's pool stays balanced)")  # fmt: skip
    lines = [
        "# Accuracy benchmark (bench/accuracy.py)", "",
        f"Images: a fixed {balance} subset of {os.path.relpath(args.data, REPO)} with {len(args.classes)} classes: "
        f"{args.n_train} training images, {args.n_test} test images; instance annotator pool: {args.pool_per_class * len(args.classes)} other training images, "
        f"{args.shots} shots per class per prompt unless the setting says `shots=K`. Student `{args.arch}` at the images' own "
        f"size, trained from scratch by every method on the {args.device.upper()}. Baselines and `coreg_paper` "
        f"(`--preset paper`) run `{' '.join(o for o in options if o != '--cpu')}`; `coreg` runs the same student, "
        "epochs, batch and lr with `--preset default` (warm-up, ramp and time constants derived from the run, "
        "pipeline/presets.py); `coreg~OPTS` rows add OPTS to that. Method-specific knobs at their defaults (see README). Test accuracy of the prediction model (Co-Reg and DivideMix: sum of both "
        "networks' logits; `net1` = the first network alone, the deployable single-network cost), mean ± std over "
        f"seeds; each seed redraws the annotation and the training randomness. Training time: the wall time of "
        "one `coreg train` run divided by that of `ce` on the same setting and seed (this machine: "
        f"{os.cpu_count()} CPU cores shared with other work, {args.threads} thread(s) per run, {args.jobs} run(s) "
        "at a time, so the ratios are rough). `classes predicted on test`: how many of the classes the final "
        "model predicts at all (a collapse check). `gap closed`: (accuracy − zero-shot) / (clean ceiling − zero-shot), "
        "with the clean ceiling of the same seed.", "",
    ]  # fmt: skip
    if getattr(args, "subset", "report") == "dev":
        lines[2:2] = ["**Dev subset** (`--subset dev`): training and test images both drawn from the training images "
                      "the reported subset does not use; this table is for choosing defaults, not for reporting.", ""]  # fmt: skip
    ceiling = {r["seed"]: r["test_acc"] for r in results if r["setting"] == "clean"}
    for setting in dict.fromkeys(r["setting"] for r in results):
        rs = [r for r in results if r["setting"] == setting]
        first = {r["seed"]: r for r in rs}.values()
        if setting == "clean":
            acc = [r["test_acc"] for r in rs]
            lines += [f"## clean: `ce` on the true labels (the ceiling of this student and budget): {ms(acc)} % "
                      f"over {len(acc)} seeds", ""]  # fmt: skip
            continue
        check = []
        if ceiling:  # a setting can only show a win if the student could beat its annotator (>= 15 points)
            cm = statistics.mean(ceiling.values())
            zm = statistics.mean(r["zero_shot_test"] for r in first)
            ok = "yes" if cm - zm >= 0.15 else "NO: this setting cannot show a win"
            check = [f"Ceiling check: clean ceiling {cm * 100:.1f} % − annotator zero-shot {zm * 100:.1f} % = "
                     f"{(cm - zm) * 100:.1f} points (at least 15 needed: {ok}).", ""]  # fmt: skip
        lines += [
            f"## {setting}", "", *check,
            f"Annotator: zero-shot accuracy {ms([r['zero_shot_test'] for r in first])} % on the test images "
            f"({ms([r['train_zero_shot'] for r in first])} % on the training images); training candidate sets: "
            f"coverage (true label in the set) {ms([r['train_coverage'] for r in first])} %, "
            f"mean size {ms([r['train_mean_candidates'] for r in first], 1, 2)}.", "",
            *([f"Balanced accuracy (the mean of the per-class accuracies; the annotator's: "
               f"{ms([r['zero_shot_bal_test'] for r in first if 'zero_shot_bal_test' in r])} %) beside the "
               "accuracy on the long-tailed test images.", ""] if imbalance != 1.0 else []),
            "| method | test accuracy (%) | " + ("balanced accuracy (%) | " if imbalance != 1.0 else "")
            + "net1 alone (%) | vs zero-shot (points) | gap closed (%) | classes predicted on test | seeds | training time ÷ ce's |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if imbalance != 1.0 else ""),
        ]  # fmt: skip
        for method in [m for m in methods if any(r["method"] == m for r in rs)]:
            mr = [r for r in rs if r["method"] == method]
            acc = [r["test_acc"] for r in mr]
            net1 = [r["test_acc_net1"] for r in mr] if method.startswith(TWO_NETWORK) else []
            gain = [r["test_acc"] - r["zero_shot_test"] for r in mr]
            # (accuracy − zero-shot) / (ceiling − zero-shot), with the clean ceiling of the same seed
            closed = [(r["test_acc"] - r["zero_shot_test"]) / (ceiling[r["seed"]] - r["zero_shot_test"])
                      for r in mr if ceiling.get(r["seed"], 0) > r["zero_shot_test"]]  # fmt: skip
            ncls = [r["diag"]["test_classes_predicted"] for r in mr if r.get("diag", {}).get("test_classes_predicted") is not None]
            bal = f" {ms([r['test_bal_acc'] for r in mr if 'test_bal_acc' in r])} |" if imbalance != 1.0 else ""
            lines.append(
                f"| {method} | {ms(acc)} |{bal} {ms(net1)} | {ms(gain)} | {ms(closed, 100, 0)} | {ms(ncls, 1, 1)} | {len(mr)} | {ms(ratio(mr, rs), 1, 1)} |"
            )
        lines.append("")
        two = [m for m in methods if m.startswith(TWO_NETWORK) and any(r["method"] == m and r.get("diag") for r in rs)]
        if two:
            lines += [
                "Two-network methods, diagnostics (true labels used for reporting only): ensemble test accuracy "
                "when warm-up ended and at the end; at the last epoch, the share of training rows each network "
                "put in the clean/partial split P, and the accuracy of the pseudo-labels (argmax of the "
                "training targets) on P and U rows (Co-Reg), averaged over the two networks. `prior shift`: the "
                "runs whose saved model `--prior-shift em` moved towards the class mix it estimated (pipeline/"
                "prior_shift.py) and, in brackets, those where it raised a class it found lost (predicted for under "
                "a fifth of a fair share of the training images), and the ensemble's accuracy at the last epoch before "
                "that shift.", "",
                "| method | acc. end of warm-up (%) | before prior shift (%) | final acc. (%) | prior shift (runs) | P share (%) | pseudo-label acc. P (%) | pseudo-label acc. U (%) |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            ]  # fmt: skip
            for method in two:
                mr = [r for r in rs if r["method"] == method and r.get("diag")]

                def d(key, mr=mr):
                    return [r["diag"][key] for r in mr if r["diag"].get(key) is not None]

                share = [r["diag"]["n_p"] / (r["diag"]["n_p"] + r["diag"]["n_u"]) for r in mr if r["diag"].get("n_p") is not None]
                shifted = [r["diag"]["prior_shift_applied"] for r in mr if r["diag"].get("prior_shift_applied") is not None]
                raised = [r["diag"]["classes_raised"] for r in mr if r["diag"].get("classes_raised") is not None]
                fired = f"{sum(shifted)} of {len(shifted)}" + (f" (raised: {sum(v > 0 for v in raised)})" if raised else "")
                lines.append(
                    f"| {method} | {ms(d('acc_end_warmup'))} | {ms(d('acc_last_epoch'))} | {ms([r['test_acc'] for r in mr])} | "
                    f"{fired if shifted else '–'} | {ms(share)} | "
                    f"{ms(d('diag_pseudo_acc_p'))} | {ms(d('diag_pseudo_acc_u'))} |"
                )
            lines.append("")
    other = [r for r in results if r.get("env") != getattr(args, "env", None)]
    if other:  # --reuse of runs made on another machine or library set (or before bench/accuracy.py recorded it)
        lines += ["## Runs from another environment", "",
                  f"{len(other)} of the {len(results)} runs were made in another environment (another CPU or library "
                  "versions, or before the benchmark recorded them) and taken from an earlier session's results. A run "
                  "is deterministic within one environment only (notes §43: a new machine moved single Co-Reg runs "
                  "by up to 4.8 points), so compare methods per seed only between runs of the same environment.", ""]  # fmt: skip
    stale = [r for r in results if r.get("stale_preset")]
    if stale:  # --table-only over results trained before pipeline/presets.py changed: shown, never mixed silently
        lines += ["## Rows trained under earlier default-preset rules", "",
                  "These runs were made before the default preset changed; the mechanisms the preset filled for them "
                  "(options a row names explicitly override it; an option missing here did not exist yet, so the "
                  "run used the paper's mechanism):", ""]  # fmt: skip
        for r in stale:
            mech = ", ".join(f"{k}={v}" for k, v in (r.get("preset") or {}).items() if isinstance(v, str) and k != "arch")
            lines.append(f"- {r['setting']}, seed {r['seed']}, `{r['method']}`: {mech}")
        lines.append("")
    return "\n".join(lines)
