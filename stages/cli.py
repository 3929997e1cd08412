"""The `coreg` command line: a thin typer app over the stages (`python -m stages.cli` = `coreg`).

It belongs to the application, beside the stages it calls, not to the library: `pipeline` never imports
`stages` (docs/design.md, Layout). Options are generated from the config dataclasses in `pipeline/config.py`,
so the CLI, the defaults and the resolved config written beside each output can never drift apart. Heavy
libraries (torch, open_clip, transformers, datasets) are imported inside the commands: `coreg --help` stays
instant.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Callable
from typing import Any, Optional

import typer

from pipeline import config as C
from pipeline.errors import CoregError
from pipeline.messages import install as _install_warnings

_install_warnings()  # library warnings users would see raw become one line each

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Distil a vision-language model into a small classifier without manual labels (Co-Reg).",
)

_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "str | None": Optional[str],  # noqa: UP045
          "int | None": Optional[int], "float | None": Optional[float], "bool | None": Optional[bool]}  # noqa: UP045


def _params(cls, *, prefix_skip: tuple[str, ...] = (), skip: tuple[str, ...] = (), positional: bool = True):
    """typer parameters for a config dataclass: required fields become arguments, the rest options."""
    params = []
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name in prefix_skip:
            continue
        typ = _TYPES.get(str(f.type), str)
        required = f.default is dataclasses.MISSING
        help_ = " ".join(x for x in (f.metadata.get("help", ""), C.describe(f)) if x)  # the values it takes
        if required and positional:
            default = typer.Argument(..., help=help_, show_default=False)
        elif required:
            continue
        else:
            default = typer.Option(f.default, help=help_, rich_help_panel=f.metadata.get("panel"))
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=typ))
    return params


# What works after Ctrl-C, per command: one instruction, printed once (the stages print no hint of their own).
_RESTART = "nothing is kept; run the command again to start it over"
_RESUME_HINT = {
    "train": "the last saved epoch is kept; to continue, run the same command with --resume",
    "annotate": "finished shards are saved; run the same command again to continue",
    "run": "finished work is saved; run the same command again to continue",
}


def _command(name: str, params: list[inspect.Parameter], body: Callable[[dict], Any], help_: str):
    """Register a typer command whose signature is `params` and which calls body(kwargs)."""

    def cmd(**kwargs):
        try:
            body(kwargs)
            _close_process_group()
        except CoregError as e:
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.secho(f"interrupted: {_RESUME_HINT.get(name, _RESTART)}", err=True)
            raise typer.Exit(130) from None

    cmd.__signature__ = inspect.Signature(params)
    cmd.__annotations__ = {p.name: p.annotation for p in params}
    cmd.__doc__ = help_
    cmd.__name__ = name
    app.command(name, help=help_)(cmd)


def _close_process_group() -> None:
    """After a successful multi-process command (torchrun / accelerate launch): wait for every process, then
    destroy the process group. A process that exits with the group still open can abort on the way out
    ("terminate called without an active exception"), failing a run whose work was complete."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _pick(cls, kwargs: dict, **overrides):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in kwargs.items() if k in names}, **overrides})


def _annotate(kw):
    from stages import annotate

    annotate.run(_pick(C.AnnotateConfig, kw))


def _train(kw):
    from stages import train

    train.run(_pick(C.TrainConfig, kw))


def _evaluate(kw):
    from stages import evaluate

    evaluate.run(_pick(C.EvaluateConfig, kw))


_command(
    "annotate",
    _params(C.AnnotateConfig),
    _annotate,
    "Annotate an image folder with a VLM: writes a dataset of candidate label sets (HF datasets on disk).",
)
_command(
    "train",
    _params(C.TrainConfig),
    _train,
    "Train the student pair with Co-Reg (or a baseline --method) on an annotated dataset.",
)
_command(
    "evaluate",
    _params(C.EvaluateConfig),
    _evaluate,
    "Compare the student with the VLM's zero-shot predictions: report.json, report.md and figures.",
)


_RUN_STAGES = (
    # (config, prefix for options whose name another stage also uses with another default, skipped fields)
    # no --resume: `coreg run` resumes every stage by itself (stages/run.py), an option would be ignored
    (C.TrainConfig, "", ("annotated", "out", "resume")),
    (C.AnnotateConfig, "annotate_", ()),
    (C.EvaluateConfig, "eval_", ("model", "annotated", "out")),
)


def _run_fields():
    """{cli name: (stage config, field name)} for `coreg run`. A field shared by stages with the same default
    (--seed, --cpu, --num-workers) is one option; with different defaults (--batch-size: train 256, annotate
    64, evaluate 256) train keeps the plain name and the others get a prefix (--annotate-batch-size)."""
    defaults: dict[str, object] = {}
    names: dict[str, list[tuple[type, str]]] = {}
    for cls, prefix, skip in _RUN_STAGES:
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            name = f.name
            if name in defaults and defaults[name] != f.default:
                name = prefix + f.name
            defaults.setdefault(name, f.default)
            names.setdefault(name, []).append((cls, f.name))
    return names


def _run_params():
    params, done = [], set()
    fields = _run_fields()
    for cls, _, skip in _RUN_STAGES:
        for p in _params(cls, skip=skip):
            name = next(n for n, targets in fields.items() if (cls, p.name) in targets)
            if name not in done:
                done.add(name)
                params.append(p.replace(name=name))
    # IMAGES and OUT first; OUT here is the run's folder, not annotate's
    params.sort(key=lambda p: p.name not in ("images", "out"))
    run_out = typer.Argument(..., help="output folder: OUT/annotated, OUT/model, OUT/report (re-run the same command to resume)", show_default=False)
    return [p.replace(default=run_out) if p.name == "out" else p for p in params]


def _run(kw):
    from stages import run as run_stage

    per_stage: dict[type, dict] = {cls: {} for cls, _, _ in _RUN_STAGES}
    cli_names: dict[type, dict] = {cls: {} for cls, _, _ in _RUN_STAGES}
    for name, targets in _run_fields().items():
        for cls, field in targets:
            per_stage[cls][field] = kw[name]
            cli_names[cls][field] = name
    # Every stage's options before any work, named as `coreg run` spells them (the stages check again, with
    # their own names, when they start).
    for cls, values in per_stage.items():
        C.check(C.from_dict(cls, {"images": "", "annotated": "", "model": "", "out": "", **values}), cli_names[cls])
    run_stage.run(
        annotate=C.AnnotateConfig(**per_stage[C.AnnotateConfig]),
        train_kwargs=per_stage[C.TrainConfig],
        evaluate_kwargs=per_stage[C.EvaluateConfig],
    )


_command(
    "run",
    _run_params(),
    _run,
    "annotate -> train -> evaluate in one go: OUT/annotated, OUT/model, OUT/report. Re-run to resume.",
)


def _predict(kw):
    from stages import predict

    predict.run(C.PredictConfig(**{**kw, "inputs": tuple(kw["inputs"])}))


_predict_params = [
    inspect.Parameter("model", inspect.Parameter.KEYWORD_ONLY, default=typer.Argument(..., help="model directory"), annotation=str),
    inspect.Parameter(
        "inputs", inspect.Parameter.KEYWORD_ONLY, default=typer.Argument(..., help="image files or folders"), annotation=list[str]
    ),
    *_params(C.PredictConfig, skip=("model", "inputs"), positional=False),
]
_command("predict", _predict_params, _predict, "Classify images with a trained student: CSV of path, class, probability, top-k.")


def _export(kw):
    from stages import export

    export.run(**kw)


_export_params = [
    inspect.Parameter("model", inspect.Parameter.KEYWORD_ONLY, default=typer.Argument(..., help="model directory"), annotation=str),
    inspect.Parameter("format", inspect.Parameter.KEYWORD_ONLY, default=typer.Option("onnx", help="onnx | torchscript"), annotation=str),
    inspect.Parameter(
        "out", inspect.Parameter.KEYWORD_ONLY, default=typer.Option(None, help="output file; default MODEL/model.<ext>"), annotation=Optional[str]  # noqa: UP045
    ),
]
_command("export", _export_params, _export, "Export the student to ONNX or TorchScript (same probabilities as predict).")


def main() -> None:  # pragma: no cover - `python -m stages.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
