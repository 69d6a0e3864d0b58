"""Fused op 1: KL[N(mu_p, e^logvar_p) || N(mu_q, e^logvar_q)] of diagonal Gaussians, per row.

reference -> registered ops (``urkle_fast::gaussian_kl``, ``urkle_fast::gaussian_kl_backward``) -> public
``gaussian_kl()``. Formula and gradients: docs/MATH.md section 2; calling convention: docs/KERNEL_CONTRACT.md.
"""

from __future__ import annotations

import torch
from torch import Tensor

from urkle_fast import _backend
from urkle_fast.ops._checks import check_choice, check_finite, check_same, check_tensor

REDUCTIONS = {"none": 0, "sum": 1, "mean": 2, "batchmean": 2}
_FN = "gaussian_kl"


def _acc(t: Tensor) -> Tensor:
    # float32 accumulation for low precision; float64 stays float64 (gradcheck)
    return t.to(torch.promote_types(t.dtype, torch.float32))


def gaussian_kl_reference(mu_p: Tensor, logvar_p: Tensor, mu_q: Tensor, logvar_q: Tensor,
                          reduction: str = "mean") -> Tensor:
    """Pure-torch KL per row of [B, D] inputs, accumulated in float32 (float64 stays float64).

    The test oracle and the last fallback; differentiable by autograd.
    """
    mp, lp, mq, lq = _acc(mu_p), _acc(logvar_p), _acc(mu_q), _acc(logvar_q)
    kl = 0.5 * ((lq - lp) + (torch.exp(lp) + (mp - mq) ** 2) * torch.exp(-lq) - 1.0).sum(-1)
    code = REDUCTIONS[reduction]
    return kl if code == 0 else kl.sum() if code == 1 else kl.mean()


def _reference_fwd(mu_p, logvar_p, mu_q, logvar_q, reduction: int) -> Tensor:
    return gaussian_kl_reference(mu_p, logvar_p, mu_q, logvar_q, ("none", "sum", "mean")[reduction])


def _reference_bwd(grad, mu_p, logvar_p, mu_q, logvar_q, reduction: int):
    mp, lp, mq, lq = _acc(mu_p), _acc(logvar_p), _acc(mu_q), _acc(logvar_q)
    g = _acc(grad)
    if reduction == 0:
        g = g[:, None]
    elif reduction == 2:
        g = g / mu_p.shape[0]
    inv_q = torch.exp(-lq)
    diff = mp - mq
    d_mp = g * diff * inv_q
    d_lp = 0.5 * g * (torch.exp(lp - lq) - 1.0)
    d_lq = 0.5 * g * (1.0 - (torch.exp(lp) + diff * diff) * inv_q)
    return (d_mp.to(mu_p.dtype), d_lp.to(logvar_p.dtype), (-d_mp).to(mu_q.dtype), d_lq.to(logvar_q.dtype))


def _backend_for(t: Tensor) -> str:
    return _backend.select_for("gaussian_kl", t)


@torch.library.triton_op("urkle_fast::gaussian_kl", mutates_args=())
def _gaussian_kl_op(mu_p: Tensor, logvar_p: Tensor, mu_q: Tensor, logvar_q: Tensor, reduction: int) -> Tensor:
    backend = _backend_for(mu_p)
    if backend == "triton":
        k = _backend.kernels_module("gaussian_kl")
        return k.gaussian_kl_fwd(mu_p, logvar_p, mu_q, logvar_q, reduction, launch=torch.library.wrap_triton)
    if backend == "native":
        return torch.ops.urkle_fast.gaussian_kl_fwd_native(mu_p, logvar_p, mu_q, logvar_q, reduction)
    return _reference_fwd(mu_p, logvar_p, mu_q, logvar_q, reduction)


@torch.library.triton_op("urkle_fast::gaussian_kl_backward", mutates_args=())
def _gaussian_kl_backward_op(grad: Tensor, mu_p: Tensor, logvar_p: Tensor, mu_q: Tensor, logvar_q: Tensor,
                             reduction: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    backend = _backend_for(mu_p)
    if backend == "triton":
        k = _backend.kernels_module("gaussian_kl")
        return k.gaussian_kl_bwd(grad, mu_p, logvar_p, mu_q, logvar_q, reduction,
                                 launch=torch.library.wrap_triton)
    if backend == "native":
        return tuple(torch.ops.urkle_fast.gaussian_kl_bwd_native(grad, mu_p, logvar_p, mu_q, logvar_q, reduction))
    return _reference_bwd(grad, mu_p, logvar_p, mu_q, logvar_q, reduction)


def _setup_context(ctx, inputs, output):
    mu_p, logvar_p, mu_q, logvar_q, reduction = inputs
    ctx.save_for_backward(mu_p, logvar_p, mu_q, logvar_q)
    ctx.reduction = reduction


def _backward(ctx, grad):
    mu_p, logvar_p, mu_q, logvar_q = ctx.saved_tensors
    grads = torch.ops.urkle_fast.gaussian_kl_backward(grad.contiguous(), mu_p, logvar_p, mu_q, logvar_q,
                                                      ctx.reduction)
    return (*grads, None)


_gaussian_kl_op.register_autograd(_backward, setup_context=_setup_context)

if _backend.native_ops_present():
    @torch.library.register_fake("urkle_fast::gaussian_kl_fwd_native")
    def _(mu_p, logvar_p, mu_q, logvar_q, reduction):
        shape = (mu_p.shape[0],) if reduction == 0 else ()
        return mu_p.new_empty(shape, dtype=torch.float32)

    @torch.library.register_fake("urkle_fast::gaussian_kl_bwd_native")
    def _(grad, mu_p, logvar_p, mu_q, logvar_q, reduction):
        return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (mu_p, logvar_p, mu_q, logvar_q))


def gaussian_kl(mu_p: Tensor, logvar_p: Tensor, mu_q: Tensor, logvar_q: Tensor, reduction: str = "mean") -> Tensor:
    """KL[p || q] of diagonal Gaussians given by means and log-variances, one KL per row.

    Args:
        mu_p, logvar_p, mu_q, logvar_q: [B, D] tensors of one dtype (float32, bfloat16, float16;
            float64 runs the reference) on one device. Any strides.
        reduction: "none" -> [B], "sum" -> [], "mean" / "batchmean" (over B) -> [].
    Returns:
        float32 (float64 for float64 inputs). Differentiable w.r.t. all four inputs.
    """
    check_tensor(_FN, "mu_p", mu_p, ndim=2)
    check_same(_FN, "mu_p", mu_p, {"logvar_p": logvar_p, "mu_q": mu_q, "logvar_q": logvar_q})
    check_choice(_FN, "reduction", reduction, tuple(REDUCTIONS))
    if mu_p.shape[0] == 0:
        raise ValueError(f"{_FN}: mu_p must have at least one row, got shape {tuple(mu_p.shape)} (empty batch)")
    if mu_p.shape[1] == 0:
        raise ValueError(f"{_FN}: mu_p must have at least one column, got shape {tuple(mu_p.shape)}")
    check_finite(_FN, {"mu_p": mu_p, "logvar_p": logvar_p, "mu_q": mu_q, "logvar_q": logvar_q})
    return torch.ops.urkle_fast.gaussian_kl(mu_p, logvar_p, mu_q, logvar_q, REDUCTIONS[reduction])
