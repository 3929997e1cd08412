"""The model directory (DESIGN.md "Model directory"): `config.json` + `model.safetensors`.

`coreg train` writes it with `save_model`; `evaluate`, `predict` and `export` read it with `load_model` and
need nothing else. Weight keys are `<net>.<state_dict key>` (`net1.`, and `net2.` for two-network methods), so
one file holds the pair and the config says how to combine them (`predict_with`).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import CoregError

if TYPE_CHECKING:  # torch is heavy: imported inside the functions that need it
    from torch import Tensor

    from pipeline.networks import Student

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
REQUIRED_CONFIG_KEYS = (
    "classes", "arch", "image_size", "mean", "std", "proj_dim", "nets", "predict_with",
    "method", "preprocessing", "train_config", "seed", "versions",
)  # fmt: skip
PREDICT_WITH = ("ensemble", "net1", "net2")
# Prediction never uses the projection head (it only feeds the prototype/contrastive losses), so it is left
# out of the parameter and size counts that the report compares with the VLM.
_TRAIN_ONLY_PREFIXES = ("proj.",)
# How the exported models and `StudentModel.preprocess` read an image; written into config.json so a user of
# the directory alone can feed the network correctly.
INPUT_DOC = (
    "RGB image as uint8 (B, 3, image_size, image_size) made by `preprocessing`; as float: x / 255 in [0, 1]; "
    "then normalised per channel: (x - mean) / std"
)


def library_versions() -> dict[str, str]:
    """Versions worth recording beside a model (for config.json `versions`)."""
    import torch

    from pipeline import __version__

    return {"coreg": __version__, "torch": torch.__version__, "python": platform.python_version()}


def _atomic_write(path: Path, write) -> None:
    """write(tmp_path) then rename: a reader never sees half a file, even after a kill mid-write."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600 files; give the result the permissions a plain open() would (umask applied),
        # so a model directory stays readable by the people and services it is shared with.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)

    def write(tmp):
        Path(tmp).write_text(text)

    _atomic_write(path, write)


def _check_config(config: dict) -> None:
    missing = [k for k in REQUIRED_CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"model config lacks {missing}")
    nets = list(config["nets"])
    if nets not in (["net1"], ["net1", "net2"]):
        raise ValueError(f"config nets must be ['net1'] or ['net1', 'net2'], got {nets}")
    if config["predict_with"] not in PREDICT_WITH or (config["predict_with"] != "net1" and len(nets) == 1):
        raise ValueError(f"predict_with={config['predict_with']!r} is not possible with nets {nets}")
    if len(config["mean"]) != 3 or len(config["std"]) != 3:
        raise ValueError("mean and std need 3 values (RGB)")


def save_model(out_dir: str | Path, *, weights: dict[str, Tensor], config: dict) -> None:
    """Write `config.json` and `model.safetensors` into out_dir, each atomically (temp file + rename).

    `weights`: `net1.<key>` (and `net2.<key>`) -> tensor; `config`: see REQUIRED_CONFIG_KEYS. Raises
    ValueError when they disagree (a bug in the caller, not a user error).
    """
    from safetensors.torch import save_file

    _check_config(config)
    prefixes = {k.split(".", 1)[0] for k in weights}
    if prefixes != set(config["nets"]):
        raise ValueError(f"weight prefixes {sorted(prefixes)} differ from config nets {config['nets']}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared or non-contiguous storage (tied weights, views); plain CPU copies are safe.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in weights.items()}
    config = {**config, "input": config.get("input", INPUT_DOC), "classes": list(config["classes"])}
    # Weights first, config last: a directory with a config.json always has the weights it describes.
    _atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_text(out / CONFIG_FILE, json.dumps(config, indent=2, default=str) + "\n")


class StudentModel:
    """A loaded model directory: the networks in eval mode plus the preprocessing they were trained with."""

    def __init__(self, *, config: dict, nets: dict[str, Student], device, path: Path | None = None):
        import torch

        self.config = config
        self.path = path
        self.classes: list[str] = list(config["classes"])
        self.image_size: int = int(config["image_size"])
        self.nets = nets
        self.device = torch.device(device)
        self.mean = torch.tensor(config["mean"], dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(config["std"], dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    def _which(self, which: str) -> list[str]:
        if which == "default":
            which = self.config["predict_with"]
        if which == "ensemble":
            if len(self.nets) < 2:
                raise CoregError(f"this model has one network ({list(self.nets)}); 'ensemble' needs two")
            return ["net1", "net2"]
        if which not in self.nets:
            raise CoregError(f"this model has no network {which!r}; choose one of {list(self.nets)} or default")
        return [which]

    def preprocess(self, x: Tensor) -> Tensor:
        """uint8 (B, 3, S, S) in [0, 255], or float in [0, 1] -> normalised float on the model's device."""
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != (self.image_size, self.image_size):
            raise ValueError(f"expected images (B, 3, {self.image_size}, {self.image_size}), got {tuple(x.shape)}")
        x = x.to(self.device, non_blocking=True)
        x = x.float() / 255 if not x.is_floating_point() else x.float()  # (B, 3, S, S) in [0, 1]
        return (x - self.mean) / self.std

    def logits(self, x: Tensor, which: str = "default") -> Tensor:
        """(B, C) logits; the ensemble sums both networks' logits (as the paper's test code does)."""
        import torch

        names = self._which(which)
        with torch.inference_mode():
            x = self.preprocess(x)
            out = self.nets[names[0]](x)  # (B, C)
            for n in names[1:]:
                out = out + self.nets[n](x)
        return out.float()

    def probs(self, x: Tensor, which: str = "default") -> Tensor:
        return self.logits(x, which).softmax(dim=1)  # (B, C)

    def logits_by_net(self, x: Tensor, *, batch_size: int) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Each network's logits (N, C) on the CPU for uint8 images (N, 3, S, S), computed in batches, and the
        seconds each network took (device synchronised, preprocessing included), for throughput figures."""
        import time

        import torch

        out: dict[str, list[Tensor]] = {n: [] for n in self.nets}
        seconds = dict.fromkeys(self.nets, 0.0)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        with torch.inference_mode():
            for start in range(0, x.shape[0], batch_size):
                xb = x[start : start + batch_size]
                for name, net in self.nets.items():
                    sync()
                    t0 = time.perf_counter()
                    logits = net(self.preprocess(xb)).float()  # (B, C)
                    sync()
                    seconds[name] += time.perf_counter() - t0
                    out[name].append(logits.cpu())
        c = len(self.classes)
        return {n: torch.cat(v) if v else torch.zeros(0, c) for n, v in out.items()}, seconds

    def combine(self, per_net: dict[str, Tensor], which: str = "default") -> Tensor:
        """Logits of `which` from per-network logits (the ensemble is their sum, as in `logits`)."""
        names = self._which(which)
        out = per_net[names[0]]
        for n in names[1:]:
            out = out + per_net[n]
        return out

    def _inference_tensors(self, which: str):
        for n in self._which(which):
            for k, v in self.nets[n].state_dict().items():
                if not k.startswith(_TRAIN_ONLY_PREFIXES):
                    yield k, v

    def num_parameters(self, which: str = "default") -> int:
        """Parameters that prediction with `which` uses (the training-only projection head excluded)."""
        return sum(
            p.numel()
            for n in self._which(which)
            for k, p in self.nets[n].named_parameters()
            if not k.startswith(_TRAIN_ONLY_PREFIXES)
        )

    def weights_bytes(self, which: str = "default") -> int:
        """Bytes of the tensors (parameters and buffers) that prediction with `which` needs, as stored."""
        return sum(v.numel() * v.element_size() for _, v in self._inference_tensors(which))

    def file_bytes(self) -> int | None:
        """Size of model.safetensors on disk (all networks, projection heads included)."""
        return (self.path / WEIGHTS_FILE).stat().st_size if self.path else None


def read_model_config(model_dir: str | Path) -> dict:
    """config.json of a model directory, with clear errors for a missing or incomplete directory."""
    root = Path(model_dir)
    if not root.is_dir():
        raise CoregError(f"{root}: model directory not found; train one with `coreg train ANNOTATED {root}`")
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if not (root / f).is_file()]
    if missing:
        hint = (
            "training has not finished; continue it with `coreg train ... --resume`"
            if any(root.glob("checkpoint*"))
            else "point to the OUT folder of a finished `coreg train`"
        )
        raise CoregError(f"{root}: incomplete model directory, missing {' and '.join(missing)}; {hint}")
    try:
        config = json.loads((root / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise CoregError(f"{root / CONFIG_FILE}: not valid JSON ({e}); re-run `coreg train`") from None
    try:
        _check_config(config)
    except ValueError as e:
        raise CoregError(f"{root / CONFIG_FILE}: {e}; it was not written by `coreg train`") from None
    return config


def load_model(model_dir: str | Path, *, device="cpu") -> StudentModel:
    """Load a model directory onto `device`. Raises CoregError when it is missing, incomplete or inconsistent."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from pipeline.networks import build_student

    root = Path(model_dir)
    config = read_model_config(root)
    try:
        weights = load_file(str(root / WEIGHTS_FILE), device="cpu")
    except (SafetensorError, OSError) as e:
        raise CoregError(f"{root / WEIGHTS_FILE}: cannot read the weights ({e}); re-run `coreg train`") from None
    # A diverged run (written before training refused non-finite weights) predicts NaN for every image, and
    # evaluate would still report an accuracy: refuse it where every reader starts.
    bad = next((k for k, v in weights.items() if v.is_floating_point() and not bool(v.isfinite().all())), None)
    if bad is not None:
        raise CoregError(
            f"{root / WEIGHTS_FILE}: weight {bad} holds NaN or infinite values (training diverged); "
            "retrain with a lower --lr into a new folder"
        )
    nets: dict[str, Student] = {}
    for name in config["nets"]:
        net = build_student(
            config["arch"],
            num_classes=len(config["classes"]),
            image_size=int(config["image_size"]),
            proj_dim=int(config["proj_dim"]),
        )
        prefix = f"{name}."
        state = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            detail = "; ".join(line.strip() for line in first[1:3]) or first[0]
            raise CoregError(
                f"{root / WEIGHTS_FILE}: the {name} weights do not match config.json "
                f"(arch {config['arch']}, {len(config['classes'])} classes, {config['image_size']} px): {detail}"
            ) from None
        nets[name] = net.to(device).eval()
    extra = sorted({k.split(".", 1)[0] for k in weights} - set(config["nets"]))
    if extra:
        raise CoregError(f"{root / WEIGHTS_FILE}: holds networks {extra} that config.json does not list")
    return StudentModel(config=config, nets=nets, device=device, path=root)
