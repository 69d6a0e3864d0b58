"""Heads shared by every backbone: pixel normalisation, the Gaussian head, the SimCLR projector."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class Normalize(nn.Module):
    """(x - mean) / std per channel, so that inputs and attack epsilons stay in [0, 1] pixels."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class GaussianHead(nn.Module):
    """Linear layer with 2*d_z outputs -> (mu, logvar) of a diagonal Gaussian, both [B, d_z].

    variance="softplus" (default): sigma = softplus(r) + sigma_min, logvar = 2 log sigma; the floor
    keeps the KL's exp(-logvar_q) bounded. variance="exp": logvar = r (clamped to [-20, 10]).
    """

    def __init__(self, in_dim: int, d_z: int, variance: str = "softplus", sigma_min: float = 1e-2):
        super().__init__()
        if variance not in ("softplus", "exp"):
            raise ValueError(f"variance must be 'softplus' or 'exp', got {variance!r}")
        self.d_z, self.variance, self.sigma_min = d_z, variance, float(sigma_min)
        self.fc = nn.Linear(in_dim, 2 * d_z)
        # start with sigma about 0.1 (softplus(r) ~ 0.1 - floor): a sharp but not degenerate posterior
        with torch.no_grad():
            self.fc.bias[d_z:].fill_(math.log(math.expm1(0.1)) if variance == "softplus" else 2 * math.log(0.1))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [B, in_dim] (any float dtype) -> (mu, logvar), float32 even under autocast.

        Why float32: near the sigma floor (0.01) bf16's rounding of mu (8 bits: 0.008 at |mu| = 2, 0.03 at
        |mu| = 8) is as large as sigma, and the KL, in units of (delta mu / sigma)^2, would become rounding
        noise (a KL of 10.3 reads 37.7 at |mu| = 2), and so would the attack that maximises it. One
        [B, in_dim] x [in_dim, 2 d_z] layer in float32 costs nothing next to the bf16 backbone."""
        with torch.autocast(device_type=h.device.type, enabled=False):
            out = self.fc(h.float())
        mu, r = out[:, : self.d_z], out[:, self.d_z :]
        if self.variance == "softplus":
            logvar = 2.0 * torch.log(F.softplus(r) + self.sigma_min)
        else:
            logvar = r.clamp(-20.0, 10.0)
        return mu, logvar


class Projector(nn.Module):
    """SimCLR projector g(z): Linear -> BatchNorm -> ReLU -> Linear."""

    def __init__(self, d_z: int, hidden: int, out: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_z, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def make_head(kind: str, d_in: int, num_classes: int, hidden: int = 256) -> nn.Module:
    """``linear``: one layer; ``mlp3``: three FC layers, BN + ReLU after the first two (MNIST)."""
    if kind == "linear":
        return nn.Linear(d_in, num_classes)
    if kind == "mlp3":
        return nn.Sequential(
            nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )
    raise ValueError(f"unknown head kind {kind!r}; expected 'linear' or 'mlp3'")
