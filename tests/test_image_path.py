"""One image path: a dataset row decoded for training and the same file read by `coreg predict` give the
same tensor, for every PIL mode the contract invites (transparent RGBA, palette, CMYK, 16-bit grey)."""

from __future__ import annotations

import io

import numpy as np
import torch
from datasets import Dataset, Image
from PIL import Image as PILImage

from pipeline.data import decode_images, image_to_tensor
from stages.predict import predict_paths

SIZE = 8


def _files(root):
    """{name: path} of images in awkward modes, each with a known pixel to check beside the equality."""
    root.mkdir()
    rgba = PILImage.new("RGBA", (SIZE, SIZE), (255, 0, 0, 0))  # fully transparent red -> white
    rgba.putpixel((1, 1), (0, 0, 255, 255))
    rgba.putpixel((2, 2), (0, 0, 0, 128))  # half transparent black -> mid grey
    pal = PILImage.new("P", (SIZE, SIZE), 0)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.putpixel((2, 2), 1)
    sixteen = PILImage.fromarray(np.full((SIZE, SIZE), 30000, dtype=np.uint16))  # 30000 / 257 -> 117
    cmyk = PILImage.new("CMYK", (SIZE, SIZE), (0, 255, 255, 0))  # pure red ink
    paths = {"rgba": root / "rgba.png", "palette": root / "palette.png", "sixteen": root / "sixteen.png",
             "cmyk": root / "cmyk.tif"}
    rgba.save(paths["rgba"])
    pal.save(paths["palette"], transparency=0)
    sixteen.save(paths["sixteen"])
    cmyk.save(paths["cmyk"])
    return paths


class _Capture:
    """Stands in for a loaded student: records what predict feeds it."""

    image_size = SIZE
    classes = ["a", "b"]

    def __init__(self):
        self.seen = []

    def probs(self, x):
        self.seen.append(x.clone())
        return torch.full((x.shape[0], 2), 0.5)


def test_train_and_predict_see_the_same_pixels(tmp_path):
    paths = _files(tmp_path / "imgs")
    names = list(paths)
    # A hand-made dataset: the files' own bytes in the image column, as `coreg annotate` would never write them.
    ds = Dataset.from_dict({"image": [{"bytes": paths[n].read_bytes(), "path": None} for n in names]})
    train = decode_images(ds.cast_column("image", Image()), size=SIZE, num_workers=0, progress=False)
    # ... and one made from PIL images, which datasets encodes itself (TIFF for CMYK and 16-bit).
    pil = Dataset.from_dict({"image": [PILImage.open(paths[n]) for n in names]}).cast_column("image", Image())
    train_pil = decode_images(pil, size=SIZE, num_workers=0, progress=False)

    model = _Capture()
    rows = list(predict_paths(model, [paths[n] for n in names], batch_size=len(names), top_k=1, num_workers=1))
    assert all(not r["error"] for r in rows)
    predicted = torch.cat(model.seen)  # (N, 3, S, S)

    for i, n in enumerate(names):
        assert torch.equal(train[i], predicted[i]), n
        assert torch.equal(train_pil[i], predicted[i]), n
    px = {n: predicted[i] for i, n in enumerate(names)}  # (3, S, S) each
    assert px["rgba"][:, 0, 0].tolist() == [255, 255, 255]  # transparent: white, not its hidden colour
    assert px["rgba"][:, 1, 1].tolist() == [0, 0, 255]
    assert all(120 <= v <= 135 for v in px["rgba"][:, 2, 2].tolist())
    assert px["palette"][:, 0, 0].tolist() == [255, 255, 255] and px["palette"][:, 2, 2].tolist() == [10, 200, 30]
    assert px["sixteen"][:, 0, 0].tolist() == [117, 117, 117]  # scaled by the 16-bit range, not clipped to 255
    r, g, b = px["cmyk"][:, 4, 4].tolist()
    assert r > 200 and g < 60 and b < 60


def test_image_to_tensor_composites_alpha_like_predict():
    rgba = PILImage.new("RGBA", (4, 4), (1, 2, 3, 0))
    assert image_to_tensor(rgba, 4)[:, 0, 0].tolist() == [255, 255, 255]
    buf = io.BytesIO()
    PILImage.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(buf, "PNG")
    assert image_to_tensor(PILImage.open(buf), 4)[:, 0, 0].tolist() == [255, 255, 255]
