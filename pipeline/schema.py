"""The stage contract: the annotated dataset that `annotate` writes and `train` / `evaluate` read.

See DESIGN.md "Stage contract". Readers call `load_annotated` once at the boundary; it fails with one line
that names the path, split, column and the stage that should have produced it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import CoregError

if TYPE_CHECKING:  # datasets is heavy: import it inside the functions that need it
    import datasets

REQUIRED_COLUMNS = ("image", "path", "label", "trusted", "candidates", "vlm_probs", "vlm_pred")
SPLITS = ("train", "test")
ANNOTATION_FILE = "annotation.json"


def features(classes: list[str]) -> datasets.Features:
    """The contract's features for a class list (extra columns may be added by the writer)."""
    import datasets

    return datasets.Features(
        {
            "image": datasets.Image(),
            "path": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(classes)),
            "trusted": datasets.Value("bool"),
            "candidates": datasets.Sequence(datasets.Value("int32")),
            "vlm_probs": datasets.Sequence(datasets.Value("float32")),
            "vlm_pred": datasets.Value("int32"),
        }
    )


def check_classes(classes: list[str], *, source: str) -> list[str]:
    """At least two classes, no empty or duplicate names (compared case-insensitively, `_` as space)."""
    classes = [c.strip() for c in classes]
    if any(not c for c in classes):
        raise CoregError(f"{source}: a class name is empty; give every class a name")
    if len(classes) < 2:
        raise CoregError(f"{source}: found {len(classes)} class(es) {classes}; a classifier needs at least two")
    seen: dict[str, str] = {}
    for c in classes:
        key = c.lower().replace("_", " ")
        if key in seen:
            raise CoregError(f"{source}: duplicate class name {c!r} (same as {seen[key]!r}); give each class once")
        seen[key] = c
    return classes


def _fail(root: Path, split: str, column: str, what: str, stage: str) -> CoregError:
    return CoregError(
        f"{root}: split {split!r}, column {column!r}: {what} (the annotated dataset is written by "
        f"`coreg annotate`; a hand-made one must follow the contract in DESIGN.md) [{stage}]"
    )


def load_annotated(path: str | Path, *, stage: str, check_rows: bool = True) -> tuple[datasets.DatasetDict, list[str]]:
    """Load and validate an annotated dataset directory. Returns the DatasetDict and the class list.

    `check_rows` also validates the values (candidate ranges, probability sums): cheap, it reads only the
    small columns, never the images.
    """
    import datasets
    import numpy as np

    root = Path(path)
    if not root.exists():
        raise CoregError(f"{root}: annotated dataset not found; run `coreg annotate IMAGES {root}` first [{stage}]")
    if not (root / "dataset_dict.json").is_file():
        raise CoregError(
            f"{root}: not an annotated dataset (no dataset_dict.json); point to the OUT folder of `coreg annotate` [{stage}]"
        )
    try:
        dsd = datasets.load_from_disk(str(root))
    except Exception as e:  # corrupt arrow files, version mismatch
        raise CoregError(f"{root}: cannot load the dataset ({type(e).__name__}: {e}) [{stage}]") from None
    if not isinstance(dsd, datasets.DatasetDict):
        raise CoregError(f"{root}: expected a DatasetDict with a 'train' split, found a single Dataset [{stage}]")
    if "train" not in dsd:
        raise CoregError(f"{root}: no 'train' split (found {sorted(dsd)}); the contract requires one [{stage}]")
    classes: list[str] | None = None
    for split, ds in dsd.items():
        if split not in SPLITS:
            continue  # extra splits are allowed and ignored
        for col in REQUIRED_COLUMNS:
            if col not in ds.column_names:
                raise _fail(root, split, col, "column missing", stage)
        label = ds.features["label"]
        if not isinstance(label, datasets.ClassLabel):
            raise _fail(root, split, "label", f"must be ClassLabel(names=classes), found {type(label).__name__}", stage)
        if classes is None:
            classes = list(label.names)
        elif list(label.names) != classes:
            raise _fail(root, split, "label", f"class names {label.names} differ from the train split's {classes}", stage)
        if not isinstance(ds.features["image"], datasets.Image):
            raise _fail(root, split, "image", "must be an Image() feature", stage)
        if check_rows and len(ds):
            small = ds.select_columns(["candidates", "vlm_probs", "vlm_pred", "label", "trusted"]).with_format("numpy")[:]
            _check_values(root, split, small, len(label.names), stage, np)
    assert classes is not None
    check_classes(classes, source=f"{root} [{stage}]")
    return dsd, classes


def _check_values(root, split, ds, n_classes, stage, np) -> None:
    probs = ds["vlm_probs"]  # (N, C), or an object array of rows when lengths differ
    probs = np.asarray(list(probs), dtype=object) if probs.dtype == object else probs
    if probs.dtype == object:
        raise _fail(root, split, "vlm_probs", f"each row needs {n_classes} values (one per class)", stage)
    if probs.ndim != 2 or probs.shape[1] != n_classes:
        raise _fail(root, split, "vlm_probs", f"each row needs {n_classes} values (one per class)", stage)
    # NaN slips through the sum test below (NaN > 1e-3 is False), and a negative entry can still sum to 1:
    # both would train a non-finite or meaningless model (kd distils vlm_probs directly), so refuse them here.
    nonfinite = np.flatnonzero(~np.isfinite(probs).all(1))
    if len(nonfinite):
        i = nonfinite[0]
        raise _fail(root, split, "vlm_probs", f"row {i} holds a non-finite value ({probs[i][~np.isfinite(probs[i])][0]}); "
                    f"{len(nonfinite)} row(s) in all", stage)
    negative = np.flatnonzero((probs < 0).any(1))
    if len(negative):
        i = negative[0]
        raise _fail(root, split, "vlm_probs", f"row {i} holds a negative value ({probs[i].min():.4g}); "
                    f"{len(negative)} row(s) in all; probabilities must be >= 0", stage)
    sums = probs.sum(1)
    bad = np.flatnonzero(np.abs(sums - 1) > 1e-3)
    if len(bad):
        raise _fail(root, split, "vlm_probs", f"row {bad[0]} sums to {sums[bad[0]]:.4f}, not 1", stage)
    pred = np.asarray(ds["vlm_pred"])
    if ((pred < 0) | (pred >= n_classes)).any():
        raise _fail(root, split, "vlm_pred", f"values must lie in [0, {n_classes})", stage)
    label = np.asarray(ds["label"])
    if ((label < -1) | (label >= n_classes)).any():
        raise _fail(root, split, "label", f"values must lie in [-1, {n_classes})", stage)
    trusted = np.asarray(ds["trusted"], dtype=bool)
    if (trusted & (label < 0)).any():
        raise _fail(root, split, "trusted", "a trusted row must have a known label", stage)
    empty = 0
    for i, c in enumerate(ds["candidates"]):
        c = np.asarray(c)
        empty += len(c) == 0
        if len(c) and (c.min() < 0 or c.max() >= n_classes):
            raise _fail(root, split, "candidates", f"row {i} has a class index outside [0, {n_classes})", stage)
        if len(c) > 1 and (np.diff(c) <= 0).any():
            raise _fail(root, split, "candidates", f"row {i} is not sorted and unique", stage)
    n = len(ds["candidates"])
    # The contract allows an empty set only where the annotator failed on that row. All empty means the
    # annotation failed as a whole: the partial-label methods would learn nothing (cc's loss is 0) and say so
    # nowhere. Only the train split is refused: a test split's sets feed statistics, not learning.
    if empty and empty == n and split == "train":
        raise _fail(root, split, "candidates", f"all {n} candidate sets are empty; nothing to learn from (re-run "
                    "`coreg annotate`, or check the candidate rule --candidates)", stage)
    if empty:
        import sys

        print(f"warning: {root}: split {split!r}: {empty} of {n} rows have an empty candidate set (the annotator "
              f"failed on them) [{stage}]", file=sys.stderr, flush=True)


def candidate_matrix(candidates, n_classes: int):
    """(N, C) bool matrix from a list of candidate index lists."""
    import numpy as np

    m = np.zeros((len(candidates), n_classes), dtype=bool)
    for i, c in enumerate(candidates):
        if len(c):
            m[i, np.asarray(c, dtype=np.int64)] = True
    return m


def read_annotation_info(path: str | Path) -> dict:
    """annotation.json beside the dataset, or {} when a hand-made dataset has none."""
    f = Path(path) / ANNOTATION_FILE
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CoregError(f"{f}: not valid JSON ({e}); delete it or re-run `coreg annotate`") from None
