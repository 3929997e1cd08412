import io

import numpy as np
import PIL.Image
import pytest
import torch
from datasets import Dataset, Features, Image
from torchvision.transforms import v2

from pipeline import data
from pipeline.data import channel_stats, decode_images, default_image_size, image_to_tensor
from pipeline.errors import CoregError


def _noise_image(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return PIL.Image.fromarray(arr).convert(mode)


@pytest.mark.parametrize("w,h", [(64, 32), (33, 50)])
def test_image_to_tensor_matches_resize_shorter_side_then_centre_crop(w, h):
    img = _noise_image(w, h)
    ref = v2.Compose([v2.Resize(16, interpolation=v2.InterpolationMode.BICUBIC), v2.CenterCrop(16)])(img)
    out = image_to_tensor(img, 16)
    assert out.dtype == torch.uint8 and out.shape == (3, 16, 16)
    assert torch.equal(out, torch.from_numpy(np.array(ref)).permute(2, 0, 1))


def test_image_to_tensor_is_a_no_op_on_square_rgb_of_the_right_size():
    img = _noise_image(20, 20)
    assert torch.equal(image_to_tensor(img, 20), torch.from_numpy(np.array(img)).permute(2, 0, 1))


def test_image_to_tensor_converts_grey_and_rgba_to_rgb():
    grey = PIL.Image.new("L", (8, 8), 77)
    assert torch.equal(image_to_tensor(grey, 8), torch.full((3, 8, 8), 77, dtype=torch.uint8))
    rgba = PIL.Image.new("RGBA", (8, 8), (1, 2, 3, 255))  # opaque: its colour (transparent: white, test_image_path)
    assert image_to_tensor(rgba, 8)[:, 0, 0].tolist() == [1, 2, 3]


def test_image_to_tensor_applies_exif_orientation():
    # 4x2: left half black, right half white; orientation 6 = rotate 90 degrees clockwise to display,
    # so the displayed image is 2x4 with the black half on top.
    arr = np.zeros((2, 4, 3), dtype=np.uint8)
    arr[:, 2:] = 255
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    PIL.Image.fromarray(arr).save(buf, "PNG", exif=exif)
    out = image_to_tensor(PIL.Image.open(io.BytesIO(buf.getvalue())), 2)  # (3, 2, 2), rows 1..2 of 4
    assert out[0].tolist() == [[0, 0], [255, 255]]


def _dataset(images):
    """PIL images (stored as bytes) or file paths, beside another column that the readers must ignore."""
    return Dataset.from_dict({"image": images, "other": list(range(len(images)))}).cast_column(
        "image", Image()
    )


def test_decode_images_matches_image_to_tensor_in_chunks_and_threads(monkeypatch, tmp_path):
    imgs = [_noise_image(12, 12, seed=0), _noise_image(30, 20, "L", 1), _noise_image(9, 16, "RGBA", 2)]
    imgs.append(_noise_image(40, 40, seed=3))
    ref = torch.stack([image_to_tensor(im, 12) for im in imgs])  # (4, 3, 12, 12)
    monkeypatch.setattr(data, "_CHUNK", 3)  # 4 rows = two chunks, one partial
    ds = _dataset(imgs)  # stored as bytes
    for workers in (0, 2):
        out = decode_images(ds, size=12, num_workers=workers, progress=False)
        assert out.dtype == torch.uint8 and torch.equal(out, ref)
    paths = []
    for i, im in enumerate(imgs):
        paths.append(str(tmp_path / f"{i}.png"))
        im.save(paths[-1])
    assert torch.equal(decode_images(_dataset(paths), size=12, progress=False), ref)  # stored as paths


def test_decode_images_names_the_broken_row():
    buf = io.BytesIO()
    _noise_image(8, 8).save(buf, "PNG")
    ds = Dataset.from_dict(
        {"image": [{"bytes": buf.getvalue(), "path": None}, {"bytes": b"not an image", "path": "x.png"}]},
        features=Features({"image": Image()}),
    )
    with pytest.raises(CoregError, match=r"row 1 \(x.png\): cannot read"):
        decode_images(ds, size=8, progress=False)
    truncated = {"bytes": buf.getvalue()[:-30], "path": None}
    ds = Dataset.from_dict({"image": [truncated]}, features=Features({"image": Image()}))
    with pytest.raises(CoregError, match="row 0"):
        decode_images(ds, size=8, num_workers=0, progress=False)


def test_decode_images_empty_dataset():
    ds = Dataset.from_dict({"image": []}, features=Features({"image": Image()}))
    assert decode_images(ds, size=8, progress=False).shape == (0, 3, 8, 8)


def test_default_image_size_is_the_median_max_side_clamped():
    assert (
        default_image_size(_dataset([_noise_image(30, 20), _noise_image(40, 40), _noise_image(50, 10)])) == 40
    )
    assert default_image_size(_dataset([_noise_image(300, 250)])) == 224
    assert default_image_size(_dataset([_noise_image(8, 4)])) == 16


def test_channel_stats_exact():
    x = torch.full((3, 3, 5, 5), 51, dtype=torch.uint8)  # 51 / 255 = 0.2
    mean, std = channel_stats(x)
    assert mean == pytest.approx([0.2] * 3, abs=1e-12) and std == [0.0, 0.0, 0.0]
    y = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    y[0] = 255  # half the pixels 1.0, half 0.0: mean 0.5, population std 0.5
    mean, std = channel_stats(y, chunk=1)
    assert mean == pytest.approx([0.5] * 3, abs=1e-12) and std == pytest.approx([0.5] * 3, abs=1e-12)


def test_decode_images_progress_bar_only_when_asked(capsys):
    ds = _dataset([_noise_image(8, 8)])
    decode_images(ds, size=8, desc=None)
    decode_images(ds, size=8, desc="quiet", progress=False)
    assert capsys.readouterr().err == ""
    decode_images(ds, size=8, desc="decoding train")
    assert "decoding train" in capsys.readouterr().err
