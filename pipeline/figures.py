"""The report's PNG figures (matplotlib, headless): confusion matrices, prediction distribution, and the
contact sheet of rows where the student overrules the VLM."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

_DPI = 110


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI; must be chosen before pyplot is imported
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    _plt().close(fig)
    return path


def confusion_png(cm: np.ndarray, classes: list[str], title: str, path: str | Path) -> Path:
    """Row-normalised confusion matrix (rows = truth), with the raw counts written in the cells."""
    plt = _plt()
    c = len(classes)
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    side = min(14.0, 2.5 + 0.45 * c)
    fig, ax = plt.subplots(figsize=(side, side))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(c), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(c), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if c <= 30:  # numbers in cells stay legible up to about 30 classes
        for i in range(c):
            for j in range(c):
                if cm[i, j]:
                    color = "white" if norm[i, j] > 0.5 else "black"
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    return _save(fig, Path(path))


def distribution_png(student: list[int], vlm: list[int], classes: list[str], path: str | Path) -> Path:
    """Side-by-side bars: how many rows each predictor assigns to each class."""
    plt = _plt()
    c = len(classes)
    x = np.arange(c)
    fig, ax = plt.subplots(figsize=(min(16.0, 3 + 0.5 * c), 3.5))
    ax.bar(x - 0.2, vlm, width=0.4, label="VLM zero-shot", color="#bbbbbb")
    ax.bar(x + 0.2, student, width=0.4, label="student", color="#1f77b4")
    ax.set_xticks(x, classes, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("images")
    ax.set_title("Predicted class distribution")
    ax.legend()
    return _save(fig, Path(path))


def contact_sheet_png(images: list, captions: list[str], colors: list[str], path: str | Path, *, cols: int = 8) -> Path:
    """A grid of thumbnails (PIL images) with a caption under each; caption colour flags right/wrong."""
    plt = _plt()
    n = len(images)
    cols = max(1, min(cols, n))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.7 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, cap, color in zip(axes.flat, images, captions, colors, strict=False):
        thumb = img.convert("RGB")
        thumb.thumbnail((128, 128))
        ax.imshow(np.asarray(thumb))
        ax.set_title(cap, fontsize=6.5, color=color, loc="left", pad=2)
    # A wide gap between rows and a caption hugging its image, so each caption reads as the one below it.
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.45 / (2.7 * rows), wspace=0.08, hspace=0.55)
    return _save(fig, Path(path))
