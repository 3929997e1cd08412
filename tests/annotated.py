"""Hand-made annotated datasets in the stage contract, for training tests (no VLM needed).

Images are class-coloured squares with noise, so a tiny network can learn them in a few epochs; candidate
sets hold the true class with probability 1 - eta plus random extra classes, like the paper's generator.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = [(220, 40, 40), (40, 200, 40), (40, 60, 220), (220, 200, 40), (200, 40, 200), (40, 200, 200)]


def class_image(rng: np.random.Generator, label: int, size: int) -> Image.Image:
    base = np.array(COLOURS[label % len(COLOURS)], dtype=np.float32)
    img = base[None, None, :] * rng.uniform(0.6, 1.0) + rng.normal(0, 25, (size, size, 3))
    if label >= len(COLOURS):  # more classes than colours: add a stripe pattern
        img[:: 1 + label // len(COLOURS)] *= 0.4
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_rows(
    n: int, classes: list[str], *, seed: int, size: int = 16, q: float = 0.2, eta: float = 0.1, labeled=True, trusted: int = 0
):
    rng = np.random.default_rng(seed)
    c = len(classes)
    rows = {k: [] for k in ("image", "path", "label", "trusted", "candidates", "vlm_probs", "vlm_pred")}
    for i in range(n):
        y = i % c
        cand = {j for j in range(c) if j != y and rng.random() < q}
        if rng.random() < eta:  # the true label misses the set: a noisy partial label
            others = [j for j in range(c) if j != y and j not in cand]
            if others:
                cand.add(int(rng.choice(others)))
        else:
            cand.add(y)
        cand = sorted(cand)
        probs = np.full(c, 0.02 / c, dtype=np.float32)
        probs[cand] += 0.98 / len(cand)
        probs /= probs.sum()
        rows["image"].append(class_image(rng, y, size))
        rows["path"].append(f"img_{i:04d}.png")
        rows["label"].append(y if (labeled or i < trusted) else -1)
        rows["trusted"].append(i < trusted)  # the first `trusted` rows carry a human label
        rows["candidates"].append(cand)
        rows["vlm_probs"].append(probs.tolist())
        rows["vlm_pred"].append(int(cand[0]))
    return rows


def make_annotated(
    path: str | Path, *, n_train: int = 48, n_test: int = 24, classes=("red", "green", "blue"), seed: int = 0,
    size: int = 16, labeled_train: bool = True, trusted: int = 0, **noise,
) -> Path:
    import datasets

    from pipeline.schema import features

    classes = list(classes)
    feats = features(classes)
    splits = {"train": datasets.Dataset.from_dict(make_rows(n_train, classes, seed=seed, size=size, labeled=labeled_train, trusted=trusted, **noise), features=feats)}
    if n_test:
        splits["test"] = datasets.Dataset.from_dict(make_rows(n_test, classes, seed=seed + 1, size=size, q=0, eta=0), features=feats)
    datasets.DatasetDict(splits).save_to_disk(str(path))
    return Path(path)
