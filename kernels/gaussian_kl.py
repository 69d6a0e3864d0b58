"""Triton kernels for the Gaussian KL (docs/MATH.md section 2, docs/KERNEL_CONTRACT.md "Gaussian KL").

    KL_b = 1/2 * sum_d [(lq - lp) + exp(lp - lq) + (mp - mq)^2 * exp(-lq) - 1]

Forward: one program per block of rows walks D in chunks and writes the per-row KL (float32); for
sum / mean a one-program kernel adds the rows up in a fixed order (deterministic, no atomics, no
zero-filled output to launch first). Backward: one pass over a 2-D grid of [rows, D] tiles that
recomputes everything from the four inputs and writes the four gradients. Memory-bound both ways:
wide tiles over contiguous D, float32 math, exp2 with log2(e) folded into the argument.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Widest D chunk one tile holds. Small under the interpreter so that the D loop and its tail are
# exercised by small test shapes (D = 129 -> two chunks).
MAX_BLOCK_D = 128 if _INTERPRET else 1024


def _identity(kernel):
    return kernel


def _configs():
    # TILE = elements of one [BLOCK_B, BLOCK_D] tile; BLOCK_B = TILE // BLOCK_D rows (TILE >= MAX_BLOCK_D).
    if _INTERPRET:
        return [triton.Config({"TILE": 2048}, num_warps=4)]
    return [
        triton.Config({"TILE": 1024}, num_warps=4),
        triton.Config({"TILE": 2048}, num_warps=4),
        triton.Config({"TILE": 2048}, num_warps=8),
        triton.Config({"TILE": 4096}, num_warps=8),
    ]


@triton.autotune(configs=_configs(), key=["B", "D"])
@triton.jit
def _gaussian_kl_fwd_kernel(
    mu_p_ptr,  # [B, D]
    logvar_p_ptr,  # [B, D]
    mu_q_ptr,  # [B, D]
    logvar_q_ptr,  # [B, D]
    kl_ptr,  # [B] float32
    B,
    D,
    stride_mp,  # row strides (the column stride is 1)
    stride_lp,
    stride_mq,
    stride_lq,
    BLOCK_D: tl.constexpr,
    TILE: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    BLOCK_B: tl.constexpr = TILE // BLOCK_D
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    cols = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        mask = row_mask[:, None] & (c < D)[None, :]
        mp = tl.load(mu_p_ptr + rows[:, None] * stride_mp + c[None, :], mask=mask, other=0.0).to(tl.float32)
        lp = tl.load(logvar_p_ptr + rows[:, None] * stride_lp + c[None, :], mask=mask, other=0.0).to(tl.float32)
        mq = tl.load(mu_q_ptr + rows[:, None] * stride_mq + c[None, :], mask=mask, other=0.0).to(tl.float32)
        lq = tl.load(logvar_q_ptr + rows[:, None] * stride_lq + c[None, :], mask=mask, other=0.0).to(tl.float32)
        diff = mp - mq
        # exp(lp - lq) rather than exp(lp) * exp(-lq): same value, no overflow for large |lp|, |lq|.
        # Masked lanes load zeros and give (0 + 1 + 0 - 1) = 0, but keep the where for clarity.
        term = (lq - lp) + tl.exp2((lp - lq) * LOG2E) + diff * diff * tl.exp2(-lq * LOG2E) - 1.0
        acc += tl.where(mask, term, 0.0)
    kl = 0.5 * tl.sum(acc, axis=1)
    tl.store(kl_ptr + rows, kl, mask=row_mask)


@triton.jit
def _gaussian_kl_reduce_kernel(
    kl_ptr,  # [B] float32 per-row KL
    out_ptr,  # [] float32
    B,
    reduction,  # 1 = sum, 2 = mean
    BLOCK: tl.constexpr,
):
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for b0 in range(0, B, BLOCK):
        acc += tl.load(kl_ptr + b0 + offs, mask=(b0 + offs) < B, other=0.0)
    total = tl.sum(acc, axis=0)
    if reduction == 2:
        total = total / B
    tl.store(out_ptr, total)


@triton.autotune(configs=_configs(), key=["B", "D"])
@triton.jit
def _gaussian_kl_bwd_kernel(
    grad_ptr,  # [B] (reduction none) or [] float32, read with stride_g (0 for a scalar)
    mu_p_ptr,  # [B, D]
    logvar_p_ptr,  # [B, D]
    mu_q_ptr,  # [B, D]
    logvar_q_ptr,  # [B, D]
    d_mu_p_ptr,  # [B, D] contiguous, dtype of mu_p
    d_logvar_p_ptr,  # [B, D] contiguous
    d_mu_q_ptr,  # [B, D] contiguous
    d_logvar_q_ptr,  # [B, D] contiguous
    B,
    D,
    stride_g,
    stride_mp,
    stride_lp,
    stride_mq,
    stride_lq,
    reduction,  # 0 = none, 1 = sum, 2 = mean (scales the upstream gradient by 1/B)
    BLOCK_D: tl.constexpr,
    TILE: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    BLOCK_B: tl.constexpr = TILE // BLOCK_D
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < B
    mask = row_mask[:, None] & (cols < D)[None, :]
    g = tl.load(grad_ptr + rows * stride_g, mask=row_mask, other=0.0).to(tl.float32)
    if reduction == 2:
        g = g / B
    mp = tl.load(mu_p_ptr + rows[:, None] * stride_mp + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    lp = tl.load(logvar_p_ptr + rows[:, None] * stride_lp + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mq = tl.load(mu_q_ptr + rows[:, None] * stride_mq + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    lq = tl.load(logvar_q_ptr + rows[:, None] * stride_lq + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    diff = mp - mq
    inv_q = tl.exp2(-lq * LOG2E)
    ratio = tl.exp2((lp - lq) * LOG2E)
    g2 = g[:, None]
    d_mp = g2 * diff * inv_q
    d_lp = 0.5 * g2 * (ratio - 1.0)
    d_lq = 0.5 * g2 * (1.0 - ratio - diff * diff * inv_q)
    out = rows[:, None] * D + cols[None, :]
    tl.store(d_mu_p_ptr + out, d_mp.to(d_mu_p_ptr.dtype.element_ty), mask=mask)
    tl.store(d_logvar_p_ptr + out, d_lp.to(d_logvar_p_ptr.dtype.element_ty), mask=mask)
    tl.store(d_mu_q_ptr + out, (-d_mp).to(d_mu_q_ptr.dtype.element_ty), mask=mask)
    tl.store(d_logvar_q_ptr + out, d_lq.to(d_logvar_q_ptr.dtype.element_ty), mask=mask)


def _rows_unit_stride(t: torch.Tensor) -> torch.Tensor:
    # explicit row strides are passed to the kernels; the column stride must be 1 for wide loads
    return t if (t.stride(1) == 1 or t.shape[1] <= 1) else t.contiguous()


def _block_d(D: int) -> int:
    return min(triton.next_power_of_2(max(D, 1)), MAX_BLOCK_D)


def gaussian_kl_fwd(mu_p, logvar_p, mu_q, logvar_q, reduction: int, *, launch=_identity):
    """KL of [B, D] diagonal Gaussians given by means and log-variances.

    reduction: 0 = none -> [B] float32, 1 = sum -> [] float32, 2 = mean over B -> [] float32.
    """
    B, D = mu_p.shape
    ts = [_rows_unit_stride(t) for t in (mu_p, logvar_p, mu_q, logvar_q)]
    kl = torch.empty((B,), dtype=torch.float32, device=mu_p.device)
    if B > 0:
        BLOCK_D = _block_d(D)
        grid = lambda META: (triton.cdiv(B, META["TILE"] // BLOCK_D),)  # noqa: E731
        launch(_gaussian_kl_fwd_kernel)[grid](
            *ts, kl, B, D, *(t.stride(0) for t in ts), BLOCK_D=BLOCK_D)
    if reduction == 0:
        return kl
    out = torch.empty((), dtype=torch.float32, device=mu_p.device)
    BLOCK = min(triton.next_power_of_2(max(B, 16)), 1024 if _INTERPRET else 4096)
    launch(_gaussian_kl_reduce_kernel)[(1,)](kl, out, B, reduction, BLOCK=BLOCK,
                                             num_warps=1 if _INTERPRET else 8)
    return out


def gaussian_kl_bwd(grad, mu_p, logvar_p, mu_q, logvar_q, reduction: int, *, launch=_identity):
    """The four gradients of the KL in one pass, each [B, D] contiguous in its input's dtype.

    grad: [B] float32 for reduction 0 (any stride, 0 included), [] float32 for 1 and 2.
    """
    B, D = mu_p.shape
    ts = [_rows_unit_stride(t) for t in (mu_p, logvar_p, mu_q, logvar_q)]
    outs = [torch.empty((B, D), dtype=t.dtype, device=t.device) for t in (mu_p, logvar_p, mu_q, logvar_q)]
    if grad.dtype != torch.float32:
        grad = grad.to(torch.float32)
    stride_g = grad.stride(0) if (reduction == 0 and grad.dim() == 1) else 0
    if B > 0 and D > 0:
        BLOCK_D = _block_d(D)
        grid = lambda META: (triton.cdiv(B, META["TILE"] // BLOCK_D), triton.cdiv(D, BLOCK_D))  # noqa: E731
        launch(_gaussian_kl_bwd_kernel)[grid](
            grad, *ts, *outs, B, D, stride_g, *(t.stride(0) for t in ts), reduction, BLOCK_D=BLOCK_D)
    return tuple(outs)
