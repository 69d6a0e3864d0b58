"""Batched multi-view augmentation on the training device (CPU or GPU), seeded per batch.

``MultiViewAugment(views=2, size=32, preset="simclr")(x, generator) -> [V, B, C, S, S]``, x a batch
[B, C, H, W] (uint8 or float in [0, 1]). Every random draw comes from the explicit generator, so a
batch's crops are a function of (seed, step): a resumed run gets the same crops.

Presets (each method names its grey and its colour preset: urkle_fast.methods.Method.presets):
* "simclr": random resized crop (scale 0.08-1, ratio 3/4-4/3), horizontal flip, colour jitter
  (brightness 0.4, contrast 0.4, saturation 0.4, hue 0.1) with p=0.8, grayscale p=0.2 (SimCLR's
  CIFAR recipe; jitter and grayscale only for RGB).
* "digits": random resized crop (scale 0.5-1, ratio 0.8-1.25), no flip (digits are not mirror
  invariant), no colour; used for MNIST and the 8x8 digits.
* "light": translation up to 1/8 of the side plus flip for RGB (supervised / VAE baselines).
* "none": the image itself (resized to S if needed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .datasets import to_float01

PRESETS = ("simclr", "digits", "light", "none")


def _gray(x: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, 1, H, W]
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_CACHE: dict = {}


def _yiq_matrices(dev) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB->YIQ and its inverse on ``dev``, made once per device: building them per call would copy
    from the host (and torch.linalg.inv checks its result) each time, a GPU sync per view per step."""
    key = str(dev)
    if key not in _YIQ_CACHE:
        _YIQ_CACHE[key] = (_YIQ.to(dev), torch.linalg.inv(_YIQ).to(dev))
    return _YIQ_CACHE[key]


@dataclass
class MultiViewAugment:
    views: int = 2
    size: int = 32
    preset: str = "simclr"
    crop_scale: Optional[tuple] = None
    jitter: tuple = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"unknown augmentation preset {self.preset!r}; expected one of {PRESETS}")

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = to_float01(x)
        return torch.stack([self.one_view(x, generator) for _ in range(self.views)])

    def one_view(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        B, C, H, W = x.shape
        dev = x.device
        rgb = C == 3
        if self.preset == "none":
            return x if (H, W) == (self.size, self.size) else F.interpolate(x, size=self.size, mode="bilinear",
                                                                             align_corners=False, antialias=True)
        # geometry: one affine sampling grid per image (crop box + flip), bilinear resampling
        if self.preset == "light":
            w = h = torch.ones(B, device=dev)
            shift = 0.25  # 1/8 of the side in [-1, 1] coordinates
            cx, cy = _uniform(B, -shift, shift, g, dev), _uniform(B, -shift, shift, g, dev)
        else:
            scale = self.crop_scale or ((0.08, 1.0) if self.preset == "simclr" else (0.5, 1.0))
            ratio = (3 / 4, 4 / 3) if self.preset == "simclr" else (0.8, 1.25)
            area = _uniform(B, *scale, g, dev)
            logr = _uniform(B, math.log(ratio[0]), math.log(ratio[1]), g, dev)
            w = torch.sqrt(area * torch.exp(logr)).clamp(max=1.0)
            h = torch.sqrt(area / torch.exp(logr)).clamp(max=1.0)
            cx = (torch.rand(B, generator=g, device=dev) * 2 - 1) * (1 - w)
            cy = (torch.rand(B, generator=g, device=dev) * 2 - 1) * (1 - h)
        flip = self.preset in ("simclr", "light") and rgb
        sx = torch.where(torch.rand(B, generator=g, device=dev) < 0.5, -1.0, 1.0) * w if flip else w
        theta = torch.zeros(B, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, h, cy
        grid = F.affine_grid(theta, [B, C, self.size, self.size], align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        if self.preset == "simclr" and rgb:
            out = self._color(out, g)
        return out.clamp_(0.0, 1.0)

    def _color(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        B, dev = x.shape[0], x.device
        bri, con, sat, hue = self.jitter
        col = lambda t: t.view(B, 1, 1, 1)  # noqa: E731
        y = x * col(_uniform(B, 1 - bri, 1 + bri, g, dev))
        m = _gray(y).mean(dim=(1, 2, 3), keepdim=True)
        y = ((y - m) * col(_uniform(B, 1 - con, 1 + con, g, dev)) + m).clamp(0, 1)
        gr = _gray(y)
        y = ((y - gr) * col(_uniform(B, 1 - sat, 1 + sat, g, dev)) + gr).clamp(0, 1)
        # hue: rotate the chroma plane of YIQ by 2*pi*h
        ang = _uniform(B, -hue, hue, g, dev) * 2 * math.pi
        yiq, rgb_m = _yiq_matrices(dev)
        q = torch.einsum("ij,bjhw->bihw", yiq, y)
        c, s = torch.cos(ang).view(B, 1, 1), torch.sin(ang).view(B, 1, 1)
        i2 = c * q[:, 1] - s * q[:, 2]
        q2 = s * q[:, 1] + c * q[:, 2]
        y = torch.einsum("ij,bjhw->bihw", rgb_m, torch.stack([q[:, 0], i2, q2], 1)).clamp(0, 1)
        apply = (torch.rand(B, generator=g, device=dev) < self.jitter_p).view(B, 1, 1, 1)
        y = torch.where(apply, y, x)
        to_gray = (torch.rand(B, generator=g, device=dev) < self.gray_p).view(B, 1, 1, 1)
        return torch.where(to_gray, _gray(y).expand_as(y), y)
