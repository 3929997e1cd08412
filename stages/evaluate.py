"""`coreg evaluate MODEL ANNOTATED [--split test] [--out DIR]`: how far the student beats the VLM.

Disk → disk: a model directory and an annotated dataset in, DIR/report.json + report.md + PNG figures out
(DESIGN.md "Report"). Under Accelerate each process scores a contiguous shard of the rows; the shards are
gathered with their row ids and merged so that every row counts exactly once, whatever the process count.
Ground truth (`label`) is read only to score; the student never sees it here.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from pipeline.config import EvaluateConfig
from pipeline.errors import CoregError

REPORT_FILES = ("report.json", "report.md", "confusion_student.png", "confusion_vlm.png", "distribution.png", "overrules.png")
_CHUNK = 4096  # rows decoded at a time: bounds memory on large splits (4096 x 3 x 224 x 224 uint8 = 0.6 GB)
SPEED_IMAGES = 256  # images timed for the student-vs-VLM speed comparison


def default_out(model: str | Path, split: str) -> Path:
    return Path(model) / f"eval-{split}"


def check_out(out: Path) -> None:
    """An existing output folder is reused only when it holds an earlier report (never someone's files)."""
    if out.exists() and not out.is_dir():
        raise CoregError(f"{out}: exists and is a file; choose a folder for the report (--out DIR)")
    if out.is_dir() and any(out.iterdir()) and not (out / "report.json").is_file():
        raise CoregError(f"{out}: exists and holds other files; choose an empty or new folder (--out DIR)")


def check_classes(model_classes: list[str], data_classes: list[str], model: str, annotated: str) -> None:
    if list(model_classes) == list(data_classes):
        return
    diff = next((i for i, (a, b) in enumerate(zip(model_classes, data_classes, strict=False)) if a != b), None)
    where = (
        f"class {diff} is {model_classes[diff]!r} in the model but {data_classes[diff]!r} in the data"
        if diff is not None
        else f"the model has {len(model_classes)} classes, the data {len(data_classes)}"
    )
    raise CoregError(f"{model} and {annotated} have different class lists ({where}); evaluate a model on data annotated with its classes")


def run(cfg: EvaluateConfig) -> Path:
    """Validate the inputs at the boundary, then evaluate. Returns the report folder."""
    from pipeline.config import check
    from pipeline.model_io import read_model_config
    from pipeline.schema import load_annotated, read_annotation_info

    check(cfg)  # ranges and choices declared in pipeline/config.py
    model_config = read_model_config(cfg.model)
    dsd, classes = load_annotated(cfg.annotated, stage="coreg evaluate")
    if cfg.split not in dsd:
        raise CoregError(
            f"{cfg.annotated}: has no split {cfg.split!r} (it has {', '.join(sorted(dsd))}); choose one with --split"
        )
    check_classes(model_config["classes"], classes, cfg.model, cfg.annotated)
    ds = dsd[cfg.split]
    if len(ds) == 0:
        raise CoregError(f"{cfg.annotated}: the {cfg.split!r} split is empty; nothing to evaluate")
    out = Path(cfg.out) if cfg.out else default_out(cfg.model, cfg.split)
    check_out(out)
    return evaluate(cfg, ds, classes, info=read_annotation_info(cfg.annotated), out=out)


def merge_shards(parts: list[tuple[list[int], dict]], n: int) -> dict:
    """Per-net (n, C) arrays from each process's (row ids, per-net arrays); every row exactly once."""
    import numpy as np

    rows = np.concatenate([np.asarray(r, dtype=np.int64) for r, _ in parts])
    if len(rows) != n or not np.array_equal(np.sort(rows), np.arange(n)):
        raise RuntimeError(f"gathered {len(rows)} rows for a split of {n}: some rows missing or counted twice")
    names = parts[0][1].keys()
    merged = {k: np.concatenate([p[k] for _, p in parts]) for k in names}
    order = np.argsort(rows)
    return {k: v[order] for k, v in merged.items()}


def predict_rows(model, ds, rows: range, *, batch_size: int, num_workers: int = 2, progress: bool = True):
    """Per-net logits (len(rows), C) as numpy, and seconds per net, for `rows` of a dataset."""
    import torch

    from pipeline.data import decode_images

    per_net: dict[str, list] = {k: [] for k in model.nets}
    seconds = dict.fromkeys(model.nets, 0.0)
    for start in range(rows.start, rows.stop, _CHUNK):
        part = ds.select(range(start, min(start + _CHUNK, rows.stop)))
        x = decode_images(part, size=model.image_size, num_workers=num_workers, desc="decoding", progress=progress)
        logits, secs = model.logits_by_net(x, batch_size=batch_size)
        for k in model.nets:
            per_net[k].append(logits[k])
            seconds[k] += secs[k]
    c = len(model.classes)
    return {k: (torch.cat(v) if v else torch.zeros(0, c)).numpy() for k, v in per_net.items()}, seconds


def evaluate(cfg: EvaluateConfig, ds, classes: list[str], *, info: dict, out: Path) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    from pipeline.model_io import load_model
    from pipeline.training import Dist

    accelerator = Accelerator(cpu=cfg.cpu)
    main = accelerator.is_main_process
    model = load_model(cfg.model, device=accelerator.device)
    mine = Dist(rank=accelerator.process_index, world=accelerator.num_processes).shard(len(ds))
    logits, seconds = predict_rows(model, ds, mine, batch_size=cfg.batch_size, progress=main)
    parts = gather_object([(list(mine), logits, seconds)])
    if main:
        report_split(cfg, ds, classes, model=model, parts=parts, info=info, out=out, processes=accelerator.num_processes)
    accelerator.wait_for_everyone()  # every process returns once the report exists
    return out


def report_split(cfg, ds, classes, *, model, parts, info: dict, out: Path, processes: int) -> None:
    """Main process only: merge the shards, build the report, write it with its figures, print the summary."""
    from pipeline.report import print_summary, write_report

    mine = parts[0][0]
    per_net = merge_shards([(r, p) for r, p, _ in parts], len(ds))
    report = build_report(cfg, ds, classes, model=model, per_net=per_net, info=info, seconds=parts[0][2], rows_main=len(mine))
    report["processes"] = processes
    out.mkdir(parents=True, exist_ok=True)
    for f in REPORT_FILES:  # a re-run replaces the previous report entirely (no stale figure survives)
        (out / f).unlink(missing_ok=True)
    report["figures"] = write_figures(out, report, ds, per_net, model, limit=cfg.overrule_sheet)
    write_report(out, report)
    print_summary(report, out)


def _columns(ds, classes):
    import numpy as np

    from pipeline.schema import candidate_matrix

    cols = ds.select_columns(["label", "vlm_pred", "candidates"]).to_dict()
    return (
        np.asarray(cols["label"], dtype=np.int64),
        np.asarray(cols["vlm_pred"], dtype=np.int64),
        candidate_matrix(cols["candidates"], len(classes)),
    )


def build_report(cfg, ds, classes, *, model, per_net: dict, info: dict, seconds: dict, rows_main: int) -> dict:
    """Everything of report.json except the figures: quality from the merged logits, cost from timing."""
    import torch

    from pipeline.cost import measure_vlm, ratios, student_cost, time_student, vlm_from_info
    from pipeline.metrics import evaluate_predictions

    label, vlm_pred, cands = _columns(ds, classes)
    t = {k: torch.from_numpy(v) for k, v in per_net.items()}
    default = model.combine(t).argmax(1).numpy()
    variants = {}
    if len(model.nets) == 2:
        variants["ensemble"] = model.combine(t, "ensemble").argmax(1).numpy()
    for k in model.nets:
        variants[k] = t[k].argmax(1).numpy()
    quality = evaluate_predictions(
        student_pred=default, vlm_pred=vlm_pred, label=label, candidates=cands, classes=classes, variants=variants
    )
    speed_sample = [im.convert("RGB") for im in ds.select(range(min(len(ds), SPEED_IMAGES)))["image"]]
    student = student_cost(model)
    default_nets = student["nets"]
    student.update(
        images_per_second=time_student(model, speed_sample, batch_size=cfg.batch_size),
        batch_images_per_second=rows_main / max(sum(seconds[k] for k in default_nets), 1e-9),
        timed_images=len(speed_sample),
        device=str(model.device),
        batch_size=cfg.batch_size,
    )
    vlm = vlm_from_info(info)
    why_not = "--no-measure-vlm given"
    if cfg.measure_vlm:
        measured, why_not = measure_vlm(info, classes, speed_sample, device=model.device, batch_size=cfg.batch_size)
        vlm.update(measured)
    notes = _notes(cfg, quality, vlm, why_not)
    return {
        "split": cfg.split,
        **quality,
        "labels_known": quality["labeled"] > 0,
        "predict_with": model.config["predict_with"],
        "method": model.config["method"],
        "classes": list(classes),
        "cost": {"student": student, "vlm": vlm, **ratios(student, vlm)},
        "notes": notes,
        "model": str(cfg.model),
        "annotated": str(cfg.annotated),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": model.config.get("versions", {}),
    }


def _notes(cfg, q: dict, vlm: dict, why_not: str | None) -> list[str]:
    notes = []
    if cfg.split == "train" and q["labeled"]:
        notes.append(
            "Evaluated on the training split: this measures how well the student purified its own training "
            "labels (ground truth was used here for diagnostics only, never for training)."
        )
    if q["labeled"] == 0:
        notes.append(
            f"No image of the {cfg.split!r} split has a label, so accuracy, per-class accuracy and candidate "
            "coverage cannot be measured. Give labels with class sub-folders (or a labeled --test-dir) to measure them."
        )
    elif q["labeled"] < q["n"]:
        notes.append(f"Accuracies use the {q['labeled']} labeled rows of {q['n']}; the rest count only in agreement and distributions.")
    if vlm.get("annotator") == "synthetic":
        notes.append(
            "The annotation is synthetic (candidate sets drawn from the true labels with controlled noise), so "
            "the 'VLM' column is that generator's top-1 and there is no VLM cost to compare with."
        )
    elif vlm.get("source") == "annotation.json":
        notes.append(f"VLM speed and size taken from annotation.json, not measured here: {why_not}.")
    elif vlm.get("source") is None:
        notes.append(f"The VLM's speed is unknown: not measured here ({why_not}) and absent from annotation.json.")
    elif vlm.get("annotator") == "clip":
        notes.append(
            "VLM parameters count CLIP's image encoder only: per image, zero-shot CLIP runs just that tower "
            f"(the whole model, text encoder included, has {vlm['parameters_total']:,})."
        )
    if not vlm.get("parameters") and vlm.get("annotator") != "synthetic":
        notes.append("The VLM's parameter count is unknown, so the size ratio is not given.")
    notes += _missing_classes_note(q.get("prediction_counts", {}), q.get("vlm_prediction_counts", {}))
    return notes


def _missing_classes_note(student: dict, vlm: dict) -> list[str]:
    """Label-free collapse check: classes the VLM predicts on this split but the student never does."""
    missing = [c for c, n in student.items() if n == 0 and vlm.get(c, 0) > 0]
    if not missing:
        return []
    shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
    return [
        f"The student never predicts {len(missing)} of the {len(student)} classes that the VLM predicts here "
        f"({shown}): a class collapse during training (see the README, 'Class collapse'); compare with "
        "another --method, e.g. kd or ce."
    ]


def write_figures(out: Path, r: dict, ds, per_net: dict, model, *, limit: int) -> dict[str, str]:
    """The PNGs of the report; returns figure key -> file name (relative to out, as report.md links them)."""
    import numpy as np
    import torch

    from pipeline import figures
    from pipeline.metrics import confusion_matrix, overrule_rows

    classes = r["classes"]
    label, vlm_pred, cands = _columns(ds, classes)
    probs = model.combine({k: torch.from_numpy(v) for k, v in per_net.items()}).softmax(1).numpy()  # (N, C)
    pred = probs.argmax(1)
    made = {}
    if r["labels_known"]:
        c = len(classes)
        figures.confusion_png(confusion_matrix(label, pred, c), classes, "Student", out / "confusion_student.png")
        figures.confusion_png(confusion_matrix(label, vlm_pred, c), classes, "VLM zero-shot", out / "confusion_vlm.png")
        made.update(confusion_student="confusion_student.png", confusion_vlm="confusion_vlm.png")
    figures.distribution_png(list(r["prediction_counts"].values()), list(r["vlm_prediction_counts"].values()), classes, out / "distribution.png")
    made["distribution"] = "distribution.png"
    rows = overrule_rows(pred, vlm_pred, cands, probs.max(1), limit)
    if len(rows):
        images = ds.select(rows.tolist())["image"]
        captions, colors = [], []
        for i in rows:
            cand = ",".join(classes[j][:10] for j in np.flatnonzero(cands[i])) or "(empty)"
            outside = "" if cands[i, pred[i]] else " [outside]"
            cap = f"S: {classes[pred[i]][:14]} ({probs[i, pred[i]]:.2f}){outside}\nV: {classes[vlm_pred[i]][:14]}\ncand: {cand[:24]}"
            if label[i] >= 0:
                cap += f"\ntrue: {classes[label[i]][:14]}"
            captions.append(cap)
            colors.append("black" if label[i] < 0 else "green" if label[i] == pred[i] else "red")
        figures.contact_sheet_png(images, captions, colors, out / "overrules.png")
        made["overrules"] = "overrules.png"
    return made
