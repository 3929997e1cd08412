import numpy as np
import PIL.Image
import PIL.ImageEnhance
import PIL.ImageOps
import pytest
import torch
import torch.nn.functional as F

from pipeline.augment import CUTOUT_FILL, OPS, RANGES, BatchAugment

S = 16
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.1)


def _images(n, seed=0, size=S):
    """Smooth random images (upsampled noise), more like photos than white noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, 256, (n, 3, 4, 4), generator=g).float()
    return F.interpolate(coarse, size=size, mode="bilinear").round().to(torch.uint8)  # (n, 3, size, size)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _aug(**kw):
    return BatchAugment(image_size=S, mean=MEAN, std=STD, **kw)


def _plain(n, aug, **over):
    """Strong params that change nothing (zero shift, no flip, identity op, empty cutout), then overrides."""
    p = aug.sample_strong(n, _gen(0))
    p.update(dy=torch.zeros(n, dtype=torch.long), dx=torch.zeros(n, dtype=torch.long))
    p.update(flip=torch.zeros(n, dtype=torch.bool), op=torch.full((n,), OPS.index("identity")))
    p.update(cut_size=torch.zeros(n))
    p.update(over)
    return p


def test_shapes_dtypes_and_param_ranges():
    aug = _aug()
    x = _images(40)
    p = aug.sample_strong(40, _gen(1))
    assert aug.pad == 2  # S // 8; 4 at 32 px as in the paper's code
    assert BatchAugment(image_size=32, mean=MEAN, std=STD).pad == 4
    assert p["dy"].abs().max() <= 2 and p["dx"].abs().max() <= 2
    lo = torch.tensor([RANGES[OPS[k]][0] for k in p["op"]])
    hi = torch.tensor([RANGES[OPS[k]][1] for k in p["op"]])
    assert ((p["mag"] >= lo) & (p["mag"] <= hi)).all()
    assert ((p["cut_size"] >= 0) & (p["cut_size"] <= S / 2)).all()
    for out in (aug.weak(x, _gen(2)), aug.strong(x, _gen(3)), aug.apply_strong(x, p)):
        assert out.dtype == torch.float32 and out.shape == (40, 3, S, S)


def test_normalize():
    aug = _aug()
    x = _images(3)
    ref = (x.double() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(aug.normalize(x).double(), ref, rtol=0, atol=1e-5)
    const = torch.tensor([127.5, 102.0, 76.5]).view(1, 3, 1, 1).expand(1, 3, S, S)  # exactly the mean
    torch.testing.assert_close(aug.normalize(const), torch.zeros(1, 3, S, S), rtol=0, atol=1e-6)
    f = x.float()
    aug.normalize(f)
    assert torch.equal(f, x.float())  # a float input is not modified in place


def test_zero_shift_without_flip_is_the_identity_and_hflip_false_never_flips():
    aug = _aug(hflip=False)
    x = _images(8)
    p = aug.sample_weak(64, _gen(0))
    assert not p["flip"].any()
    p = _plain(8, aug)
    assert torch.equal(aug.apply_weak(x, p), aug.normalize(x))
    assert torch.equal(aug.apply_strong(x, p), aug.normalize(x))
    p["flip"][:] = True
    assert torch.equal(aug.apply_weak(x, p), aug.normalize(x.flip(-1)))
    assert _aug().sample_weak(64, _gen(0))["flip"].any()


def test_crop_shift_matches_zero_padded_window():
    aug = _aug()
    x = _images(5)
    p = _plain(5, aug, dy=torch.tensor([-2, -1, 0, 1, 2]), dx=torch.tensor([2, 0, -2, 1, -1]))
    p["flip"][3] = True
    out = aug.apply_weak(x, p)
    for i in range(5):  # reference: torchvision RandomCrop(padding=2) semantics, sample by sample
        dy, dx = p["dy"][i].item(), p["dx"][i].item()
        ref = F.pad(x[i], (2, 2, 2, 2))[:, 2 + dy : 2 + dy + S, 2 + dx : 2 + dx + S]
        ref = ref.flip(-1) if p["flip"][i] else ref
        assert torch.equal(out[i], aug.normalize(ref[None])[0])


def test_same_generator_seed_same_output_and_different_seed_differs():
    aug = _aug()
    x = _images(16)
    a, b, c = aug.strong(x, _gen(7)), aug.strong(x, _gen(7)), aug.strong(x, _gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(aug.weak(x, _gen(7)), aug.weak(x, _gen(7)))


def test_samples_get_independent_ops_and_images():
    aug = _aug()
    x = _images(1).expand(64, -1, -1, -1).contiguous()  # one image, 64 times
    p = aug.sample_strong(64, _gen(3))
    assert len(p["op"].unique()) >= 10  # 64 uniform draws from 14 ops
    out = aug.apply_strong(x, p).flatten(1)
    assert len({tuple(r.tolist()) for r in out}) > 50


def test_selected_rows_equal_rows_of_the_global_batch():
    # What each of 4 processes does with a global batch of 64: same images as one process, bit for bit.
    aug = _aug()
    x = _images(64, seed=5)
    p = aug.sample_strong(64, _gen(11))
    assert len(p["op"].unique()) == len(OPS)  # every op is exercised
    whole = aug.apply_strong(x, p)
    parts = [aug.apply_strong(x[r], aug.select(p, r)) for r in (slice(i, i + 16) for i in range(0, 64, 16))]
    assert torch.equal(torch.cat(parts), whole)
    rows = torch.tensor([63, 0, 17, 5])
    assert torch.equal(aug.apply_strong(x[rows], aug.select(p, rows)), whole[rows])
    w = aug.sample_weak(64, _gen(12))
    assert torch.equal(aug.apply_weak(x[5:9], aug.select(w, slice(5, 9))), aug.apply_weak(x, w)[5:9])


def test_masked_ops_equal_grouped_ops_bit_for_bit():
    """The accelerator path (every op on every row, no host read of the per-op counts) makes the pixels of
    the CPU path (rows grouped by op); both are forced here, on the CPU."""
    x = _images(64, seed=6)
    p = _aug().sample_strong(64, _gen(13))
    assert len(p["op"].unique()) == len(OPS)  # every op is exercised
    grouped, masked = _aug(group_ops=True).apply_strong(x, p), _aug(group_ops=False).apply_strong(x, p)
    assert torch.equal(grouped, masked)
    assert torch.equal(_aug().apply_strong(x, p), grouped)  # the default on the CPU groups


def test_constants_are_copied_to_a_device_once(monkeypatch):
    """normalize, sample_strong and Cutout used to build their constants from Python numbers on every call:
    one host-to-device copy (and device sync) each. Now once per device."""
    aug, x = _aug(), _images(8)
    aug.strong(x, _gen(0))  # builds the constants
    made = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or real(*a, **k))
    aug.strong(x, _gen(1))
    aug.weak(x, _gen(2))
    aug.normalize(x)
    assert made == []


def test_cutout_fills_a_grey_square():
    aug = BatchAugment(image_size=32, mean=(0, 0, 0), std=(1, 1, 1))
    x = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    p = _plain(2, aug, cut_cy=torch.tensor([16.0, 5.0]), cut_cx=torch.tensor([16.0, 0.0]))
    p["cut_size"] = torch.tensor([16.0, 8.0])  # the maximum side, 0.5 x 32; and a square at the border
    out = aug.apply_strong(x, p) * 255  # (2, 3, 32, 32) back in pixel values
    grey = torch.tensor(CUTOUT_FILL, dtype=torch.float32).view(3, 1, 1)
    is_grey = (out - grey).abs().amax(dim=1) < 1e-3  # (2, 32, 32)
    assert is_grey[0].sum() == 256 and is_grey[0, 8:24, 8:24].all()
    # left edge clamped to 0 keeps the full side (as the PIL original): rows 1..8, columns 0..7
    assert is_grey[1].sum() == 64 and is_grey[1, 1:9, 0:8].all()
    assert (out[~is_grey[:, None].expand_as(out)] == 0).all()


def _one_op(aug, x, name, v):
    n = x.shape[0]
    p = _plain(n, aug, op=torch.full((n,), OPS.index(name)), mag=torch.full((n,), float(v)))
    return aug.apply_strong(x, p)


def _pil(img, name, v):
    w = img.size[0]
    fns = {
        "autocontrast": lambda: PIL.ImageOps.autocontrast(img),
        "equalize": lambda: PIL.ImageOps.equalize(img),
        "posterize": lambda: PIL.ImageOps.posterize(img, int(v)),
        "solarize": lambda: PIL.ImageOps.solarize(img, v),
        "brightness": lambda: PIL.ImageEnhance.Brightness(img).enhance(v),
        "color": lambda: PIL.ImageEnhance.Color(img).enhance(v),
        "contrast": lambda: PIL.ImageEnhance.Contrast(img).enhance(v),
        "sharpness": lambda: PIL.ImageEnhance.Sharpness(img).enhance(v),
        "rotate": lambda: img.rotate(v),
        "shear_x": lambda: img.transform(img.size, PIL.Image.AFFINE, (1, v, 0, 0, 1, 0)),
        "shear_y": lambda: img.transform(img.size, PIL.Image.AFFINE, (1, 0, 0, v, 1, 0)),
        "translate_x": lambda: img.transform(img.size, PIL.Image.AFFINE, (1, 0, v * w, 0, 1, 0)),
        "translate_y": lambda: img.transform(img.size, PIL.Image.AFFINE, (1, 0, 0, 0, 1, v * w)),
    }
    return torch.from_numpy(np.array(fns[name]())).permute(2, 0, 1)  # (3, H, W) uint8


@pytest.mark.parametrize(
    "name,v",
    [("autocontrast", 0), ("equalize", 0), ("posterize", 4.7), ("solarize", 100.5), ("brightness", 0.3)]
    + [("color", 0.07), ("contrast", 0.9), ("sharpness", 0.5), ("rotate", -23.0), ("shear_x", 0.3)]
    + [("shear_y", -0.17), ("translate_x", 0.25), ("translate_y", -0.3)],
)
def test_each_op_matches_the_pil_original(name, v):
    aug = BatchAugment(image_size=32, mean=(0, 0, 0), std=(1, 1, 1))
    x = _images(1, seed=2, size=32)
    ours = (_one_op(aug, x, name, v)[0] * 255).round()  # (3, 32, 32)
    ref = _pil(PIL.Image.fromarray(x[0].permute(1, 2, 0).numpy()), name, v).float()
    diff = (ours - ref).abs()
    if name == "autocontrast":  # torchvision rounds its scale differently from PIL's LUT
        assert diff.max() <= 1
    elif name == "rotate":  # nearest-neighbour ties may fall either way
        assert (diff > 0).float().mean() < 0.01
    else:
        assert diff.max() == 0


def test_rotate_by_90_and_integer_translate_are_exact():
    aug = BatchAugment(image_size=S, mean=(0, 0, 0), std=(1, 1, 1))
    x = _images(2)
    rot = (_one_op(aug, x, "rotate", 90) * 255).round().to(torch.uint8)
    assert torch.equal(rot, torch.rot90(x, 1, dims=(2, 3)))  # counter-clockwise, as PIL
    moved = (_one_op(aug, x, "translate_x", 0.25) * 255).round().to(torch.uint8)  # 4 px
    assert torch.equal(moved[..., : S - 4], x[..., 4:]) and (moved[..., S - 4 :] == 0).all()


def test_bad_inputs_raise():
    aug = _aug()
    x = _images(4)
    with pytest.raises(ValueError, match="uint8"):
        aug.weak(x.float(), _gen(0))
    with pytest.raises(ValueError, match="uint8"):
        aug.weak(_images(4, size=S * 2), _gen(0))
    with pytest.raises(ValueError, match="rows"):
        aug.apply_strong(x, aug.sample_strong(5, _gen(0)))
