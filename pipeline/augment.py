"""Weak and strong augmentation of whole uint8 batches on the training device (coreg-method.md §3.4, §4).

weak   = random crop with zero padding + horizontal flip (torchvision RandomCrop(size, padding) + flip).
strong = weak + one RandAugment op per sample, drawn uniformly from 14 (magnitude uniform in the op's range)
         + Cutout (a grey square of side uniform in [0, 0.5] x width), as the FixMatch-style `RandomAugment`
         of PiCO / Co-Reg does on PIL images.

Randomness never comes from global state: `sample_*` draws every per-sample parameter from an explicit
generator, and `apply_*` is a pure function of (images, params). So every process can draw the params of
the *global* batch from the same counter-based generator, `select` its own rows and get exactly the images a
single process would have made. Every step is per-sample (no batch statistics) and uses only exact integer
arithmetic or elementwise float ops in a fixed order, so the output for a row does not depend on which other
rows share its batch.

No host-device sync (issue 11): nothing here reads a device value on the host. The constants (normalisation,
the ops' ranges, the Cutout grey) are copied to a device once and kept (`_on`), because PyTorch waits for the
device on every copy of a host-made tensor. On an accelerator every op runs on the whole batch and `torch.where`
keeps each row's own op; grouping the rows by op, as on the CPU, would need the per-op counts on the host.

The PIL originals use nearest-neighbour resampling with black fill for the geometric ops and turn every
result into uint8; this file does the same (values stay integers in 0..255 until `normalize`), and matches
PIL pixel for pixel except for rare nearest-neighbour ties and autocontrast's rounding (off by at most 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from pipeline.augment_pixels import blend, grey, warp

# Op order is internal (the draw is uniform): geometric ops come last so one grid_sample serves them all.
OPS = (
    "identity", "autocontrast", "equalize", "posterize", "solarize",
    "brightness", "color", "contrast", "sharpness",
    "rotate", "shear_x", "shear_y", "translate_x", "translate_y",
)  # fmt: skip
# Magnitude ranges of method §3.4. The four enhance factors use [0.05, 0.95] as the FixMatch-derived
# RandomAugment of PiCO/Co-Reg does (`v = 0.9 * v + 0.05`; FixMatch paper Table 12), i.e. they only ever
# darken / desaturate / flatten / blur. Rotate in degrees (counter-clockwise), shear as a slope, translate
# as a fraction of the width, solarize as a threshold on 0..255, posterize as bits kept (floored: 4..7).
RANGES = {
    "identity": (0.0, 1.0), "autocontrast": (0.0, 1.0), "equalize": (0.0, 1.0),
    "posterize": (4.0, 8.0), "solarize": (0.0, 256.0),
    "brightness": (0.05, 0.95), "color": (0.05, 0.95), "contrast": (0.05, 0.95), "sharpness": (0.05, 0.95),
    "rotate": (-30.0, 30.0), "shear_x": (-0.3, 0.3), "shear_y": (-0.3, 0.3),
    "translate_x": (-0.3, 0.3), "translate_y": (-0.3, 0.3),
}  # fmt: skip
FIRST_GEOMETRIC = OPS.index("rotate")
CUTOUT_MAX = 0.5  # side as a fraction of the width (method §3.4)
CUTOUT_FILL = (125, 123, 114)  # the RandomAugment code's grey, in 0..255 pixel values
Params = dict[str, Tensor]


class BatchAugment:
    """uint8 (B, 3, S, S) in, normalised float32 (B, 3, S, S) out, with per-sample random parameters."""

    def __init__(
        self, *, image_size: int, mean, std, hflip: bool = True, pad: int | None = None, group_ops: bool | None = None
    ):
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean/std must be 3 values with std > 0, got {mean}, {std}")
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.hflip = bool(hflip)
        # method §4: pad 4 at 32 px (CIFAR, SVHN), pad 8 at 64 px (EuroSAT, GTSRB, FER): one eighth of the side
        self.pad = self.image_size // 8 if pad is None else int(pad)
        lo, hi = zip(*(RANGES[o] for o in OPS), strict=True)
        self._lo, self._hi = torch.tensor(lo), torch.tensor(hi)  # (14,)
        # RandAugment runs each op on its own rows only (grouped by op; the per-op counts are read on the host)
        # or every op on every row (masked; no host read). Same pixels either way. None: grouped on the CPU,
        # where the read is free and masking would run each pixel op on all rows instead of about 1/14 of them;
        # masked on an accelerator, where those ops are a few cheap kernels and a read would stall the device.
        self.group_ops = group_ops
        self._consts: dict[torch.device, dict[str, Tensor]] = {}

    def config(self) -> dict:
        """What config.json records about augmentation and normalisation."""
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                "hflip": self.hflip, "pad": self.pad, "strong_ops": list(OPS), "cutout_max": CUTOUT_MAX}  # fmt: skip

    def _on(self, device: torch.device) -> dict[str, Tensor]:
        """The constant tensors on `device`, copied there once (a copy of a host tensor is a host-device sync)."""
        c = self._consts.get(device)
        if c is None:
            std = torch.tensor(self.std).view(1, 3, 1, 1)
            c = {
                "scale": 1.0 / (255.0 * std),  # (1, 3, 1, 1)
                "shift": -torch.tensor(self.mean).view(1, 3, 1, 1) / std,
                "lo": self._lo, "hi": self._hi,  # (14,)
                "fill": torch.tensor(CUTOUT_FILL, dtype=torch.float32).view(1, 3, 1, 1),
            }  # fmt: skip
            c = self._consts[device] = {k: v.to(device) for k, v in c.items()}
        return c

    # ---------------------------------------------------------------------------------------------- params

    def sample_weak(self, n: int, generator: torch.Generator) -> Params:
        """dy, dx: crop shift in pixels, uniform in [-pad, pad] (0 = no shift); flip: bool."""
        dev = generator.device
        shift = torch.randint(-self.pad, self.pad + 1, (2, n), generator=generator, device=dev)  # (2, n)
        # Drawn even when flips are off, so the remaining draws do not depend on the setting.
        flip = torch.rand(n, generator=generator, device=dev) < 0.5  # (n,)
        return {"dy": shift[0], "dx": shift[1], "flip": flip & self.hflip}

    def sample_strong(self, n: int, generator: torch.Generator) -> Params:
        """Weak params plus op (index into OPS), mag (in the op's range) and the Cutout square."""
        p = self.sample_weak(n, generator)
        dev = generator.device
        op = torch.randint(0, len(OPS), (n,), generator=generator, device=dev)  # (n,)
        u = torch.rand(4, n, generator=generator, device=dev)  # (4, n)
        c = self._on(dev)
        lo, hi = c["lo"][op], c["hi"][op]  # (n,) each
        s = float(self.image_size)
        p.update(
            op=op,
            mag=lo + (hi - lo) * u[0],
            cut_cy=u[1] * s,  # centre in pixels, uniform over the image
            cut_cx=u[2] * s,
            cut_size=u[3] * (CUTOUT_MAX * s),  # side in pixels
        )
        return p

    @staticmethod
    def select(params: Params, rows: slice | Tensor) -> Params:
        """The params of some rows (e.g. this process's share of a global batch)."""
        return {k: v[rows] for k, v in params.items()}

    # ---------------------------------------------------------------------------------------------- apply

    def weak(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return self.apply_weak(x, self.sample_weak(x.shape[0], generator))

    def strong(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return self.apply_strong(x, self.sample_strong(x.shape[0], generator))

    def apply_weak(self, x: Tensor, params: Params) -> Tensor:
        p = self._check(x, params)
        return self.normalize(self._crop_flip(x, p))

    def apply_strong(self, x: Tensor, params: Params) -> Tensor:
        p = self._check(x, params)
        y = self._randaugment(self._crop_flip(x, p), p["op"], p["mag"])  # (B, 3, S, S) float, 0..255
        return self.normalize(self._cutout(y, p))

    def normalize(self, x: Tensor) -> Tensor:
        """0..255 images (uint8 or float) -> float32 (x / 255 - mean) / std; the test-time transform."""
        c = self._on(x.device)
        # copy=True: a float input must not be modified by the in-place ops below
        return x.to(torch.float32, copy=True).mul_(c["scale"]).add_(c["shift"])  # (B, 3, H, W)

    # ---------------------------------------------------------------------------------------------- steps

    def _check(self, x: Tensor, params: Params) -> Params:
        s = self.image_size
        if x.dtype != torch.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != (3, s, s):
            raise ValueError(f"expected uint8 (B, 3, {s}, {s}) images, got {x.dtype} {tuple(x.shape)}")
        bad = [k for k, v in params.items() if v.shape[0] != x.shape[0]]
        if bad:
            raise ValueError(f"params {bad} have {params[bad[0]].shape[0]} rows for {x.shape[0]} images")
        return {k: v.to(x.device) for k, v in params.items()}

    def _crop_flip(self, x: Tensor, p: Params) -> Tensor:
        """Shifted window of the zero-padded image, mirrored where flip: one gather for the whole batch."""
        b, c, h, w = x.shape
        pad = self.pad
        xp = F.pad(x, (pad, pad, pad, pad))  # (B, 3, H+2p, W+2p), zero border like RandomCrop(padding)
        ar_h = torch.arange(h, device=x.device)
        ar_w = torch.arange(w, device=x.device)
        rows = p["dy"][:, None] + pad + ar_h  # (B, H)
        cols = p["dx"][:, None] + pad + torch.where(p["flip"][:, None], w - 1 - ar_w, ar_w)  # (B, W)
        idx = (
            rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]
        )  # (B, H, W) flat index into the padded image
        out = xp.flatten(2).gather(2, idx.view(b, 1, h * w).expand(b, c, h * w))  # (B, 3, H*W)
        return out.view(b, c, h, w)

    def _randaugment(self, x: Tensor, op: Tensor, mag: Tensor) -> Tensor:
        """One op per sample: grouped by op on the CPU, masked elsewhere (see `group_ops`)."""
        group = x.device.type == "cpu" if self.group_ops is None else self.group_ops
        return (self._randaugment_grouped if group else self._randaugment_masked)(x, op, mag)

    def _randaugment_grouped(self, x: Tensor, op: Tensor, mag: Tensor) -> Tensor:
        """Samples are sorted by op so each op runs once on a contiguous slice."""
        order = torch.argsort(op, stable=True)  # (B,)
        counts = torch.bincount(op, minlength=len(OPS)).tolist()  # a host read of the op counts
        xs, ms, ops = x[order], mag[order], op[order]  # sorted by op
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)  # (B, 3, S, S), sorted order
        start = 0
        for k, name in enumerate(OPS[:FIRST_GEOMETRIC]):
            seg = slice(start, start + counts[k])
            if counts[k]:
                out[seg] = getattr(self, f"_{name}")(xs[seg], ms[seg].view(-1, 1, 1, 1))
            start = seg.stop
        if start < x.shape[0]:
            out[start:] = warp(xs[start:], ops[start:], ms[start:], first=FIRST_GEOMETRIC)
        unsorted = torch.empty_like(out)
        unsorted[order] = out
        return unsorted

    def _randaugment_masked(self, x: Tensor, op: Tensor, mag: Tensor) -> Tensor:
        """Every op on every sample, each row keeping its own op's result: no host read. The ops are per
        sample, so a row's pixels are those of the grouped path; the other rows' results (an op applied with
        another op's magnitude) are computed and dropped."""
        m = mag.view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        out = warp(x, op, mag, first=FIRST_GEOMETRIC)  # (B, 3, S, S) float; rows of a non-geometric op are overwritten below
        for k, name in enumerate(OPS[:FIRST_GEOMETRIC]):
            out = torch.where((op == k).view(-1, 1, 1, 1), getattr(self, f"_{name}")(x, m), out)
        return out

    def _cutout(self, y: Tensor, p: Params) -> Tensor:
        """Grey square: left/top edge = floor(max(0, centre - side/2)), cut off at the right/bottom border."""
        s = p["cut_size"]  # (B,)
        ar = torch.arange(self.image_size, device=y.device, dtype=torch.float32)  # (S,)
        y0 = (p["cut_cy"] - s / 2).clamp_min(0).floor()
        x0 = (p["cut_cx"] - s / 2).clamp_min(0).floor()
        in_y = (ar >= y0[:, None]) & (ar < (y0 + s)[:, None])  # (B, S)
        in_x = (ar >= x0[:, None]) & (ar < (x0 + s)[:, None])  # (B, S)
        mask = (in_y[:, :, None] & in_x[:, None, :])[:, None]  # (B, 1, S, S)
        return torch.where(mask, self._on(y.device)["fill"].to(y.dtype), y)

    # ------------------------------------------------------------------------ ops: uint8 (b, 3, S, S) in,
    # float32 0..255 integers out; m = magnitude (b, 1, 1, 1)

    @staticmethod
    def _identity(x: Tensor, m: Tensor) -> Tensor:
        return x.float()

    @staticmethod
    def _autocontrast(x: Tensor, m: Tensor) -> Tensor:
        return TF.autocontrast(x).float()  # per image and channel min/max, as PIL

    @staticmethod
    def _equalize(x: Tensor, m: Tensor) -> Tensor:
        return TF.equalize(x).float()  # per image and channel histogram, PIL's LUT scheme

    @staticmethod
    def _posterize(x: Tensor, m: Tensor) -> Tensor:
        # torchvision's posterize takes one bit count per call; a per-sample mask does the whole slice at once
        bits = m.floor().long().clamp(1, 8)  # (b, 1, 1, 1)
        mask = ((255 << (8 - bits)) & 255).to(torch.uint8)
        return (x & mask).float()

    @staticmethod
    def _solarize(x: Tensor, m: Tensor) -> Tensor:
        xf = x.float()
        return torch.where(xf >= m, 255.0 - xf, xf)  # invert pixels at or above the threshold, as PIL

    @staticmethod
    def _brightness(x: Tensor, m: Tensor) -> Tensor:
        return blend(x.float(), torch.zeros_like(m), m)  # degenerate = black

    @staticmethod
    def _color(x: Tensor, m: Tensor) -> Tensor:
        return blend(x.float(), grey(x).float(), m)  # degenerate = the greyscale image

    @staticmethod
    def _contrast(x: Tensor, m: Tensor) -> Tensor:
        g = grey(x)  # (b, 1, S, S) int32
        # PIL: int(mean + 0.5) of the greyscale image; integer sums keep it exact and batch-independent
        mean = g.sum(dim=(1, 2, 3), keepdim=True).double() / g[0].numel()  # (b, 1, 1, 1)
        return blend(x.float(), (mean + 0.5).floor().float(), m)

    @staticmethod
    def _sharpness(x: Tensor, m: Tensor) -> Tensor:
        # PIL's SMOOTH kernel [[1,1,1],[1,5,1],[1,1,1]] / 13 as integer shifted sums (exact, unlike a float
        # conv whose summation order may change with the batch); the 1-px border keeps the original pixels.
        xi = x.int()
        s = 4 * xi[..., 1:-1, 1:-1]
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                s += xi[
                    ..., dy : dy + xi.shape[-2] - 2, dx : dx + xi.shape[-1] - 2
                ]  # in place: no temporaries
        deg = xi.clone()
        deg[..., 1:-1, 1:-1] = torch.div(2 * s + 13, 26, rounding_mode="floor")  # round(s / 13)
        return blend(x.float(), deg.float(), m)
