"""`coreg predict MODEL IMAGES... [--out FILE]`: classify image files and folders with a trained student.

Files and folders in (folders are scanned recursively), one CSV row per image out: path, class, probability,
the top-k classes with their probabilities, and an error for images that could not be read. An unreadable
image is reported and skipped, never fatal: one broken file must not cost a batch job its other results.
"""

from __future__ import annotations

import csv
import io
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.config import PredictConfig
from pipeline.errors import CoregError

COLUMNS = ("path", "class", "probability", "top_k", "error")


def collect_paths(inputs: list[str] | tuple[str, ...]) -> list[Path]:
    """Files as given, folders expanded to their images (sorted); a path that does not exist is an error."""
    from pipeline.images import scan_images

    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths.extend(scan_images(p))
        elif p.is_file():
            paths.append(p)
        else:
            raise CoregError(f"{p}: no such file or folder")
    if not paths:
        raise CoregError(f"no images found in {', '.join(map(str, inputs))}")
    return paths


def format_top_k(probs, classes: list[str], k: int) -> str:
    """'dog:0.912345;cat:0.061234' for the k most probable classes, most probable first."""
    order = probs.argsort()[::-1][:k]
    return ";".join(f"{classes[i]}:{probs[i]:.6f}" for i in order)


def predict_paths(model, paths: list[Path], *, batch_size: int, top_k: int, num_workers: int = 2):
    """Yield one CSV row (dict) per path, in input order; unreadable images get an `error` and no class."""
    import torch

    from pipeline.data import image_to_tensor
    from pipeline.images import load_rgb
    from pipeline.messages import reading

    def load(path: Path):
        try:
            with reading(path):  # a warning while decoding names this file
                img = load_rgb(path)
            return None if img is None else image_to_tensor(img, model.image_size)  # (3, S, S) uint8
        except (OSError, ValueError):  # truncated pixel data can surface only when resizing
            return None

    with ThreadPoolExecutor(max(1, num_workers)) as pool:  # PIL decodes outside the GIL
        for start in range(0, len(paths), batch_size):
            batch = paths[start : start + batch_size]
            tensors = list(pool.map(load, batch))
            ok = [i for i, t in enumerate(tensors) if t is not None]
            probs = model.probs(torch.stack([tensors[i] for i in ok])).cpu().numpy() if ok else None  # (b, C)
            row_of = {i: j for j, i in enumerate(ok)}
            for i, path in enumerate(batch):
                if i not in row_of:
                    yield {"path": str(path), "class": "", "probability": "", "top_k": "", "error": "unreadable image"}
                    continue
                p = probs[row_of[i]]
                best = int(p.argmax())
                yield {
                    "path": str(path),
                    "class": model.classes[best],
                    "probability": f"{p[best]:.6f}",
                    "top_k": format_top_k(p, model.classes, top_k),
                    "error": "",
                }


def _check_out(out: Path) -> None:
    if out.is_dir():
        raise CoregError(f"{out}: is a folder; give a file name for the CSV (--out FILE.csv)")
    if out.exists():
        with open(out, newline="") as f:
            first = f.readline().strip()
        if first != ",".join(COLUMNS):
            raise CoregError(f"{out}: exists and is not a `coreg predict` CSV; choose another --out")
    elif not out.parent.is_dir():
        raise CoregError(f"{out.parent}: folder does not exist; create it or choose another --out")


def run(cfg: PredictConfig) -> Path | None:
    """Disk → disk: MODEL + images → CSV (a file, or stdout). Returns the CSV path, None for stdout."""
    import torch

    from pipeline.config import check
    from pipeline.model_io import atomic_write_text, load_model

    check(cfg)  # ranges declared in pipeline/config.py
    out = Path(cfg.out) if cfg.out else None
    if out is not None:
        _check_out(out)
    model = load_model(cfg.model, device="cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu")
    paths = collect_paths(cfg.inputs)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    failed = []
    for row in predict_paths(model, paths, batch_size=cfg.batch_size, top_k=min(cfg.top_k, len(model.classes))):
        writer.writerow(row)
        if row["error"]:
            failed.append(row["path"])
    for p in failed:
        print(f"warning: {p}: unreadable image, skipped", file=sys.stderr)
    if out is None:
        sys.stdout.write(buf.getvalue())
    else:
        atomic_write_text(out, buf.getvalue())
    done = len(paths) - len(failed)
    where = out if out is not None else "stdout"
    print(f"{done} image(s) classified, {len(failed)} unreadable -> {where}", file=sys.stderr)
    return out
