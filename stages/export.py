"""`coreg export MODEL --format onnx|torchscript [--out FILE]`: the student as one self-contained file.

The exported graph takes what `image_to_tensor` makes: uint8 RGB images (B, 3, image_size, image_size) made
by the preprocessing in config.json (resize shorter side, centre crop). It includes the /255, the
normalisation, the network combination (`predict_with`) and the softmax, and returns class probabilities
(B, C) equal to `coreg predict`'s. A JSON sidecar (FILE.json) names the classes and documents the input; the
ONNX file carries the same facts in its metadata. Each export is checked against the PyTorch model before
it is kept.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from pipeline.errors import CoregError

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
TOLERANCE = 1e-4  # max |probability difference| accepted between the export and the PyTorch model
INPUT_NAME, OUTPUT_NAME = "image", "probs"


def build_wrapper(model, which: str = "default"):
    """An nn.Module: uint8 (B, 3, S, S) -> probabilities (B, C), everything `predict` does after decoding."""
    import torch
    from torch import nn

    names = model._which(which)

    class Exported(nn.Module):
        def __init__(self):
            super().__init__()
            self.nets = nn.ModuleList([model.nets[n] for n in names])
            self.register_buffer("mean", model.mean.detach().cpu().clone())  # (1, 3, 1, 1)
            self.register_buffer("std", model.std.detach().cpu().clone())

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            x = (image.float() / 255 - self.mean) / self.std  # (B, 3, S, S)
            logits = self.nets[0](x)  # (B, C)
            for net in self.nets[1:]:
                logits = logits + net(x)  # the ensemble sums logits, as StudentModel.logits does
            return logits.softmax(dim=1)

    return Exported().eval()


def describe(model, fmt: str, path: Path) -> dict:
    """The sidecar: everything a user of the exported file needs besides the file itself."""
    s = model.image_size
    return {
        "format": fmt,
        "file": path.name,
        "classes": model.classes,
        "input": {
            "name": INPUT_NAME,
            "dtype": "uint8",
            "shape": ["batch", 3, s, s],
            "layout": "RGB, channels first, values 0..255",
            "preprocessing": model.config["preprocessing"],
        },
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", len(model.classes)], "meaning": "class probabilities (softmax), columns in `classes` order"},
        "included": f"x/255, (x - mean) / std with mean={model.config['mean']} std={model.config['std']}, networks {model._which('default')} (logits summed), softmax",
        "image_size": s,
        "predict_with": model.config["predict_with"],
    }


def _ignore_tracer_warnings() -> None:
    import torch

    # GroupNorm's batch-size sanity check reads a shape as a Python bool while tracing; it only guards against
    # a batch of one value per group, so freezing it does not change results (the export check below proves it).
    warnings.simplefilter("ignore", torch.jit.TracerWarning)


def _export_onnx(wrapper, example, path: Path, meta: dict) -> None:
    import onnx
    import torch

    with warnings.catch_warnings():
        # The torch.export-based exporter needs onnxscript, which is not a dependency; the TorchScript-based
        # one handles these plain conv nets exactly and only warns that it is no longer the default.
        warnings.simplefilter("ignore", DeprecationWarning)
        _ignore_tracer_warnings()
        torch.onnx.export(
            wrapper, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=17, dynamo=False,
        )  # fmt: skip
    proto = onnx.load(str(path))
    for k in ("classes", "input", "output", "included"):
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, json.dumps(meta[k])
    onnx.save(proto, str(path))


def _run_onnx(path: Path, x):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {INPUT_NAME: x.numpy()})[0]


def _export_torchscript(wrapper, example, path: Path, meta: dict) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated but still the portable format
        _ignore_tracer_warnings()
        traced = torch.jit.trace(wrapper, (example,))
        torch.jit.save(traced, str(path), _extra_files={"coreg.json": json.dumps(meta)})


def _run_torchscript(path: Path, x):
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.inference_mode():
        return module(x).numpy()


def default_out(model_dir: str | Path, fmt: str) -> Path:
    return Path(model_dir) / f"model{FORMATS[fmt]}"


def export(model, fmt: str, path: Path) -> Path:
    """Write the export and its sidecar; verify it reproduces model.probs on random images (CPU)."""
    import numpy as np
    import torch

    wrapper = build_wrapper(model)
    s = model.image_size
    gen = torch.Generator().manual_seed(0)
    example = torch.randint(0, 256, (2, 3, s, s), dtype=torch.uint8, generator=gen)  # (2, 3, S, S)
    check = torch.randint(0, 256, (5, 3, s, s), dtype=torch.uint8, generator=gen)  # a different batch size
    meta = describe(model, fmt, path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        (_export_onnx if fmt == "onnx" else _export_torchscript)(wrapper, example, tmp, meta)
        got = (_run_onnx if fmt == "onnx" else _run_torchscript)(tmp, check)
        want = model.probs(check).cpu().numpy()
        err = float(np.abs(got - want).max())
        if not err <= TOLERANCE:
            raise CoregError(f"the {fmt} export differs from the model by {err:.2e} (> {TOLERANCE}); please report this")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    meta["max_abs_difference_at_export"] = err
    path.with_name(path.name + ".json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


# What each format needs beyond the base install (pyproject.toml's `export` extra), to name it in one line
# instead of a ModuleNotFoundError traceback after the README's plain `pip install -e .`.
NEEDS = {"onnx": ("onnx", "onnxruntime"), "torchscript": ()}


def _check_installed(fmt: str) -> None:
    import importlib.util

    missing = [m for m in NEEDS[fmt] if importlib.util.find_spec(m) is None]
    if missing:
        raise CoregError(
            f"--format {fmt} needs {' and '.join(missing)}, which the base install leaves out; install the export "
            f'extra with `pip install -e ".[export]"` (or `pip install {" ".join(NEEDS[fmt])}`), or use --format torchscript'
        )


def run(*, model: str, format: str = "onnx", out: str | None = None) -> Path:
    """Disk → disk: MODEL → FILE (+ FILE.json)."""
    from pipeline.model_io import load_model, read_model_config

    if format not in FORMATS:
        raise CoregError(f"--format {format!r} is unknown; choose one of: {', '.join(FORMATS)}")
    read_model_config(model)  # a missing or incomplete model directory is the first thing to report
    _check_installed(format)
    path = Path(out) if out else default_out(model, format)
    if path.is_dir():
        raise CoregError(f"{path}: is a folder; give a file name for the export (--out FILE{FORMATS[format]})")
    sidecar = path.with_name(path.name + ".json")
    if path.exists() and not sidecar.exists():
        raise CoregError(f"{path}: exists and was not written by `coreg export`; choose another --out")
    if not path.parent.is_dir():
        raise CoregError(f"{path.parent}: folder does not exist; create it or choose another --out")
    m = load_model(model, device="cpu")  # export traces on CPU: the file then runs anywhere
    export(m, format, path)
    print(f"{format} model written to {path} (input: uint8 RGB (batch, 3, {m.image_size}, {m.image_size}); details in {sidecar.name})")
    return path
