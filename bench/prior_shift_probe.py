"""Re-score saved Co-Reg models under other `--prior-shift em` guards, without retraining.

    python bench/prior_shift_probe.py --group NAME=GLOB [--group NAME=GLOB ...] [--keep 0.5f,0.5,0.75] [--out FILE.md]

GLOB: model folders of a `bench/accuracy.py --work` (WORK/models/SETTING__SEED__coreg; several globs
comma-separated). The shift only moves each network's last bias (pipeline/prior_shift.py), so the networks are
what training left: each model's logits on its annotated training and test images are computed once (the
recorded shift taken off, from its config.json), and every keep share is applied to those logits. That is exact
up to float rounding against training the same seed again (the training code is deterministic). Per group and
keep share: the mean change of test accuracy and balanced accuracy against the unshifted networks (with the
worst run), the runs the shift fired on, and the runs whose final model predicts fewer classes on test than the
unshifted one. True test labels score the guards; use dev subsets only (`--subset dev`), never a reported one. A
keep share is rounded up, as training does; `0.5f` is half rounded down (the first rule). `--cache DIR` keeps
the logits.
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

import numpy as np


def logits_of(model_dir: str, cache: str | None = None) -> dict:
    """Per-network logits on the annotated train and test rows, without the saved prior shift."""
    import pickle

    cached = Path(cache) / (model_dir.strip("/").replace("/", "_") + ".pkl") if cache else None
    if cached is not None and cached.exists():
        return pickle.loads(cached.read_bytes())
    from pipeline.model_io import load_model
    from pipeline.schema import candidate_matrix, load_annotated
    from stages.evaluate import predict_rows

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    ds, classes = load_annotated(cfg["train_config"]["annotated"], stage="prior_shift_probe")
    model = load_model(model_dir)
    shift = cfg.get("prior_shift") or {}
    out = {"mask": np.asarray(candidate_matrix(ds["train"]["candidates"], len(classes)), dtype=np.float64)}
    for split in ("train", "test"):
        per_net, _ = predict_rows(model, ds[split], range(len(ds[split])), batch_size=256, num_workers=0, progress=False)
        if shift.get("logit_shift"):  # the EM shift and/or the presence raise
            per_net = {k: v - np.asarray(shift["logit_shift"][k], dtype=v.dtype) for k, v in per_net.items()}
        out[split], out[split + "_y"] = per_net, np.asarray(ds[split]["label"])
    with_ = model.config["predict_with"]  # the saved model's own rule (stages/train_checks.prediction_nets)
    out["predict"] = list(model.nets) if with_ == "ensemble" else [with_]
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_bytes(pickle.dumps(out))
    return out


def score(d: dict, shift: dict) -> tuple[float, float, int]:
    """Test accuracy, balanced accuracy (%) and classes predicted, for the shifted prediction networks."""
    from pipeline.metrics import accuracy, balanced_accuracy

    z = sum(d["test"][k] + (shift[k].numpy() if k in shift else 0) for k in d["predict"])
    pred, y = z.argmax(1), d["test_y"]
    return 100 * accuracy(pred, y), 100 * balanced_accuracy(pred, y, z.shape[1]), len(np.unique(pred))


def presence_rows(name: str, data: list, base: list, floors: list[float]) -> list[str]:
    """One table row per presence floor: accuracy and balanced accuracy after the EM shift and the raise."""
    import torch

    from pipeline import prior_shift as ps

    shifted = []  # the EM shift does not depend on the floor: estimated once per model
    for d in data:
        logits = {k: torch.from_numpy(v) for k, v in d["train"].items()}
        mask = torch.from_numpy(d["mask"])
        shifted.append((logits, mask, ps.estimate(logits, mask, d["predict"])[0]))
    out = []
    for f in floors:
        rows = []
        for d, (logits, mask, em) in zip(data, shifted, strict=True):
            shift, raised = ps.keep_present(logits, mask, d["predict"], em, share=f) if f > 0 else (em, {})
            rows.append((*score(d, shift), len(raised)))
        acc, bal, cls = (np.array([r[i] for r in rows]) for i in range(3))
        out.append(f"| {name} | {len(data)} | {np.mean([b[0] for b in base]):.1f} / {np.mean([b[1] for b in base]):.1f} | "
                   f"{f:g} | {acc.mean():.2f} / {bal.mean():.2f} | {' '.join(f'{a:.1f}/{b:.1f}' for a, b in zip(acc, bal, strict=True))} | "
                   f"{sum(r[3] > 0 for r in rows)} | {cls.min()} ({sum(cls < data[0]['mask'].shape[1])}) |")
        print(out[-1], flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    import torch

    from pipeline import prior_shift as ps

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--group", action="append", required=True, help="NAME=GLOB of model folders")
    ap.add_argument("--keep", default="0.5f,0.5,0.75,0.9", help="keep shares to compare (comma-separated; 0.5f: rounded down)")
    ap.add_argument("--presence", help="instead of keep shares: presence floors to compare (comma-separated shares of a "
                    "fair share; 0 = none), each after the EM shift at the default keep share")
    ap.add_argument("--cache", help="a folder for the models' logits (computed once per model)")
    ap.add_argument("--out", help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    keeps = [(float(k.rstrip("f")), not k.endswith("f"), k) for k in args.keep.split(",")]
    lines = ["| dev runs | runs | unshifted acc. / bal. (%) | keep | Δ acc. mean (worst) | Δ bal. mean (worst) | fired | class lost on test |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    if args.presence:
        lines = ["| dev runs | runs | unshifted acc. / bal. (%) | presence floor | acc. / bal. (%) | by run | raised | fewest classes on test (runs short) |",
                 "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]  # fmt: skip
    for group in args.group:
        name, pattern = group.split("=", 1)
        dirs = sorted(d for p in pattern.split(",") for d in glob.glob(p))
        if not dirs:
            raise SystemExit(f"--group {name}: no model folder matches {pattern}")
        data = [logits_of(m, args.cache) for m in dirs]
        base = [score(d, {}) for d in data]
        if args.presence:
            lines += presence_rows(name, data, base, [float(f) for f in args.presence.split(",")])
            continue
        for keep, round_up, label in keeps:
            rows = []
            for d, b in zip(data, base, strict=True):
                logits = {k: torch.from_numpy(v) for k, v in d["train"].items()}
                shift, info = ps.estimate(logits, torch.from_numpy(d["mask"]), d["predict"], keep=keep, round_up=round_up)
                s = score(d, shift)
                rows.append((s[0] - b[0], s[1] - b[1], bool(info.get("applied")), s[2] < b[2]))
            da, db = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
            lines.append(f"| {name} | {len(dirs)} | {np.mean([b[0] for b in base]):.1f} / {np.mean([b[1] for b in base]):.1f} | {label} | "
                         f"{da.mean():+.2f} ({da.min():+.1f}) | {db.mean():+.2f} ({db.min():+.1f}) | {sum(r[2] for r in rows)} | {sum(r[3] for r in rows)} |")  # fmt: skip
            print(lines[-1], flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
