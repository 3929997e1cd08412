"""Finding and reading images: which files count, how any PIL mode becomes correct RGB, and the folder layout.

Used by `coreg annotate` (the folder → splits, labels and classes) and `coreg predict` (files → RGB); `to_rgb`
is also the conversion of `pipeline.data.image_to_tensor`, so training and evaluation read the same pixels.
Reading never raises on a bad file: `load_rgb` returns None and the caller counts and lists the file, so one
broken image cannot cost a long run its other results.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from pipeline.errors import CoregError
from pipeline.schema import check_classes

# Formats PIL only identifies (stub plugins need an external handler; MPEG is header-only): a .h5 or .mpg file
# in an image folder is data, not a picture, and must not be counted as an unreadable image.
_STUB_FORMATS = frozenset({"BUFR", "GRIB", "HDF5", "MPEG", "WMF"})


def _readable_extensions() -> frozenset[str]:
    # Every extension PIL has a *reader* for (PDF, for one, is write-only and is left out).
    exts = Image.registered_extensions()
    return frozenset(e.lower() for e, fmt in exts.items() if fmt in Image.OPEN and fmt not in _STUB_FORMATS)


IMAGE_EXTS = _readable_extensions()
SPLIT_NAMES = ("train", "test")


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTS and not path.name.startswith(".")


def scan_images(root: str | Path) -> list[Path]:
    """Image files under `root`, recursively, sorted by their path relative to `root`.

    Hidden files and folders (a leading '.', e.g. macOS `._x.jpg` resource forks) are skipped: they are never
    pictures a user meant to include.

    Symbolic links are followed, but every real folder and every real file is visited once, through its
    real path where that lies under `root`: a link loop (`ln -s .. IMAGES/cat/up`) or an alias
    (`ln -s ../dog IMAGES/cat/dogs`) would otherwise repeat images under another class folder, labelling dog
    images cat. What was skipped is reported in one warning line.
    """
    import sys

    root = Path(root)
    real_root = os.path.realpath(root)

    def inside(path: str) -> bool:  # reached anyway through its real path, without the link
        real = os.path.realpath(path)
        return real == real_root or real.startswith(real_root + os.sep)

    found, seen_dirs, seen_files, skipped = [], set(), set(), []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen_dirs:  # a loop among folders outside root
            skipped.append(Path(dirpath))
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        keep = []
        for d in sorted(dirnames):
            full = os.path.join(dirpath, d)
            if d.startswith("."):
                continue
            if os.path.islink(full) and inside(full):
                skipped.append(Path(full))
            else:
                keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            full = os.path.join(dirpath, f)
            if not is_image(Path(f)):
                continue
            real = os.path.realpath(full)
            if (os.path.islink(full) and inside(full)) or real in seen_files:
                skipped.append(Path(full))
                continue
            seen_files.add(real)
            found.append(Path(full))
    if skipped:
        print(
            f"warning: {root}: skipped {len(skipped)} symbolic link(s) to folders or images found already "
            f"(e.g. {skipped[0].relative_to(root).as_posix()}: a link loop or alias); each real file is read once",
            file=sys.stderr,
            flush=True,
        )
    return sorted(found, key=lambda p: p.relative_to(root).parts)


def _to_8bit(img: Image.Image) -> Image.Image:
    """Integer/float single-channel modes ('I;16*', 'I', 'F') to 'L' by their value range, not by clipping."""
    a = np.asarray(img)
    if img.mode.startswith("I;16"):
        a = a.astype(np.float32) / 257.0  # 65535 -> 255
    elif img.mode == "I":  # 32-bit ints: PNG 16-bit greys open as 'I' in some Pillow versions
        a = a.astype(np.float32)
        a = a / 257.0 if a.max(initial=0) > 255 else a
    else:  # 'F': floats in [0, 1] (TIFF science data) or [0, 255]
        a = a.astype(np.float32)
        a = a * 255.0 if a.max(initial=0) <= 1.0 else a
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB, upright, with transparency composited on white.

    The one conversion of every reader: annotate and predict (files), train and evaluate (dataset rows, via
    `pipeline.data.image_to_tensor`), so the student trains on the pixels it later predicts on. An upright
    RGB image is returned as is (no copy): training decodes every row through here.
    """
    if img.getexif().get(0x0112, 1) != 1:  # 0x0112 = Orientation: phone photos store rotation as a tag
        img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        img = _to_8bit(img)
    if img.mode == "P":  # palette: go through RGBA when it has a transparent colour
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img if img.mode == "RGB" else img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _decode(fp, draft_size: int | None) -> tuple[Image.Image, bool]:
    """(RGB image, whether the source is 'plain': decodes the same in every reader, see `read_image`)."""
    with Image.open(fp) as img:
        plain = (
            img.format in ("JPEG", "PNG", "WEBP")
            and img.mode in ("RGB", "L")
            and "transparency" not in img.info
            and img.getexif().get(0x0112, 1) == 1  # 0x0112 = Orientation: 1 = upright
        )
        if draft_size and img.format == "JPEG":
            w, h = img.size
            scale = min(w, h) / draft_size
            if scale >= 2:  # JPEG can decode at 1/2, 1/4, 1/8 scale; PIL keeps the result >= the asked size
                img.draft("RGB", (int(w / scale) + 1, int(h / scale) + 1))
        img.load()  # truncated files fail here, not later in a worker
        return to_rgb(img), plain


def load_rgb(path: str | Path, *, draft_size: int | None = None) -> Image.Image | None:
    """The image at `path` as RGB (see `to_rgb`), fully decoded; None if it cannot be read.

    `draft_size`: let JPEG decode at a reduced scale that stays >= this many pixels on the short side (a 12 MP
    photo decodes ~8x faster when the model only needs 224 px). None decodes at full size.
    """
    try:
        return _decode(path, draft_size)[0]
    except Exception:  # noqa: BLE001 - any decoder error (OSError, SyntaxError, DecompressionBomb...) = unreadable
        return None


def read_image(path: str | Path, *, draft_size: int | None = None) -> tuple[Image.Image, bytes] | None:
    """(RGB image, bytes for the dataset's `image` cell), or None if unreadable. The file is read once.

    The cell keeps the original file when every reader decodes it the same (plain RGB/grey JPEG, PNG, WebP
    without a rotation tag: small, fast, lossless); anything a naive `.convert("RGB")` would get wrong (16-bit,
    CMYK, alpha, palette, EXIF rotation, exotic formats) is stored as the corrected RGB picture in PNG, so
    downstream readers see what the annotator saw.
    """
    try:
        data = Path(path).read_bytes()
        rgb, plain = _decode(io.BytesIO(data), draft_size)
        if not plain:
            buf = io.BytesIO()
            rgb.save(buf, format="PNG")
            data = buf.getvalue()
        return rgb, data
    except Exception:  # noqa: BLE001 - see load_rgb
        return None


# ---------------------------------------------------------------------------------------------------------
# Folder layout


@dataclass
class Layout:
    """What `discover` found: the class list and, per split, (file, label) pairs with label -1 when unknown."""

    classes: list[str]
    splits: dict[str, list[tuple[Path, int]]]
    roots: dict[str, Path]  # `path` column values are relative to these
    labeled: dict[str, bool]
    notes: list[str] = field(default_factory=list)


def _parse_classes(classes: str | None, classes_file: str | None) -> list[str] | None:
    if classes and classes_file:
        raise CoregError("--classes and --classes-file both given; use one of them")
    if classes_file:
        f = Path(classes_file)
        if not f.is_file():
            raise CoregError(f"--classes-file {f}: file not found; give a text file with one class name per line")
        names = [ln.strip() for ln in f.read_text(encoding="utf-8").splitlines()]
        return check_classes([n for n in names if n and not n.startswith("#")], source=f"--classes-file {f}")
    if classes is not None:
        return check_classes([c for c in classes.split(",")], source="--classes")
    return None


def _key(name: str) -> str:
    return name.strip().lower().replace("_", " ")


def _class_folders(root: Path, files: list[Path]) -> tuple[list[str], list[Path]]:
    """Names of the immediate sub-folders holding images, and the images lying outside any sub-folder."""
    names, loose = set(), []
    for p in files:
        parts = p.relative_to(root).parts
        (names.add(parts[0]) if len(parts) > 1 else loose.append(p))
    return sorted(names), loose


def _scan_split(root: Path, what: str, given: list[str] | None, *, need_labels: bool = False):
    """(classes, [(path, label)], labeled, note) for one folder, given or not given the class list."""
    if not root.exists():
        raise CoregError(f"{what} {root}: folder not found")
    if not root.is_dir():
        raise CoregError(f"{what} {root}: not a folder; give a folder of images")
    files = scan_images(root)
    if not files:
        empty = not any(root.iterdir())
        raise CoregError(
            f"{what} {root}: " + ("the folder is empty" if empty else "no images found")
            + " (looked recursively for files PIL can read: .jpg, .png, .webp, .bmp, .tif, ...); check the path"
        )
    folders, loose = _class_folders(root, files)
    if given is None:
        if loose or not folders:
            raise CoregError(
                f"{what} {root}: {len(loose)} image(s) lie outside class sub-folders, so class names are unknown; "
                "put each class in its own sub-folder or pass --classes 'a,b,c' / --classes-file F"
            )
        classes = check_classes(folders, source=f"{what} {root} (class sub-folders)")
        index = {c: i for i, c in enumerate(classes)}
        return classes, [(p, index[p.relative_to(root).parts[0]]) for p in files], True, None
    index = {_key(c): i for i, c in enumerate(given)}
    if folders and not loose and all(_key(f) in index for f in folders):
        return given, [(p, index[_key(p.relative_to(root).parts[0])]) for p in files], True, None
    if need_labels:
        raise CoregError(
            f"{what} {root}: sub-folders {folders[:5]} do not match the classes {given[:5]}; a labeled folder "
            "needs one sub-folder per class"
        )
    note = f"{root}: sub-folders do not match the classes, so its images are unlabeled" if folders else None
    return given, [(p, -1) for p in files], False, note


def discover(images_dir: str | Path, classes: str | None = None, classes_file: str | None = None,
             test_dir: str | Path | None = None) -> Layout:
    """The splits, labels and classes of an image folder (DESIGN.md "CLI").

    - `IMAGES/train/` (and optionally `IMAGES/test/`): two splits, each laid out as below.
    - class sub-folders: labeled, classes = sorted folder names, unless `--classes` gives names (and order);
      folders then match names case-insensitively with `_` read as a space.
    - anything else: unlabeled, `--classes` or `--classes-file` required.
    - `test_dir`: a labeled test split from another folder; its classes must be among the train classes.
    """
    root = Path(images_dir)
    given = _parse_classes(classes, classes_file)
    train_root = root / "train" if (root / "train").is_dir() else root
    cls, train, labeled, note = _scan_split(train_root, "IMAGES", given)
    layout = Layout(classes=cls, splits={"train": train}, roots={"train": train_root}, labeled={"train": labeled})
    layout.notes += [note] if note else []
    test_root = None
    if train_root != root and (root / "test").is_dir():
        test_root = root / "test"
        if test_dir is not None:
            raise CoregError(f"both {test_root} and --test-dir {test_dir} give a test split; keep one of them")
    elif test_dir is not None:
        test_root = Path(test_dir)
    if test_root is not None:
        what = "--test-dir" if test_dir is not None else "IMAGES"
        test_files = scan_images(test_root) if test_root.is_dir() else []
        folders, _ = _class_folders(test_root, test_files) if test_files else ([], [])
        unknown = [f for f in folders if _key(f) not in {_key(c) for c in cls}]
        if unknown:
            raise CoregError(
                f"{what} {test_root}: test classes {unknown[:5]} are not among the train classes {cls[:10]}; "
                "the test folder needs the same class sub-folders as the training images"
            )
        _, test, test_labeled, note = _scan_split(test_root, what, cls, need_labels=test_dir is not None)
        missing = sorted(set(cls) - {cls[y] for _, y in test if y >= 0}) if test_labeled else []
        layout.notes += [note] if note else []
        layout.notes += [f"{test_root}: no test images for classes {missing}"] if missing else []
        layout.splits["test"], layout.roots["test"], layout.labeled["test"] = test, test_root, test_labeled
    return layout
