"""Pixel arithmetic of pipeline/augment.py that equals PIL's: greyscale, ImageEnhance blending and the
geometric ops in one grid_sample (split from augment.py; hand-written because torchvision's v2 functional
ops take one parameter per call, not one per sample of the batch)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def grey(x: Tensor) -> Tensor:
    """PIL's RGB -> L, exact in integers: (19595 R + 38470 G + 7471 B + 2^15) >> 16. (b, 1, S, S) int32."""
    xi = x.int()
    return (19595 * xi[:, 0:1] + 38470 * xi[:, 1:2] + 7471 * xi[:, 2:3] + 32768) >> 16


def blend(x: Tensor, degenerate: Tensor, factor: Tensor) -> Tensor:
    """PIL ImageEnhance: degenerate + factor * (image - degenerate), clipped to 0..255 and truncated as PIL's
    blend does (so the results equal PIL's pixel for pixel)."""
    return (degenerate + factor * (x - degenerate)).clamp(0, 255).trunc()


def warp(x: Tensor, op: Tensor, mag: Tensor, *, first: int) -> Tensor:
    """Rotate / ShearX/Y / TranslateX/Y in one grid_sample with a per-sample affine map (output -> input).

    Coordinates are normalised to [-1, 1] (y down) at pixel centres. Rotation is about the centre and
    counter-clockwise (PIL `rotate`); shear is about the top-left corner (PIL `transform(AFFINE, (1, v, 0,
    0, 1, 0))`: x_in = x + v * y); translation moves by mag x width. Nearest sampling and zero fill as PIL.
    """
    b, _, h, w = x.shape
    rot, shx, shy, tx, ty = (op == first + i for i in range(5))  # op indices first..first+4
    rad = mag * (math.pi / 180.0)
    cos = torch.where(rot, torch.cos(rad), torch.ones_like(mag))  # (b,)
    sin = torch.where(rot, torch.sin(rad), torch.zeros_like(mag))
    zero = torch.zeros_like(mag)
    sx, sy = torch.where(shx, mag, zero), torch.where(shy, mag, zero)  # (b,)
    tx, ty = torch.where(tx, 2 * mag, zero), torch.where(ty, 2 * mag, zero)  # 2 = width of [-1, 1]
    # Each sample has one op, so the matrices add up without interfering:
    # x_in = cos*u + (sx - sin)*v + (sx + tx);  y_in = (sin + sy)*u + cos*v + (sy + ty)
    u = ((torch.arange(w, device=x.device) * 2 + 1) / w - 1).view(1, 1, w)  # (1, 1, W) pixel-centre x
    v = ((torch.arange(h, device=x.device) * 2 + 1) / h - 1).view(1, h, 1)  # (1, H, 1) pixel-centre y
    gx = cos.view(b, 1, 1) * u + (sx - sin).view(b, 1, 1) * v + (sx + tx).view(b, 1, 1)  # (b, H, W)
    gy = (sin + sy).view(b, 1, 1) * u + cos.view(b, 1, 1) * v + (sy + ty).view(b, 1, 1)  # (b, H, W)
    grid = torch.stack([gx, gy], dim=-1)  # (b, H, W, 2)
    return F.grid_sample(x.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
