"""pipeline.images: scanning, every PIL mode to correct RGB, unreadable files, and the folder layouts."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import CoregError
from pipeline.images import IMAGE_EXTS, discover, load_rgb, read_image, scan_images, to_rgb
from tests.tiny import make_image_folder


def test_scan_is_recursive_sorted_case_insensitive_and_skips_hidden(tmp_path):
    for rel in ("b/2.JPG", "a/x/1.png", "a/0.webp", "c.tif", ".hidden/3.png", "a/._4.png", "notes.txt", "d.h5"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    got = [p.relative_to(tmp_path).as_posix() for p in scan_images(tmp_path)]
    assert got == ["a/0.webp", "a/x/1.png", "b/2.JPG", "c.tif"]
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tiff"} <= IMAGE_EXTS
    assert ".pdf" not in IMAGE_EXTS and ".h5" not in IMAGE_EXTS  # write-only / stub formats


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def test_modes_become_correct_rgb(tmp_path):
    grey = load_rgb(_save(Image.new("L", (4, 4), 77), tmp_path / "g.png"))
    assert grey.mode == "RGB" and grey.getpixel((0, 0)) == (77, 77, 77)

    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red: white once composited
    rgba.putpixel((1, 1), (0, 0, 255, 255))
    out = load_rgb(_save(rgba, tmp_path / "a.png"))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (0, 0, 255)

    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.putpixel((2, 2), 1)
    out = load_rgb(_save(pal, tmp_path / "p.png", transparency=0))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((2, 2)) == (10, 200, 30)

    cmyk = load_rgb(_save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "c.jpg", quality=100))
    r, g, b = cmyk.getpixel((4, 4))
    assert cmyk.mode == "RGB" and r > 200 and g < 60 and b < 60  # pure red ink

    sixteen = Image.fromarray(np.array([[65535, 32896], [0, 257]], dtype=np.uint16))
    out = load_rgb(_save(sixteen, tmp_path / "16.png"))
    assert [out.getpixel(xy)[0] for xy in ((0, 0), (1, 0), (0, 1), (1, 1))] == [255, 128, 0, 1]  # scaled, not clipped
    assert to_rgb(Image.fromarray(np.full((2, 2), 0.5, np.float32), "F")).getpixel((0, 0)) == (128, 128, 128)


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 5, 10))  # white stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(img, tmp_path / "r.jpg", exif=exif, quality=95)
    out = load_rgb(path)
    assert out.size == (10, 20)
    assert out.getpixel((5, 2))[0] > 200 and out.getpixel((5, 17))[0] < 50  # the stripe is now on top
    rgb, stored = read_image(path)
    again = Image.open(io.BytesIO(stored))
    assert again.format == "PNG" and again.size == (10, 20)  # stored upright: naive readers see it right


def test_unreadable_and_truncated_files_give_none(tmp_path):
    good = _save(Image.new("RGB", (64, 64), (9, 9, 9)), tmp_path / "ok.jpg")
    (tmp_path / "trunc.jpg").write_bytes(good.read_bytes()[:200])
    (tmp_path / "junk.png").write_bytes(b"not an image")
    assert load_rgb(good) is not None
    assert load_rgb(tmp_path / "trunc.jpg") is None and read_image(tmp_path / "trunc.jpg") is None
    assert load_rgb(tmp_path / "junk.png") is None and load_rgb(tmp_path / "missing.png") is None


def test_plain_files_are_stored_byte_for_byte(tmp_path):
    path = _save(Image.new("RGB", (8, 8), (1, 2, 3)), tmp_path / "x.jpg")
    rgb, stored = read_image(path)
    assert stored == path.read_bytes() and rgb.size == (8, 8)


def test_jpeg_draft_keeps_at_least_the_asked_size(tmp_path):
    path = _save(Image.new("RGB", (1000, 800), (50, 60, 70)), tmp_path / "big.jpg")
    out = load_rgb(path, draft_size=224)
    assert min(out.size) >= 224 and out.size[0] < 1000


def test_discover_class_folders_and_splits(tmp_path):
    make_image_folder(tmp_path / "flat", classes=("dog", "cat"), n_per_class=2)
    lay = discover(tmp_path / "flat")
    assert lay.classes == ["cat", "dog"] and lay.labeled == {"train": True}
    assert [y for _, y in lay.splits["train"]] == [0, 0, 1, 1]

    make_image_folder(tmp_path / "two", classes=("a", "b"), n_per_class=2, split=("train", "test"))
    lay = discover(tmp_path / "two")
    assert set(lay.splits) == {"train", "test"} and lay.roots["test"] == tmp_path / "two" / "test"

    lay = discover(tmp_path / "flat", classes="dog,cat")  # given names fix the order
    assert lay.classes == ["dog", "cat"] and [y for _, y in lay.splits["train"]] == [1, 1, 0, 0]

    lay = discover(tmp_path / "flat", test_dir=tmp_path / "two" / "train", classes="a,b")
    assert lay.labeled == {"train": False, "test": True} and lay.notes  # folders dog/cat are not classes a/b


def test_discover_unlabeled_needs_classes(tmp_path):
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    with pytest.raises(CoregError, match="--classes"):
        discover(tmp_path)
    (tmp_path / "names.txt").write_text("# comment\nred\n\nblue_sky\n")
    lay = discover(tmp_path, classes_file=str(tmp_path / "names.txt"))
    assert lay.classes == ["red", "blue_sky"] and {y for _, y in lay.splits["train"]} == {-1}


@pytest.mark.parametrize(
    "setup, kwargs, match",
    [
        (lambda p: None, {}, "folder not found"),
        (lambda p: p.mkdir(), {}, "empty"),
        (lambda p: (p.mkdir(), (p / "a.txt").write_text("x")), {}, "no images found"),
        (lambda p: make_image_folder(p, classes=("only",)), {}, "at least two"),
        (lambda p: make_image_folder(p, classes=("Cat", "cat")), {}, "duplicate"),
        (lambda p: make_image_folder(p), {"classes": "a,a"}, "duplicate"),
        (lambda p: make_image_folder(p), {"classes": "a,b", "classes_file": "f"}, "both"),
        (lambda p: make_image_folder(p), {"classes_file": "/nonexistent/f.txt"}, "not found"),
        (lambda p: (make_image_folder(p / "train", classes=("a", "b")), make_image_folder(p / "test", classes=("a", "z"))), {}, "not among the train classes"),
    ],
)
def test_discover_errors(tmp_path, setup, kwargs, match):
    root = tmp_path / "imgs"
    setup(root)
    with pytest.raises(CoregError, match=match):
        discover(root, **kwargs)


def test_test_dir_errors(tmp_path):
    make_image_folder(tmp_path / "two", classes=("a", "b"), split=("train", "test"))
    with pytest.raises(CoregError, match="keep one"):
        discover(tmp_path / "two", test_dir=tmp_path / "two" / "test")
    make_image_folder(tmp_path / "other", classes=("a", "q"))
    with pytest.raises(CoregError, match="--test-dir .*not among"):
        discover(tmp_path / "two" / "train", test_dir=tmp_path / "other")
