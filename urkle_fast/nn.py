"""Thin nn.Module forms of the fused ops (no logic of their own)."""

from __future__ import annotations

from torch import Tensor, nn

from urkle_fast.ops import gaussian_kl, nt_xent


class GaussianKL(nn.Module):
    """``GaussianKL(reduction)(mu_p, logvar_p, mu_q, logvar_q)`` == ``gaussian_kl(...)``."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, mu_p: Tensor, logvar_p: Tensor, mu_q: Tensor, logvar_q: Tensor) -> Tensor:
        return gaussian_kl(mu_p, logvar_p, mu_q, logvar_q, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class NTXent(nn.Module):
    """``NTXent(views, temperature, denominator, gather_distributed)(z)`` == ``nt_xent(z, ...)``
    (``gather_distributed=True``: over every rank's batch under torch.distributed, as lightly's
    ``NTXentLoss(gather_distributed=True)``)."""

    def __init__(self, views: int, temperature: float = 0.5, denominator: str = "all", gather_distributed: bool = False):
        super().__init__()
        self.views, self.temperature, self.denominator = views, temperature, denominator
        self.gather_distributed = gather_distributed

    def forward(self, z: Tensor) -> Tensor:
        return nt_xent(z, views=self.views, temperature=self.temperature, denominator=self.denominator,
                       gather_distributed=self.gather_distributed)

    def extra_repr(self) -> str:
        return (f"views={self.views}, temperature={self.temperature}, denominator={self.denominator!r}, "
                f"gather_distributed={self.gather_distributed}")
