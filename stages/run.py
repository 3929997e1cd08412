"""`coreg run IMAGES OUT`: annotate → train → evaluate in one command, resumable.

OUT/annotated, OUT/model and OUT/report are the three stages' ordinary outputs; OUT/run.json records, per
stage, a fingerprint of its options and of its input (for annotate: the files under IMAGES; for train: the
annotate fingerprint; for evaluate: the train fingerprint). Re-running the same command:

- keeps a finished stage whose fingerprint is unchanged;
- continues an interrupted stage: annotate resumes by itself from its shard cache, train with `resume=True`
  from OUT/model/checkpoint.pt of the same annotation wherever `coreg train --resume` would accept it (the
  options of the epochs already run unchanged, as the preset resolves them; see `resumable`);
- redoes a stage whose options or input changed, after removing its old output (and then every later stage,
  because their input fingerprints change with it).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from pipeline.config import AnnotateConfig, EvaluateConfig, TrainConfig
from pipeline.errors import CoregError

RUN_FILE = "run.json"
OWNED = {"annotated", "model", "report", RUN_FILE}
# Options that change neither a stage's result nor its resumability: they do not enter the fingerprints.
ANNOTATE_FREE = {"out", "num_workers", "batch_size", "llava_batch_size", "device", "shard_size"}
# Options read by one annotator only: changing --seed (shared with train) must not redo a CLIP annotation.
ANNOTATOR_OPTIONS = {"clip": {"templates"}, "llava": {"questions", "max_new_tokens"}, "synthetic": {"noise", "seed"}}
EVALUATE_FREE = {"model", "annotated", "out", "batch_size", "cpu"}


def _stat_signature(path: Path, exclude: Path | None = None) -> list:
    """(relative path, size, mtime) of every file under a folder, or of one file: cheap, stat only."""
    if path.is_file():
        st = path.stat()
        return [[path.name, st.st_size, st.st_mtime_ns]]
    rows = []
    for dirpath, dirnames, filenames in os.walk(path):
        d = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if exclude is None or (d / n).resolve() != exclude)
        for name in sorted(filenames):
            st = (d / name).stat()
            rows.append([str((d / name).relative_to(path)), st.st_size, st.st_mtime_ns])
    return rows


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def annotate_fingerprint(cfg: AnnotateConfig, out: Path) -> str:
    """Options plus the files they point to (IMAGES, --test-dir, --classes-file, template or weight files)."""
    others = set().union(*(v for k, v in ANNOTATOR_OPTIONS.items() if k != cfg.annotator))
    mine = ANNOTATOR_OPTIONS.get(cfg.annotator, set())
    free = ANNOTATE_FREE | (others - mine)
    options = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in free}
    files = {}
    for key, value in options.items():
        if isinstance(value, str) and value and Path(value).exists():
            files[key] = _stat_signature(Path(value), exclude=out.resolve())
    return fingerprint({"options": options, "files": files})


def _train_options(train_kwargs: dict, annotated: Path, model: Path) -> TrainConfig:
    from pipeline.config import from_dict

    return from_dict(TrainConfig, {**train_kwargs, "annotated": str(annotated), "out": str(model), "resume": False})


def train_fingerprint(cfg: TrainConfig, data_fp: str) -> str:
    """Decides "finished and unchanged": every option that can change the model, and the annotation."""
    opts = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in {"annotated", "out", "resume"}}
    return fingerprint({"options": opts, "data": data_fp})


def resumable(cfg: TrainConfig, annotated: Path, model: Path) -> bool:
    """Would `coreg train --resume` continue MODEL's checkpoint with these options? The same question train asks
    (pipeline/checkpoint.check_resumable) of the same resolved options: the preset's values as train derives them
    (from the row count, the run length and the annotation's skew), so a run continues exactly when train can
    continue it, and starts over (never fails) when train would refuse."""
    from pipeline.checkpoint import check_resumable
    from pipeline.schema import load_annotated
    from stages.train import annotation_skew, resolve_preset, resolved_config

    try:
        train_ds = load_annotated(annotated, stage="coreg run", check_rows=False)[0]["train"]
        full = resolve_preset(cfg, n_rows=len(train_ds), quiet=True, skew=functools.cache(lambda: annotation_skew(train_ds)))
        check_resumable(model, resolved_config(full, train_ds))
    except CoregError:  # other options, no checkpoint or an unreadable one: train from scratch
        return False
    return True


class RunState:
    """OUT/run.json: one record per stage, written after every change (atomically)."""

    def __init__(self, out: Path, images: str):
        self.path = out / RUN_FILE
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.data.setdefault("stages", {})
        self.data["images"] = images

    def get(self, stage: str) -> dict:
        return self.data["stages"].get(stage, {})

    def done(self, stage: str, fp: str) -> bool:
        rec = self.get(stage)
        return rec.get("status") == "done" and rec.get("fingerprint") == fp

    def set(self, stage: str, **record) -> None:
        from pipeline.model_io import atomic_write_text

        self.data["stages"][stage] = {**record, "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        atomic_write_text(self.path, json.dumps(self.data, indent=2) + "\n")


def check_out(out: Path, images: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CoregError(f"{out}: exists and is a file; choose a folder for the run")
    if out.resolve() == images.resolve() or images.resolve() in out.resolve().parents:
        raise CoregError(f"{out}: lies inside IMAGES ({images}); choose an OUT outside the image folder")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in OWNED)
        if foreign:
            raise CoregError(
                f"{out}: holds files that `coreg run` did not write ({', '.join(foreign[:3])}); "
                "choose an empty or new OUT, or the OUT of an earlier `coreg run`"
            )


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def run(*, annotate: AnnotateConfig, train_kwargs: dict, evaluate_kwargs: dict) -> Path:
    """Disk → disk: IMAGES → OUT/{annotated, model, report}. Returns OUT."""
    images, out = Path(annotate.images), Path(annotate.out)
    if not images.is_dir():
        raise CoregError(f"{images}: image folder not found")
    check_out(out, images)
    from stages import annotate as annotate_stage
    from stages import evaluate as evaluate_stage
    from stages import train as train_stage

    annotated, model, report = out / "annotated", out / "model", out / "report"
    # Every stage's options before any work: a bad training or evaluation option must not surface only after
    # a long annotation.
    a_cfg = dataclasses.replace(annotate, out=str(annotated))
    annotate_stage.check_options(a_cfg)
    t_cfg = _train_options(train_kwargs, annotated, model)
    train_stage.check_options(t_cfg)
    from pipeline.config import check, from_dict

    check(from_dict(EvaluateConfig, {**evaluate_kwargs, "model": str(model), "annotated": str(annotated), "out": str(report)}))
    from accelerate import PartialState

    # Under `accelerate launch` only the main process touches OUT's bookkeeping. The shared state is created
    # with train's --cpu so the later stages' Accelerators find it already on the device they ask for.
    dist = PartialState(cpu=bool(train_kwargs.get("cpu", False)))
    main = dist.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
    dist.wait_for_everyone()
    state = RunState(out, str(images))
    log = []

    # --- annotate -------------------------------------------------------------------------------------
    a_fp = annotate_fingerprint(a_cfg, out)
    if state.done("annotate", a_fp) and (annotated / "dataset_dict.json").is_file():
        log.append("annotate: kept (finished, options and images unchanged)")
    else:
        rec = state.get("annotate")
        if main and rec.get("fingerprint") not in (None, a_fp):
            _remove(annotated)  # other options or images: its shard cache must not be reused
        how = "continued" if annotated.exists() and rec.get("fingerprint") == a_fp else "done"
        _stage(state, main, dist, "annotate", a_fp, lambda: annotate_stage.run(a_cfg))
        log.append(f"annotate: {how}")

    # --- train ----------------------------------------------------------------------------------------
    t_fp = train_fingerprint(t_cfg, a_fp)
    if state.done("train", t_fp) and (model / "config.json").is_file():
        log.append("train: kept (finished, options and data unchanged)")
    else:
        from pipeline.checkpoint import CHECKPOINT

        # a checkpoint of the same annotation, continued where train would continue it
        had = state.get("train").get("data") == a_fp and (model / CHECKPOINT).is_file()
        resume = had and resumable(t_cfg, annotated, model)
        if main and not resume:
            _remove(model)  # a different run or no checkpoint: train from scratch into an empty folder
        dist.wait_for_everyone()
        cfg = dataclasses.replace(t_cfg, resume=resume)
        _stage(state, main, dist, "train", t_fp, lambda: train_stage.run(cfg), data=a_fp)
        how = "resumed from its checkpoint" if resume else "started over (its checkpoint was written with other options)" if had else "done"
        log.append(f"train: {how}")

    # --- evaluate -------------------------------------------------------------------------------------
    e_cfg, note = _evaluate_options(evaluate_kwargs, annotated, model, report)
    e_opts = {k: v for k, v in dataclasses.asdict(e_cfg).items() if k not in EVALUATE_FREE}
    e_fp = fingerprint({"options": e_opts, "model": t_fp})
    if state.done("evaluate", e_fp) and (report / "report.json").is_file():
        log.append("evaluate: kept (finished, model and options unchanged)")
    else:
        if main:
            _remove(report)
        dist.wait_for_everyone()
        _stage(state, main, dist, "evaluate", e_fp, lambda: evaluate_stage.run(e_cfg))
        log.append("evaluate: done")
    if main:
        print_summary(out, log, note)
    return out


def _stage(state: RunState, main: bool, dist, name: str, fp: str, fn, **extra) -> None:
    """Run one stage between a 'running' and a 'done' record, so an interruption is recognisable."""
    t0 = time.perf_counter()
    if main:
        state.set(name, fingerprint=fp, status="running", **extra)
    dist.wait_for_everyone()
    fn()
    dist.wait_for_everyone()
    if main:
        state.set(name, fingerprint=fp, status="done", seconds=round(time.perf_counter() - t0, 1), **extra)


def _evaluate_options(kwargs: dict, annotated: Path, model: Path, report: Path) -> tuple[EvaluateConfig, str | None]:
    """The test split when the data has a non-empty one, else the train split (and a note saying what that means)."""
    from pipeline.config import from_dict
    from pipeline.schema import load_annotated

    dsd, _ = load_annotated(annotated, stage="coreg run", check_rows=False)
    split, note = kwargs.get("split") or "test", None
    if split not in dsd or len(dsd[split]) == 0:
        if split != "test":
            raise CoregError(f"--split {split!r}: {annotated} has no such split (it has {', '.join(sorted(dsd))})")
        split = "train"
        note = "No test split: evaluated on the training images."
    cfg = from_dict(EvaluateConfig, {**kwargs, "model": str(model), "annotated": str(annotated), "out": str(report), "split": split})
    return cfg, note


def print_summary(out: Path, log: list[str], note: str | None) -> None:
    r = json.loads((out / "report" / "report.json").read_text())
    from pipeline.report import headline, human_bytes, human_count, pct, points

    s = r["cost"]["student"]
    lines = ["", f"coreg run finished: {out}", *[f"  {x}" for x in log], ""]
    lines.append(f"  student: {out / 'model'} ({s['arch']}, {human_count(s['parameters'])} parameters, {human_bytes(s['weights_bytes'])})")
    lines.append(f"  report:  {out / 'report' / 'report.md'}")
    if r["labels_known"]:
        lines.append(
            f"  {r['split']} accuracy: student {pct(r['student_accuracy'])} vs VLM zero-shot {pct(r['zero_shot_accuracy'])} "
            f"({points(r['gain_over_zero_shot'])}) on {r['labeled']} labeled images"
        )
        lines.append(f"  {headline(r)}")
    else:
        lines.append(
            f"  accuracy could not be measured (no labels); the student agrees with the VLM on {pct(r['agreement_with_vlm'])} "
            "of the images. Give class sub-folders or --test-dir to measure it."
        )
    if note and r["labels_known"]:
        note += (
            " This measures how well the student purified its training labels (ground truth used for "
            "diagnostics only, never for training)."
        )
    if note:
        lines.append(f"  note: {note}")
    lines += [
        "",
        f"  predict: coreg predict {out / 'model'} IMAGES... --out predictions.csv",
        f"  export:  coreg export {out / 'model'} --format onnx",
    ]
    print("\n".join(lines))
