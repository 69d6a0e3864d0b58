"""Fused op 2: the PGD sign-step-and-clip (l_inf) and the l2 step, in place; and the random start.

reference -> registered ops (``urkle_fast::pgd_step_linf_``, ``urkle_fast::pgd_step_l2_``,
``urkle_fast::pgd_random_start``) -> public ``pgd_step_()`` / ``pgd_random_start()``.
docs/MATH.md section 3; calling convention: docs/KERNEL_CONTRACT.md.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from urkle_fast import _backend
from urkle_fast.ops._checks import check_choice, check_finite, check_number, check_same, check_tensor

NORMS = ("linf", "l2")
_NORM_FLOOR = 1e-12


def _per_sample_norm(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(_NORM_FLOOR).view(-1, *([1] * (t.dim() - 1)))


def pgd_step_reference_(x_adv: Tensor, grad: Tensor, x_orig: Tensor, *, alpha: float, eps: float,
                        lo: float = 0.0, hi: float = 1.0, norm: str = "linf") -> Tensor:
    """Pure-torch PGD step, in place on ``x_adv`` (computed in float32, rounded once). Returns x_adv."""
    acc = torch.promote_types(x_adv.dtype, torch.float32)
    x, g, x0 = x_adv.to(acc), grad.to(acc), x_orig.to(acc)
    if norm == "linf":
        x = x + alpha * torch.sign(g)
        x = torch.minimum(torch.maximum(x, x0 - eps), x0 + eps)
    else:
        x = x + alpha * g / _per_sample_norm(g)
        delta = x - x0
        delta = delta * torch.clamp(eps / _per_sample_norm(delta), max=1.0)
        x = x0 + delta
    x_adv.copy_(x.clamp(lo, hi))
    return x_adv


def pgd_random_start_reference(x: Tensor, eps: float, *, lo: float = 0.0, hi: float = 1.0, norm: str = "linf",
                               generator: Optional[torch.Generator] = None) -> Tensor:
    """Uniform start in the eps ball (l_inf: per element; l2: uniform direction and radius), clipped."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    if norm == "linf":
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=acc)
        out = xf + eps * (2.0 * u - 1.0)
    else:
        d = torch.randn(x.shape, generator=generator, device=x.device, dtype=acc)
        d = d / _per_sample_norm(d)
        n = x[0].numel()
        r = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=generator, device=x.device, dtype=acc)
        out = xf + eps * r.pow(1.0 / n) * d
    return out.clamp(lo, hi).to(x.dtype)


def _backend_for(t: Tensor) -> str:
    return _backend.select_for("pgd", t)


@torch.library.triton_op("urkle_fast::pgd_step_linf_", mutates_args={"x_adv"})
def _pgd_step_linf_op(x_adv: Tensor, grad: Tensor, x_orig: Tensor, alpha: float, eps: float, lo: float,
                      hi: float) -> None:
    backend = _backend_for(x_adv)
    if backend == "triton":
        _backend.kernels_module("pgd").pgd_step_linf_(x_adv, grad, x_orig, alpha, eps, lo, hi,
                                                      launch=torch.library.wrap_triton)
    elif backend == "native":
        torch.ops.urkle_fast.pgd_step_linf_native_(x_adv, grad, x_orig, alpha, eps, lo, hi)
    else:
        pgd_step_reference_(x_adv, grad, x_orig, alpha=alpha, eps=eps, lo=lo, hi=hi, norm="linf")


@torch.library.triton_op("urkle_fast::pgd_step_l2_", mutates_args={"x_adv"})
def _pgd_step_l2_op(x_adv: Tensor, grad: Tensor, x_orig: Tensor, alpha: float, eps: float, lo: float,
                    hi: float) -> None:
    backend = _backend_for(x_adv)
    if backend == "triton":
        _backend.kernels_module("pgd").pgd_step_l2_(x_adv, grad, x_orig, alpha, eps, lo, hi,
                                                    launch=torch.library.wrap_triton)
    elif backend == "native":
        torch.ops.urkle_fast.pgd_step_l2_native_(x_adv, grad, x_orig, alpha, eps, lo, hi)
    else:
        pgd_step_reference_(x_adv, grad, x_orig, alpha=alpha, eps=eps, lo=lo, hi=hi, norm="l2")


# The random start is a plain custom op, opaque to the compiler: its CPU path draws from a seeded
# torch.Generator, which a trace cannot capture. The Triton path (CUDA) uses tl.rand(seed, offset).
@torch.library.custom_op("urkle_fast::pgd_random_start", mutates_args=())
def _pgd_random_start_op(x: Tensor, eps: float, lo: float, hi: float, norm: int, seed: int) -> Tensor:
    if norm == 0 and x.dtype != torch.float64 and _backend.select("pgd", x.device) == "triton":
        return _backend.kernels_module("pgd").pgd_random_start(x, eps, lo, hi, seed)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    return pgd_random_start_reference(x, eps, lo=lo, hi=hi, norm=NORMS[norm], generator=gen)


@_pgd_random_start_op.register_fake
def _(x, eps, lo, hi, norm, seed):
    return torch.empty_like(x)


if _backend.native_ops_present():
    @torch.library.register_fake("urkle_fast::pgd_step_linf_native_")
    def _(x_adv, grad, x_orig, alpha, eps, lo, hi):
        return None

    @torch.library.register_fake("urkle_fast::pgd_step_l2_native_")
    def _(x_adv, grad, x_orig, alpha, eps, lo, hi):
        return None


def _check_step_args(fn, x_adv, grad, x_orig, alpha, eps, lo, hi, norm):
    check_tensor(fn, "x_adv", x_adv)
    check_same(fn, "x_adv", x_adv, {"grad": grad, "x_orig": x_orig})
    check_choice(fn, "norm", norm, NORMS)
    alpha = check_number(fn, "alpha", alpha, minimum=0.0)
    eps = check_number(fn, "eps", eps, minimum=0.0)
    lo, hi = check_number(fn, "lo", lo), check_number(fn, "hi", hi)
    if not lo <= hi:
        raise ValueError(f"{fn}: lo must be <= hi, got lo={lo}, hi={hi}")
    if x_adv.numel() == 0:
        raise ValueError(f"{fn}: x_adv must not be empty, got shape {tuple(x_adv.shape)}")
    if norm == "l2" and x_adv.dim() < 2:
        raise ValueError(f"{fn}: x_adv must be at least 2-D [samples, ...] for norm='l2', got shape "
                         f"{tuple(x_adv.shape)}")
    return alpha, eps, lo, hi


def pgd_step_(x_adv: Tensor, grad: Tensor, x_orig: Tensor, *, alpha: float, eps: float, lo: float = 0.0,
              hi: float = 1.0, norm: str = "linf") -> Tensor:
    """One PGD ascent step in place: step along sign(grad) (l_inf) or grad/||grad|| per sample (l2),
    project onto the eps ball around ``x_orig``, clip to [lo, hi].

    Args:
        x_adv: the current iterate, any shape and layout, float32/bfloat16/float16; updated in place.
            Must not require grad (pass ``x.detach()``).
        grad: gradient of the objective w.r.t. x_adv; same shape, dtype and device.
        x_orig: the clean input the ball is centred on; same shape, dtype and device.
        alpha: step size >= 0; eps: radius >= 0; lo <= hi: the box; norm: "linf" or "l2" (dim 0 = samples).
    Returns:
        x_adv.
    """
    fn = "pgd_step_"
    alpha, eps, lo, hi = _check_step_args(fn, x_adv, grad, x_orig, alpha, eps, lo, hi, norm)
    if x_adv.requires_grad:
        raise ValueError(f"{fn}: x_adv must not require grad (it is updated in place); pass x_adv.detach()")
    check_finite(fn, {"grad": grad, "x_orig": x_orig})
    op = torch.ops.urkle_fast.pgd_step_linf_ if norm == "linf" else torch.ops.urkle_fast.pgd_step_l2_
    op(x_adv, grad.detach(), x_orig.detach(), alpha, eps, lo, hi)
    return x_adv


def pgd_random_start(x: Tensor, eps: float, *, lo: float = 0.0, hi: float = 1.0, norm: str = "linf",
                     seed: Optional[int] = None) -> Tensor:
    """A new tensor drawn uniformly from the eps ball around ``x`` (l_inf: per element; l2: uniform in
    the ball per sample), clipped to [lo, hi]. Same ``seed`` gives the same result on a given backend;
    ``seed=None`` draws one from torch's global generator, so ``torch.manual_seed`` governs it.
    """
    fn = "pgd_random_start"
    check_tensor(fn, "x", x)
    check_choice(fn, "norm", norm, NORMS)
    eps = check_number(fn, "eps", eps, minimum=0.0)
    lo, hi = check_number(fn, "lo", lo), check_number(fn, "hi", hi)
    if not lo <= hi:
        raise ValueError(f"{fn}: lo must be <= hi, got lo={lo}, hi={hi}")
    if x.numel() == 0:
        raise ValueError(f"{fn}: x must not be empty, got shape {tuple(x.shape)}")
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"{fn}: seed must be an int in [0, 2**63) or None, got {seed!r}")
    return torch.ops.urkle_fast.pgd_random_start(x.detach(), eps, lo, hi, NORMS.index(norm), seed)
