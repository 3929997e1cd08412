"""The Annotator protocol: images in, an (N, C) class distribution and per-prompt top-1 votes out.

Every annotator takes built objects in its constructor (so tests inject tiny random models) and has a
`from_pretrained` factory; `annotators/factory.py` picks one by name. This module imports no concrete
annotator (they import it), so the package's import graph has no cycle. The work is split in two so decoding and model compute can overlap:
`prepare(img)` is the per-image CPU step (resize, crop; thread-safe, runs in the decoding threads) and
`score(items)` runs the model on a batch of prepared items.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from pipeline.errors import CoregError

if TYPE_CHECKING:
    import torch
    from PIL import Image


@dataclass
class Scores:
    """One batch's annotation. `votes` holds -1 where a prompt gave no usable answer (LLaVA only)."""

    probs: np.ndarray  # (N, C) float32, rows sum to 1: the annotator's class distribution -> vlm_probs
    votes: np.ndarray  # (N, P) int32, each prompt's top-1 class -> the union rule and the `votes` column
    answers: list[list[str]] | None = None  # (N, P) raw text answers, for annotators that talk
    unparsed: int = 0  # answers that named no class (counted, never guessed)


class Annotator(Protocol):
    name: str  # "clip" | "llava"
    classes: list[str]
    prompts: list[str]  # the prompt templates or question wordings, one vote each

    def spec(self) -> dict:
        """Provenance for annotation.json: annotator, model, pretrained, parameters, weights_bytes, precision."""

    def prepare(self, img: Image.Image) -> Any:
        """Per-image CPU work on an RGB image; must be thread-safe."""

    def score(self, items: list) -> Scores:
        """Run the model on a batch of prepared items."""


def annotate_images(annotator: Annotator, images: list, *, batch_size: int) -> Scores:
    """The in-memory annotation of RGB PIL images (no files, no shards): used by tests and for timing."""
    parts = [annotator.score([annotator.prepare(im) for im in images[i : i + batch_size]]) for i in range(0, len(images), batch_size)]
    return concat_scores(parts, len(annotator.classes), len(annotator.prompts))


def concat_scores(parts: list[Scores], n_classes: int, n_prompts: int) -> Scores:
    if not parts:
        return Scores(np.zeros((0, n_classes), np.float32), np.zeros((0, n_prompts), np.int32))
    answers = [a for p in parts for a in p.answers] if parts[0].answers is not None else None
    return Scores(
        np.concatenate([p.probs for p in parts]),
        np.concatenate([p.votes for p in parts]),
        answers,
        sum(p.unparsed for p in parts),
    )


def resolve_device(device: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps' -> torch.device, or a CoregError saying what is available."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CoregError(f"--device {device!r}: unknown device; use auto | cpu | cuda | cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CoregError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CoregError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def count_parameters(module) -> tuple[int, int]:
    """(parameters, bytes of weights)."""
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def fingerprint(path: str | Path) -> dict:
    """Identity of local weights for the cache key: every file's size and mtime (hashing GBs is too slow)."""
    p = Path(path)
    files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
    return {str(f.relative_to(p) if p.is_dir() else f.name): [f.stat().st_size, f.stat().st_mtime_ns] for f in files}


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("coreg", "torch", "open_clip_torch", "transformers", "datasets", "pillow", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    out["python"] = platform.python_version()
    return out
