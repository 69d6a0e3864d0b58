"""Batched multi-view augmentation on the training device (CPU or GPU), seeded per batch.

``MultiViewAugment(views=2, size=32, preset="simclr")(x, generator) -> [V, B, C, S, S]``, x a batch
[B, C, H, W] (uint8 or float in [0, 1]). Every random draw comes from the explicit generator, so a
batch's crops are a function of (seed, step): a resumed run gets the same crops. ``.lazy(x, generator)``
draws the same parameters and returns ``LazyViews``, which makes the views chunk by chunk on demand.

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
        """Every view of the whole batch at once: float32 [V, B, C, S, S]."""
        return self.lazy(x, generator).materialize()

    def lazy(self, x: torch.Tensor, generator: torch.Generator) -> "LazyViews":
        """The views of ``x`` drawn now, made later chunk by chunk (``LazyViews``): the batch stays as it came
        (uint8 for decoded images, a quarter of float32), and a chunk's views are exactly the whole batch's rows."""
        params = [self.sample(x.shape[0], x.shape[1] == 3, generator, x.device) for _ in range(self.views)]
        return LazyViews(x, self, params)

    def sample(self, B: int, rgb: bool, g: torch.Generator, dev) -> dict:
        """One view's random parameters, one row per image, drawn in a fixed order from ``g``."""
        p: dict = {}
        if self.preset == "none":
            return p
        if self.preset == "light":
            p["w"] = p["h"] = torch.ones(B, device=dev)
            shift = 0.25  # 1/8 of the side in [-1, 1] coordinates
            p["cx"], p["cy"] = _uniform(B, -shift, shift, g, dev), _uniform(B, -shift, shift, g, dev)
        else:
            scale = self.crop_scale or ((0.08, 1.0) if self.preset == "simclr" else (0.5, 1.0))
            ratio = (3 / 4, 4 / 3) if self.preset == "simclr" else (0.8, 1.25)
            area = _uniform(B, *scale, g, dev)
            logr = _uniform(B, math.log(ratio[0]), math.log(ratio[1]), g, dev)
            p["w"] = torch.sqrt(area * torch.exp(logr)).clamp(max=1.0)
            p["h"] = torch.sqrt(area / torch.exp(logr)).clamp(max=1.0)
            p["cx"] = (torch.rand(B, generator=g, device=dev) * 2 - 1) * (1 - p["w"])
            p["cy"] = (torch.rand(B, generator=g, device=dev) * 2 - 1) * (1 - p["h"])
        p["sx"] = p["w"]
        if self.preset in ("simclr", "light") and rgb:  # flip (not for digits: they are not mirror invariant)
            p["sx"] = torch.where(torch.rand(B, generator=g, device=dev) < 0.5, -1.0, 1.0) * p["w"]
        if self.preset == "simclr" and rgb:
            bri, con, sat, hue = self.jitter
            p["bri"], p["con"] = _uniform(B, 1 - bri, 1 + bri, g, dev), _uniform(B, 1 - con, 1 + con, g, dev)
            p["sat"], p["hue"] = _uniform(B, 1 - sat, 1 + sat, g, dev), _uniform(B, -hue, hue, g, dev) * 2 * math.pi
            p["apply"] = torch.rand(B, generator=g, device=dev) < self.jitter_p
            p["gray"] = torch.rand(B, generator=g, device=dev) < self.gray_p
        return p

    def apply(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        """One view of the images ``x`` [b, C, H, W] (uint8 or float) with their rows of ``sample``'s parameters."""
        x = to_float01(x)
        B, C, H, W = x.shape
        if self.preset == "none":
            return x if (H, W) == (self.size, self.size) else F.interpolate(x, size=self.size, mode="bilinear",
                                                                             align_corners=False, antialias=True)
        # geometry: one affine sampling grid per image (crop box + flip), bilinear resampling
        theta = torch.zeros(B, 2, 3, device=x.device)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = p["sx"], p["cx"], p["h"], p["cy"]
        grid = F.affine_grid(theta, [B, C, self.size, self.size], align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        if "bri" in p:
            out = self._color(out, p)
        return out.clamp_(0.0, 1.0)

    def _color(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        B = x.shape[0]
        col = lambda t: t.view(B, 1, 1, 1)  # noqa: E731
        y = x * col(p["bri"])
        m = _gray(y).mean(dim=(1, 2, 3), keepdim=True)
        y = ((y - m) * col(p["con"]) + m).clamp(0, 1)
        gr = _gray(y)
        y = ((y - gr) * col(p["sat"]) + gr).clamp(0, 1)
        # hue: rotate the chroma plane of YIQ by 2*pi*h
        yiq, rgb_m = _yiq_matrices(x.device)
        q = torch.einsum("ij,bjhw->bihw", yiq, y)
        c, s = torch.cos(p["hue"]).view(B, 1, 1), torch.sin(p["hue"]).view(B, 1, 1)
        i2 = c * q[:, 1] - s * q[:, 2]
        q2 = s * q[:, 1] + c * q[:, 2]
        y = torch.einsum("ij,bjhw->bihw", rgb_m, torch.stack([q[:, 0], i2, q2], 1)).clamp(0, 1)
        y = torch.where(col(p["apply"]), y, x)
        return torch.where(col(p["gray"]), _gray(y).expand_as(y), y)


class LazyViews:
    """V augmented views of one batch, computed chunk by chunk: ``views[:, i:j]`` is float32 [V, j - i, C, S, S],
    equal to those rows of the whole batch's views. ``shape`` and ``device`` are those of the full tensor.

    Why: at batch 4096 and 224 pixels, two float32 views of the batch are 4.9 GB (and the colour jitter holds a
    few more copies), while the decoded uint8 batch is 0.8 GB. The micro-batched step (urkle_fast.microbatch)
    asks for one chunk at a time, so resident memory grows with the micro-batch, not with the batch."""

    def __init__(self, images: torch.Tensor, augment: MultiViewAugment, params: list[dict]):
        self.images, self.augment, self.params = images, augment, params
        self.channels_last = False  # chunks come out in channels-last memory format (the trainer sets it on CUDA)
        B, C = images.shape[:2]
        self.shape = torch.Size([len(params), B, C, augment.size, augment.size])
        self.device, self.dtype = images.device, torch.float32

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> torch.Tensor:
        if not (isinstance(key, tuple) and len(key) == 2 and key[0] == slice(None) and isinstance(key[1], slice)
                and key[1].step in (None, 1)):
            raise TypeError(f"LazyViews takes views[:, i:j] (a chunk of images), got {key!r}")
        sl = slice(*key[1].indices(self.shape[1])[:2])
        x = self.images[sl]
        out = torch.stack([self.augment.apply(x, {k: v[sl] for k, v in p.items()}) for p in self.params])
        if self.channels_last:
            out = out.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(out.shape)
        return out

    def materialize(self) -> torch.Tensor:
        return self[:, :]
