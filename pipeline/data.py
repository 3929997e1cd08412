"""Images to tensors: the one preprocessing shared by training, evaluation, predict and export.

Training decodes every image once into a uint8 tensor at training resolution (DESIGN.md "Speed"); all
augmentation then happens on whole batches on the device (`pipeline/augment.py`). Anything that feeds a
trained student (evaluate, predict, export) must go through `image_to_tensor` with the same size and then
the normalisation stored in config.json, or the student sees a different input distribution.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import PIL.Image
import torch
from torch import Tensor

from pipeline.errors import CoregError
from pipeline.images import to_rgb

PREPROCESSING = (
    "EXIF orientation applied; converted to RGB (transparency composited on white, 16-bit and float greys "
    "scaled by their range, palette and CMYK through PIL); shorter side resized to image_size px (PIL bicubic, "
    "antialiased), longer side to round(long * image_size / short); centre crop to image_size x image_size "
    "(offsets rounded as torchvision center_crop); uint8; then x/255 normalised with the per-channel "
    "mean/std in config.json"
)

MAX_DEFAULT_SIZE = 224  # the default training size is capped here: larger gains little for a small student
MIN_DEFAULT_SIZE = 16  # the smallest size the built-in students take (pipeline.networks.MIN_IMAGE_SIZE)
_CHUNK = 1024  # rows decoded per chunk: bounds the raw bytes held in memory at once


def image_to_tensor(img: PIL.Image.Image, size: int) -> Tensor:
    """(3, size, size) uint8 RGB, see PREPROCESSING. Images that are already size x size RGB are untouched."""
    # The same conversion as annotate and predict (alpha on white, 16-bit scaled, CMYK, EXIF rotation): a
    # hand-made dataset may hold any PIL mode, and a naive .convert("RGB") disagrees with `to_rgb` on several.
    img = to_rgb(img)
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize(
                (nw, nh), PIL.Image.Resampling.BICUBIC
            )  # PIL filters scale with the zoom: antialiased
        left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    arr = np.array(img, dtype=np.uint8)  # (size, size, 3), a writable copy torch can own
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # (3, size, size)


def _raw_images(ds):
    """The `image` column as undecoded {bytes, path} records, without touching the other columns."""
    from datasets import Image

    if "image" not in ds.column_names:
        raise CoregError(f"the dataset has no 'image' column (columns: {', '.join(ds.column_names)})")
    return ds.select_columns(["image"]).cast_column("image", Image(decode=False))


def _open(rec: dict | None, row: int) -> PIL.Image.Image:
    """Open one raw record lazily (header only; pixels load on first use)."""
    if rec is None or (rec.get("bytes") is None and not rec.get("path")):
        raise CoregError(f"row {row}: the 'image' cell is empty; re-run `coreg annotate` or drop the row")
    try:
        if rec.get("bytes") is not None:
            return PIL.Image.open(io.BytesIO(rec["bytes"]))
        return PIL.Image.open(rec["path"])
    except (OSError, PIL.UnidentifiedImageError) as e:
        where = f" ({rec['path']})" if rec.get("path") else ""
        raise CoregError(f"row {row}{where}: cannot read the image ({e}); remove or replace that file") from e


def decode_images(
    ds, *, size: int, num_workers: int = 2, desc: str | None = "decoding", progress: bool = True
) -> Tensor:
    """Every image of a `datasets.Dataset` (an `image` column of Image()) as (N, 3, size, size) uint8.

    A tqdm bar shows progress unless `progress` is False or `desc` is None (e.g. on non-main processes).

    Each image is decoded once. Rows are read in chunks so only one chunk of raw bytes is in memory beside
    the output; PIL decodes and resizes outside the GIL, so a thread pool gives real parallelism.
    """
    from tqdm.auto import tqdm

    raw = _raw_images(ds)
    n = len(raw)
    out = torch.empty((n, 3, size, size), dtype=torch.uint8)  # (N, 3, S, S)

    def decode(args: tuple[int, dict]) -> None:
        row, rec = args
        img = _open(rec, row)
        try:
            out[row].copy_(image_to_tensor(img, size))
        except (OSError, ValueError) as e:  # truncated or corrupt pixel data shows up only at load time
            raise CoregError(f"row {row}: cannot decode the image ({e}); remove or replace that file") from e
        finally:
            img.close()

    pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None
    try:
        with tqdm(total=n, desc=desc, unit="img", disable=not progress or desc is None) as bar:
            for start in range(0, n, _CHUNK):
                recs = raw[start : start + _CHUNK]["image"]  # list of {bytes, path}
                jobs = list(enumerate(recs, start))
                # list() drains the iterator so a worker's exception is raised here
                list(pool.map(decode, jobs) if pool else map(decode, jobs))
                bar.update(len(recs))
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
    return out


def default_image_size(ds, sample: int = 256) -> int:
    """The median of max(width, height) over up to `sample` evenly spaced images, clamped to [16, 224].

    Only image headers are read, so this is fast even for large photos.
    """
    raw = _raw_images(ds)
    n = len(raw)
    if n == 0:
        raise CoregError("the training split has no images")
    idx = np.unique(np.linspace(0, n - 1, num=min(sample, n)).round().astype(int)).tolist()
    sides = []
    for row, rec in zip(idx, raw.select(idx)["image"], strict=True):
        with _open(rec, row) as img:
            sides.append(max(img.size))
    typical = int(np.median(sides))
    return max(MIN_DEFAULT_SIZE, min(MAX_DEFAULT_SIZE, typical))


def channel_stats(images_uint8: Tensor, chunk: int = 1024) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (population) in [0, 1] units of (N, 3, H, W) uint8 images.

    Sums are taken per image in float32 (exact for the shifted integer values of images up to ~250k
    pixels) and accumulated over images in float64, so the result does not drift with N. The values are
    shifted by the first image's rounded channel means first (the "shifted data" variance algorithm), which
    avoids the cancellation of E[x^2] - E[x]^2: a constant image gives a std of exactly 0.
    """
    if images_uint8.ndim != 4 or images_uint8.shape[1] != 3 or images_uint8.shape[0] == 0:
        raise ValueError(f"expected (N>0, 3, H, W) images, got {tuple(images_uint8.shape)}")
    shift = images_uint8[0].float().mean(dim=(1, 2)).round().view(1, 3, 1, 1)  # (1, 3, 1, 1)
    s = torch.zeros(3, dtype=torch.float64)
    s2 = torch.zeros(3, dtype=torch.float64)
    for start in range(0, images_uint8.shape[0], chunk):
        x = images_uint8[start : start + chunk].float() - shift  # (b, 3, H, W), values in -255..255
        s += x.sum(dim=(2, 3)).double().sum(dim=0)
        s2 += x.square().sum(dim=(2, 3)).double().sum(dim=0)
    count = images_uint8.shape[0] * images_uint8.shape[2] * images_uint8.shape[3]
    d = s / count  # (3,) mean minus shift
    var = (s2 / count - d.square()).clamp_min(0)  # (3,)
    mean = d + shift.view(3).double()
    return (mean / 255).tolist(), (var.sqrt() / 255).tolist()
