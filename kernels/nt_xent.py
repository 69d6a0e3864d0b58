"""Triton kernels for multi-view NT-Xent (docs/MATH.md section 4, docs/KERNEL_CONTRACT.md "Multi-view NT-Xent").

Rows ``z_rows [n, d]`` (global row ``gi = row_offset + i``) against columns ``z_cols [N, d]``, view-major,
``B = N / V`` images. ``s_ik = u_i . u_k / tau`` with ``u = z / max(||z||, 1e-12)``.

* ``_row_rnorm_kernel``: 1 / max(||z||, 1e-12) per row, float32 (rows and columns).
* The columns of a row's own image (the diagonal and the V-1 positives ``(gi mod B) + v B``) need
  masks; every other column is in the denominator whichever it is. A scalar test per tile
  (``_share_image``) sends the few tiles that can hold own-image columns through the masked path
  and the rest (all but about V (BLOCK_M / BLOCK_N + 1) tiles per row block) through a mask-free one.
* forward, flash style: one program per block of rows walks column tiles with an online max /
  log-sum-exp in base 2 (log2(e) / tau folded into the row scale) and writes only ``lse [n]`` and
  ``loss_rows [n]``. Raw z tiles go into tl.dot (exact bf16/fp16 operands, float32 accumulation); the
  normalisation is applied to the [rows, cols] tile as ``rnorm_i * rnorm_k``.
* backward, recomputing the tiles from lse, with ``H_ik = (V-1) exp(s_ik - lse_i) [k in Den] - [k in P]``
  and ``G_ik = c_i H_ik``:
  - rows kernel (like flash attention's dq): one program per (row block, chunk of d) accumulates
    ``sum_k H_ik rnorm_k z_k``; the upstream c_i factors out of the row, so the low-precision operand
    is bounded by V-1 whatever the gradient's scale; H is formed in float32 before it is rounded
    (``(V-1) exp(s_ip - lse_i) - 1`` nearly cancels on positives once training converges);
  - cols kernel (like dk/dv): one program per (column block, chunk of d) accumulates
    ``sum_i G_ik rnorm_i z_i`` over all rows (for float16 the c_i are divided by max|c| first, so small
    upstream gradients do not underflow).
  Through the normalisation ``dz = (du - u (u . du)) * rnorm`` with ``u_i . du_i = sum_k G_ik s_ik``,
  a per-row scalar gathered from the tiles, so each chunk of d finishes on its own and no [n, d]
  float32 scratch is needed. Extra memory: O(N) floats.

Large d: up to ``MAX_SINGLE_D`` the whole row tile stays in registers for the logits; beyond it the
logits are accumulated over chunks of ``D_CHUNK``. The backward writes d in chunks of at most
``MAX_BLOCK_DO`` columns (grid axis 1), recomputing the logits once per chunk.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Under the interpreter, bf16 tl.dot is wrong (triton#11584): operands are cast to float32 there.
DOT_F32 = _INTERPRET
# Largest d whose [rows, d] tile is held whole for the logits; larger d loops over chunks of D_CHUNK.
MAX_SINGLE_D = 128
D_CHUNK = 64
# Widest chunk of d one backward program accumulates (register budget of the [rows, d] accumulator).
MAX_BLOCK_DO = 128
# tl.dot precision for float32 inputs: 1 = "tf32x3" (tensor cores, ~float32 accuracy), 2 = "ieee".
F32_DOT_PRECISION = 1


def _identity(kernel):
    return kernel


def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


def _fwd_configs():
    if _INTERPRET:
        return [_cfg(32, 32, 4, 1)]
    return [_cfg(128, 64, 8, 3), _cfg(128, 128, 8, 3), _cfg(64, 64, 4, 3), _cfg(64, 128, 4, 3),
            _cfg(128, 64, 4, 4)]


def _bwd_rows_configs():
    # (checked with ptxas for sm_90, bf16, d = 128: no register spills)
    if _INTERPRET:
        return [_cfg(32, 32, 4, 1)]
    return [_cfg(64, 64, 8, 3), _cfg(64, 128, 8, 3), _cfg(32, 128, 8, 3), _cfg(32, 64, 4, 3),
            _cfg(64, 64, 8, 4)]


def _bwd_cols_configs():
    # here BLOCK_N is the block of columns a program owns, BLOCK_M the row tile it walks with
    if _INTERPRET:
        return [_cfg(32, 32, 4, 1)]
    return [_cfg(64, 64, 8, 3), _cfg(128, 64, 8, 3), _cfg(64, 32, 4, 3), _cfg(64, 64, 8, 2),
            _cfg(128, 64, 8, 2)]


@triton.jit
def _dot(a, b, F32_DOT: tl.constexpr, DOT_F32: tl.constexpr):
    # F32_DOT: float32 operands (float32 inputs): 1 = "tf32x3" (three TF32 MMAs, about float32
    # accuracy, tensor cores), 2 = "ieee" (FMA); 0 = bf16/fp16 operands. DOT_F32: interpreter cast.
    if DOT_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if F32_DOT == 1:
        r = tl.dot(a, b, input_precision="tf32x3")
    elif F32_DOT == 2:
        r = tl.dot(a, b, input_precision="ieee")
    else:
        r = tl.dot(a, b)
    return r


@triton.jit
def _row_rnorm_kernel(
    z_ptr,  # [n, d]
    out_ptr,  # [n] float32: 1 / max(||z_i||, 1e-12)
    n,
    d,
    stride_z,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        c = d0 + offs_d
        z = tl.load(z_ptr + rows[:, None] * stride_z + c[None, :], mask=rmask[:, None] & (c < d)[None, :],
                    other=0.0).to(tl.float32)
        acc += z * z
    norm = tl.sqrt(tl.sum(acc, axis=1))
    tl.store(out_ptr + rows, 1.0 / tl.maximum(norm, 1e-12), mask=rmask)


@triton.jit
def _whole_d_tile(ptr, idx64, mask, d, stride, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                  SINGLE_D: tl.constexpr):
    # rows idx64 of z with the whole feature dim, [BLOCK_R, BLOCK_D], when SINGLE_D (held for every
    # logits tile); otherwise zeros, unused (_logits_tile then walks d in chunks)
    offs_d = tl.arange(0, BLOCK_D)
    t = tl.zeros([BLOCK_R, BLOCK_D], dtype=ptr.dtype.element_ty)
    if SINGLE_D:
        t = tl.load(ptr + idx64[:, None] * stride + offs_d[None, :], mask=mask[:, None] & (offs_d < d)[None, :],
                    other=0.0)
    return t


@triton.jit
def _logits_tile(
    a, a_ptr, b_ptr, a_idx, b_idx, a_mask, b_mask, d, stride_a, stride_b, b_full,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr,
    F32_DOT: tl.constexpr, DOT_F32: tl.constexpr,
):
    # raw z_a . z_b^T for a [BLOCK_A, BLOCK_B] tile, float32. a / b_full are the whole-d tiles when
    # SINGLE_D; otherwise d is walked in chunks of BLOCK_D (reloaded from L2 each time).
    if SINGLE_D:
        acc = _dot(a, tl.trans(b_full), F32_DOT, DOT_F32)
    else:
        acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
        offs_d = tl.arange(0, BLOCK_D)
        for d0 in range(0, d, BLOCK_D):
            c = d0 + offs_d
            dmask = c < d
            ac = tl.load(a_ptr + a_idx[:, None] * stride_a + c[None, :], mask=a_mask[:, None] & dmask[None, :],
                         other=0.0)
            bc = tl.load(b_ptr + b_idx[:, None] * stride_b + c[None, :], mask=b_mask[:, None] & dmask[None, :],
                         other=0.0)
            acc += _dot(ac, tl.trans(bc), F32_DOT, DOT_F32)
    return acc


@triton.jit
def _share_image(a0, LA, b0, LB, B):
    # Can the index ranges [a0, a0 + LA) and [b0, b0 + LB) hold two indices of the same image (equal
    # mod B)? Two arcs of the circle Z_B meet iff one contains the other's start. A scalar per tile:
    # tiles that cannot meet the rows' own images skip the positive / diagonal masks.
    am = a0 % B
    bm = b0 % B
    return (LA >= B) | (LB >= B) | ((bm - am + B) % B < LA) | ((am - bm + B) % B < LB)


@triton.autotune(configs=_fwd_configs(), key=["n", "N", "d"])
@triton.jit
def _nt_xent_fwd_kernel(
    zr_ptr,  # [n, d] rows owned by this call
    zc_ptr,  # [N, d] all columns (view-major)
    rr_ptr,  # [n] float32 1/||z_rows||
    rc_ptr,  # [N] float32 1/||z_cols||
    loss_ptr,  # [n] float32 out: (V-1) lse_i - sum_{p in P} s_ip
    lse_ptr,  # [n] float32 out: log sum_{k in Den} exp(s_ik)
    n,
    N,
    d,
    B,
    views,
    row_offset,
    stride_r,
    stride_c,
    qk_scale,  # log2(e) / tau
    denominator,  # 0 = all, 1 = negatives
    BLOCK_D: tl.constexpr,
    SINGLE_D: tl.constexpr,
    F32_DOT: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    LN2: tl.constexpr = 0.6931471805599453
    row0 = tl.program_id(0) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < n
    rows64 = rows.to(tl.int64)
    g_row = rows + row_offset
    b_row = g_row % B
    rscale = tl.load(rr_ptr + rows, mask=rmask, other=0.0) * qk_scale
    offs_n = tl.arange(0, BLOCK_N)
    q = _whole_d_tile(zr_ptr, rows64, rmask, d, stride_r, BLOCK_M, BLOCK_D, SINGLE_D)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: exp2(-inf - m) = 0, never NaN
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    pos_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, N, BLOCK_N):
        cols = k0 + offs_n
        cmask = cols < N
        cols64 = cols.to(tl.int64)
        k = _whole_d_tile(zc_ptr, cols64, cmask, d, stride_c, BLOCK_N, BLOCK_D, SINGLE_D)
        rc = tl.load(rc_ptr + cols, mask=cmask, other=0.0)
        qk = _logits_tile(q, zr_ptr, zc_ptr, rows64, cols64, rmask, cmask, d, stride_r, stride_c, k,
                          BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_D, F32_DOT, DOT_F32)
        s = qk * rscale[:, None] * rc[None, :]  # s_ik * log2(e)
        if _share_image(row0 + row_offset, BLOCK_M, k0, BLOCK_N, B):
            same = b_row[:, None] == (cols % B)[None, :]
            pos = same & (g_row[:, None] != cols[None, :]) & cmask[None, :]
            den = ((same == 0) | (pos & (denominator == 0))) & cmask[None, :]
            pos_i += tl.sum(tl.where(pos, s, 0.0), axis=1)
            s = tl.where(den, s, float("-inf"))
        else:  # only other images' columns: all in Den
            s = tl.where(cmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new
    lse = (m_i + tl.log2(tl.where(rmask, l_i, 1.0))) * LN2
    tl.store(lse_ptr + rows, lse, mask=rmask)
    tl.store(loss_ptr + rows, (views - 1) * lse - pos_i * LN2, mask=rmask)


@triton.autotune(configs=_bwd_rows_configs(), key=["n", "N", "d"])
@triton.jit
def _nt_xent_bwd_rows_kernel(
    zr_ptr,  # [n, d]
    zc_ptr,  # [N, d]
    rr_ptr,  # [n] float32
    rc_ptr,  # [N] float32
    lse_ptr,  # [n] float32
    grad_ptr,  # [n] float32 upstream gradient of loss_rows, read with stride_g
    dzr_ptr,  # [n, d] out, contiguous, dtype of z_rows
    n,
    N,
    d,
    B,
    views,
    row_offset,
    stride_r,
    stride_c,
    stride_g,
    qk_scale,  # log2(e) / tau
    inv_tau,
    denominator,
    BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
    SINGLE_D: tl.constexpr,
    REUSE: tl.constexpr,  # SINGLE_D and one chunk of d covers all of it: the logits' tiles serve the output
    F32_DOT: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    LN2: tl.constexpr = 0.6931471805599453
    row0 = tl.program_id(0) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < n
    rows64 = rows.to(tl.int64)
    g_row = rows + row_offset
    b_row = g_row % B
    rr = tl.load(rr_ptr + rows, mask=rmask, other=0.0)
    rscale = rr * qk_scale
    # (V-1) exp(s - lse) = exp2(s2 - (lse log2(e) - log2(V-1)))
    lse2 = tl.load(lse_ptr + rows, mask=rmask, other=0.0) * LOG2E - tl.log2((views - 1) * 1.0)
    c = tl.load(grad_ptr + rows64 * stride_g, mask=rmask, other=0.0)
    offs_n = tl.arange(0, BLOCK_N)
    offs_o = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    omask = offs_o < d
    q = _whole_d_tile(zr_ptr, rows64, rmask, d, stride_r, BLOCK_M, BLOCK_D, SINGLE_D)
    acc = tl.zeros([BLOCK_M, BLOCK_DO], dtype=tl.float32)  # sum_k H_ik rnorm_k z_k
    hs = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum_k H_ik s_ik (base-2 units)
    for k0 in range(0, N, BLOCK_N):
        cols = k0 + offs_n
        cmask = cols < N
        cols64 = cols.to(tl.int64)
        k = _whole_d_tile(zc_ptr, cols64, cmask, d, stride_c, BLOCK_N, BLOCK_D, SINGLE_D)
        rc = tl.load(rc_ptr + cols, mask=cmask, other=0.0)
        qk = _logits_tile(q, zr_ptr, zc_ptr, rows64, cols64, rmask, cmask, d, stride_r, stride_c, k,
                          BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_D, F32_DOT, DOT_F32)
        s = qk * rscale[:, None] * rc[None, :]
        e = tl.exp2(s - lse2[:, None])  # (V-1) exp(s_ik - lse_i)
        if _share_image(row0 + row_offset, BLOCK_M, k0, BLOCK_N, B):
            # H = e on other images, e [all] - 1 on positives, 0 on the diagonal; computed in float32
            # before the rounding to the dot's dtype (e - 1 nearly cancels near convergence)
            same = b_row[:, None] == (cols % B)[None, :]
            pos = same & (g_row[:, None] != cols[None, :]) & cmask[None, :]
            h = tl.where(same, tl.where(pos, tl.where(denominator == 0, e, 0.0) - 1.0, 0.0),
                         tl.where(cmask[None, :], e, 0.0))
        else:
            h = tl.where(cmask[None, :], e, 0.0)
        hs += tl.sum(h * s, axis=1)
        if REUSE:
            k_out = k
        else:
            k_out = tl.load(zc_ptr + cols64[:, None] * stride_c + offs_o[None, :],
                            mask=cmask[:, None] & omask[None, :], other=0.0)
        p = (h * rc[None, :]).to(zc_ptr.dtype.element_ty)
        acc += _dot(p, k_out, F32_DOT, DOT_F32)
    z_out = tl.load(zr_ptr + rows64[:, None] * stride_r + offs_o[None, :],
                    mask=rmask[:, None] & omask[None, :], other=0.0).to(tl.float32)
    # du = c acc / tau;  u . du = c hs ln2;  dz = (du - u (u . du)) rnorm
    dz = (acc * inv_tau - z_out * (rr * hs * LN2)[:, None]) * (c * rr)[:, None]
    tl.store(dzr_ptr + rows64[:, None] * d + offs_o[None, :], dz.to(dzr_ptr.dtype.element_ty),
             mask=rmask[:, None] & omask[None, :])


@triton.autotune(configs=_bwd_cols_configs(), key=["n", "N", "d"])
@triton.jit
def _nt_xent_bwd_cols_kernel(
    zr_ptr,  # [n, d]
    zc_ptr,  # [N, d]
    rr_ptr,  # [n] float32
    rc_ptr,  # [N] float32
    lse_ptr,  # [n] float32
    grad_ptr,  # [n] float32, read with stride_g
    cscale_ptr,  # [1] float32 max|grad| when SCALE_C (float16), else unused
    dzc_ptr,  # [N, d] out, contiguous, dtype of z_cols
    n,
    N,
    d,
    B,
    views,
    row_offset,
    stride_r,
    stride_c,
    stride_g,
    qk_scale,
    inv_tau,
    denominator,
    BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
    SINGLE_D: tl.constexpr,
    REUSE: tl.constexpr,
    SCALE_C: tl.constexpr,
    F32_DOT: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    LN2: tl.constexpr = 0.6931471805599453
    col0 = tl.program_id(0) * BLOCK_N
    cols = col0 + tl.arange(0, BLOCK_N)
    cmask = cols < N
    cols64 = cols.to(tl.int64)
    b_col = cols % B
    rcs = tl.load(rc_ptr + cols, mask=cmask, other=0.0)
    cscale = 1.0
    if SCALE_C:
        cscale = tl.load(cscale_ptr)
    inv_cscale = 1.0 / cscale
    log2_vm1 = tl.log2((views - 1) * 1.0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_o = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    omask = offs_o < d
    k = _whole_d_tile(zc_ptr, cols64, cmask, d, stride_c, BLOCK_N, BLOCK_D, SINGLE_D)
    acc = tl.zeros([BLOCK_N, BLOCK_DO], dtype=tl.float32)  # sum_i (G_ik / cscale) rnorm_i z_i
    gs = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum_i G_ik s_ik (base-2 units)
    for i0 in range(0, n, BLOCK_M):
        rows = i0 + offs_m
        rmask = rows < n
        rows64 = rows.to(tl.int64)
        g_row = rows + row_offset
        rr = tl.load(rr_ptr + rows, mask=rmask, other=0.0)
        lse2 = tl.load(lse_ptr + rows, mask=rmask, other=0.0) * LOG2E - log2_vm1
        # rows past n load c = 0, so their G is 0 (their e stays finite: s = 0, lse2 = -log2(V-1))
        c = tl.load(grad_ptr + rows64 * stride_g, mask=rmask, other=0.0)
        q = _whole_d_tile(zr_ptr, rows64, rmask, d, stride_r, BLOCK_M, BLOCK_D, SINGLE_D)
        # transposed tile: [cols, rows]
        kq = _logits_tile(k, zc_ptr, zr_ptr, cols64, rows64, cmask, rmask, d, stride_c, stride_r, q,
                          BLOCK_N, BLOCK_M, BLOCK_D, SINGLE_D, F32_DOT, DOT_F32)
        s = kq * (rcs * qk_scale)[:, None] * rr[None, :]
        e = tl.exp2(s - lse2[None, :])
        if _share_image(col0, BLOCK_N, i0 + row_offset, BLOCK_M, B):
            same = b_col[:, None] == (g_row % B)[None, :]
            pos = same & (cols[:, None] != g_row[None, :])
            h = tl.where(same, tl.where(pos, tl.where(denominator == 0, e, 0.0) - 1.0, 0.0), e)
        else:
            h = e
        g = h * c[None, :]
        gs += tl.sum(g * s, axis=1)
        if REUSE:
            q_out = q
        else:
            q_out = tl.load(zr_ptr + rows64[:, None] * stride_r + offs_o[None, :],
                            mask=rmask[:, None] & omask[None, :], other=0.0)
        p = (g * (rr * inv_cscale)[None, :]).to(zr_ptr.dtype.element_ty)
        acc += _dot(p, q_out, F32_DOT, DOT_F32)
    z_out = tl.load(zc_ptr + cols64[:, None] * stride_c + offs_o[None, :],
                    mask=cmask[:, None] & omask[None, :], other=0.0).to(tl.float32)
    dz = (acc * (cscale * inv_tau) - z_out * (rcs * gs * LN2)[:, None]) * rcs[:, None]
    tl.store(dzc_ptr + cols64[:, None] * d + offs_o[None, :], dz.to(dzc_ptr.dtype.element_ty),
             mask=cmask[:, None] & omask[None, :])


# ---------------------------------------------------------------------------------------------------
# launchers: Python logic on shapes, strides and dtypes only (traceable by make_fx with fake tensors)


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if (t.stride(1) == 1 or t.shape[1] <= 1) else t.contiguous()


def _d_blocks(d: int):
    """(BLOCK_D, SINGLE_D, BLOCK_DO, REUSE) for feature size d."""
    full = max(triton.next_power_of_2(d), 16)  # tl.dot needs every dim >= 16
    single = full <= MAX_SINGLE_D
    block_d = full if single else max(min(D_CHUNK, full), 16)
    block_do = max(min(full, MAX_BLOCK_DO), 16)
    reuse = single and block_do == block_d
    return block_d, single, block_do, reuse


def _f32_dot(z: torch.Tensor) -> int:
    return F32_DOT_PRECISION if z.dtype == torch.float32 else 0


def _rnorm(z: torch.Tensor, launch) -> torch.Tensor:
    n, d = z.shape
    out = torch.empty((n,), dtype=torch.float32, device=z.device)
    if n == 0:
        return out
    block_d = min(max(triton.next_power_of_2(d), 16), 128 if _INTERPRET else 256)
    block_r = max(1, 2048 // block_d)
    launch(_row_rnorm_kernel)[(triton.cdiv(n, block_r),)](z, out, n, d, z.stride(0), BLOCK_R=block_r,
                                                          BLOCK_D=block_d, num_warps=4 if _INTERPRET else 8)
    return out


def _norms(z_rows, z_cols, row_offset, launch):
    rc = _rnorm(z_cols, launch)
    if z_rows is z_cols and row_offset == 0:
        return rc, rc
    return _rnorm(z_rows, launch), rc


def nt_xent_fwd(z_rows, z_cols, views: int, temperature: float, denominator: int, row_offset: int, *,
                launch=_identity):
    """(loss_rows [n] float32, lse [n] float32) of rows z_rows [n, d] against columns z_cols [N, d]."""
    n, d = z_rows.shape
    N = z_cols.shape[0]
    B = N // views
    z_rows, z_cols = _unit_stride(z_rows), _unit_stride(z_cols)
    loss = torch.empty((n,), dtype=torch.float32, device=z_rows.device)
    lse = torch.empty((n,), dtype=torch.float32, device=z_rows.device)
    if n == 0:
        return loss, lse
    rr, rc = _norms(z_rows, z_cols, row_offset, launch)
    block_d, single, _, _ = _d_blocks(d)
    grid = lambda META: (triton.cdiv(n, META["BLOCK_M"]),)  # noqa: E731
    launch(_nt_xent_fwd_kernel)[grid](
        z_rows, z_cols, rr, rc, loss, lse, n, N, d, B, views, row_offset, z_rows.stride(0), z_cols.stride(0),
        1.4426950408889634 / float(temperature), int(denominator),
        BLOCK_D=block_d, SINGLE_D=single, F32_DOT=_f32_dot(z_rows), DOT_F32=DOT_F32)
    return loss, lse


def nt_xent_bwd(grad_rows, z_rows, z_cols, lse, views: int, temperature: float, denominator: int,
                row_offset: int, cols_grad: bool = True, *, launch=_identity):
    """(dz_rows [n, d], dz_cols [N, d]) in the dtypes of z_rows / z_cols, from grad_rows [n] float32.
    cols_grad=False: the columns kernel is not launched and dz_cols is zeros (detached columns)."""
    n, d = z_rows.shape
    N = z_cols.shape[0]
    B = N // views
    z_rows, z_cols = _unit_stride(z_rows), _unit_stride(z_cols)
    dz_rows = torch.empty((n, d), dtype=z_rows.dtype, device=z_rows.device)
    dz_cols = torch.empty((N, d), dtype=z_cols.dtype, device=z_cols.device)
    if n == 0 or not cols_grad:
        dz_cols.zero_()
    if n == 0:
        return dz_rows, dz_cols
    if grad_rows.dtype != torch.float32:
        grad_rows = grad_rows.to(torch.float32)
    if lse.dtype != torch.float32 or lse.stride(0) != 1:
        lse = lse.to(torch.float32).contiguous()
    stride_g = grad_rows.stride(0)
    rr, rc = _norms(z_rows, z_cols, row_offset, launch)
    block_d, single, block_do, reuse = _d_blocks(d)
    f32_dot = _f32_dot(z_rows)
    args = (n, N, d, B, views, row_offset, z_rows.stride(0), z_cols.stride(0), stride_g,
            1.4426950408889634 / float(temperature), 1.0 / float(temperature), int(denominator))
    grid_r = lambda META: (triton.cdiv(n, META["BLOCK_M"]), triton.cdiv(d, block_do))  # noqa: E731
    launch(_nt_xent_bwd_rows_kernel)[grid_r](
        z_rows, z_cols, rr, rc, lse, grad_rows, dz_rows, *args,
        BLOCK_D=block_d, BLOCK_DO=block_do, SINGLE_D=single, REUSE=reuse, F32_DOT=f32_dot, DOT_F32=DOT_F32)
    if not cols_grad:
        return dz_rows, dz_cols
    # float16 only: G enters a float16 tl.dot operand; divide it by max|grad| so tiny upstream
    # gradients (1 / (N (V-1))) do not fall into float16's subnormals. bf16 / fp32 have the range.
    scale_c = z_rows.dtype == torch.float16
    cscale = grad_rows.abs().amax().clamp_min(1e-30).reshape(1) if scale_c else grad_rows
    grid_c = lambda META: (triton.cdiv(N, META["BLOCK_N"]), triton.cdiv(d, block_do))  # noqa: E731
    launch(_nt_xent_bwd_cols_kernel)[grid_c](
        z_rows, z_cols, rr, rc, lse, grad_rows, cscale, dz_cols, *args,
        BLOCK_D=block_d, BLOCK_DO=block_do, SINGLE_D=single, REUSE=reuse, SCALE_C=scale_c, F32_DOT=f32_dot,
        DOT_F32=DOT_F32)
    return dz_rows, dz_cols
