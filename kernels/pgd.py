"""Triton kernels for the PGD step (docs/MATH.md section 3, docs/KERNEL_CONTRACT.md "PGD").

* l_inf: ``x = clamp(clamp(x + alpha*sign(g), x0 - eps, x0 + eps), lo, hi)`` in place, one pass over memory.
* l2: per sample (index of dim 0) ``x += alpha * g / ||g||``, project ``x - x0`` onto the eps ball, clip.
  Two kernels: per-chunk partial sums of g.g, e.e and e.g (e = x - x0), then the update, whose
  programs first add up their sample's partials. ||x + a g - x0||^2 = e.e + 2 a e.g + a^2 g.g, so the
  update needs no third pass over memory.
* random start: ``clamp(x + eps * (2U - 1), lo, hi)`` with U = tl.rand(seed, logical index), so the
  layout of x does not change the result.

Layouts: a dense tensor (contiguous, channels_last, any permutation without gaps) is walked as flat
memory; grad and x_orig are used as they are when their strides equal x_adv's, else copied once into
x_adv's layout. A non-dense x_adv (a strided slice) is copied, updated and written back.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# elements per program of the elementwise kernels: 8 per thread (two 16 B loads of float32, one of
# bf16 per tensor), ~100 registers on sm_90, so enough warps stay resident to keep HBM busy
BLOCK = 1024 if _INTERPRET else 2048
NUM_WARPS = 4 if _INTERPRET else 8
# l2: elements per loop step, and at least this many programs over all samples (fills an H100)
L2_BLOCK = 1024 if _INTERPRET else 2048
L2_MIN_PROGRAMS = 4 if _INTERPRET else 1056
L2_MAX_CHUNKS = 64 if _INTERPRET else 1024


def _identity(kernel):
    return kernel


@triton.jit
def _pgd_linf_kernel(
    x_ptr,  # [numel] x_adv in memory order, updated in place
    g_ptr,  # [numel] grad, same memory order
    x0_ptr,  # [numel] x_orig, same memory order
    numel,
    alpha,
    eps,
    lo,
    hi,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    step = tl.where(g > 0.0, alpha, tl.where(g < 0.0, -alpha, 0.0))
    x = x + step
    x = tl.minimum(tl.maximum(x, x0 - eps), x0 + eps)
    x = tl.minimum(tl.maximum(x, lo), hi)
    tl.store(x_ptr + offs, x.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pgd_l2_partials_kernel(
    x_ptr,  # [S, M] x_adv, sample-major memory
    g_ptr,  # [S, M] grad
    x0_ptr,  # [S, M] x_orig
    part_ptr,  # [3, S, C] float32: sum g*g, sum e*e, sum e*g per (sample, chunk); e = x - x0
    S,
    M,
    C,
    ITERS,  # loop steps per chunk; chunk = ITERS * BLOCK elements
    BLOCK: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    base = s * M
    start = c * ITERS * BLOCK
    offs0 = tl.arange(0, BLOCK)
    gg = tl.zeros([BLOCK], dtype=tl.float32)
    ee = tl.zeros([BLOCK], dtype=tl.float32)
    eg = tl.zeros([BLOCK], dtype=tl.float32)
    for it in range(0, ITERS):
        offs = start + it * BLOCK + offs0
        mask = offs < M
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        x0 = tl.load(x0_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        e = x - x0
        gg += g * g
        ee += e * e
        eg += e * g
    out = s * C + c
    tl.store(part_ptr + out, tl.sum(gg, axis=0))
    tl.store(part_ptr + S * C + out, tl.sum(ee, axis=0))
    tl.store(part_ptr + 2 * S * C + out, tl.sum(eg, axis=0))


@triton.jit
def _pgd_l2_apply_kernel(
    x_ptr,  # [S, M] x_adv, updated in place
    g_ptr,  # [S, M] grad
    x0_ptr,  # [S, M] x_orig
    part_ptr,  # [3, S, C] float32 from _pgd_l2_partials_kernel
    S,
    M,
    C,
    ITERS,
    alpha,
    eps,
    lo,
    hi,
    BLOCK: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    # every program of a sample adds up the same C partials in the same order: identical scales
    cs = tl.arange(0, BLOCK_C)
    cmask = cs < C
    gg = tl.sum(tl.load(part_ptr + s * C + cs, mask=cmask, other=0.0), axis=0)
    ee = tl.sum(tl.load(part_ptr + S * C + s * C + cs, mask=cmask, other=0.0), axis=0)
    eg = tl.sum(tl.load(part_ptr + 2 * S * C + s * C + cs, mask=cmask, other=0.0), axis=0)
    a = alpha / tl.maximum(tl.sqrt(gg), 1e-12)
    dd = tl.maximum(ee + 2.0 * a * eg + a * a * gg, 0.0)
    f = tl.minimum(eps / tl.maximum(tl.sqrt(dd), 1e-12), 1.0)
    base = s * M
    start = c * ITERS * BLOCK
    offs0 = tl.arange(0, BLOCK)
    for it in range(0, ITERS):
        offs = start + it * BLOCK + offs0
        mask = offs < M
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        x0 = tl.load(x0_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        delta = ((x + a * g) - x0) * f
        y = tl.minimum(tl.maximum(x0 + delta, lo), hi)
        tl.store(x_ptr + base + offs, y.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pgd_random_start_kernel(
    x_ptr,  # [numel] x in memory order
    out_ptr,  # [numel] same strides as x
    numel,
    size1,  # memory-order sizes of dims 1..3 (dim 0 is implied)
    size2,
    size3,
    lstride0,  # logical (contiguous) strides of the memory-order dims
    lstride1,
    lstride2,
    lstride3,
    eps,
    lo,
    hi,
    seed,
    IDENTITY: tl.constexpr,  # memory order == logical order: the offset is the index
    BLOCK: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = p < numel
    if IDENTITY:
        logical = p
    else:
        i3 = p % size3
        t = p // size3
        i2 = t % size2
        t = t // size2
        i1 = t % size1
        i0 = t // size1
        logical = i0 * lstride0 + i1 * lstride1 + i2 * lstride2 + i3 * lstride3
    u = tl.rand(seed, logical)
    x = tl.load(x_ptr + p, mask=mask, other=0.0).to(tl.float32)
    y = x + eps * (2.0 * u - 1.0)
    y = tl.minimum(tl.maximum(y, lo), hi)
    tl.store(out_ptr + p, y.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------
# layout helpers: Python logic on shapes and strides only (traceable by make_fx with fake tensors)


def _memory_order(t: torch.Tensor):
    """Dims from outermost to innermost in memory, or None if t is not dense (has gaps or overlaps)."""
    perm = sorted(range(t.dim()), key=lambda i: (-t.stride(i), -t.shape[i]))
    if t.permute(perm).is_contiguous():
        return perm
    return None


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    # equal strides on every dim of size > 1: the same element sits at the same memory position
    return all(a.shape[i] <= 1 or a.stride(i) == b.stride(i) for i in range(a.dim()))


def _like(ref: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """t with ref's (dense) strides, copied only when its layout differs."""
    if _same_layout(ref, t):
        return t
    out = torch.empty_like(ref, dtype=t.dtype)  # preserve_format keeps a dense ref's strides
    out.copy_(t)
    return out


def _dense_sample_major(t: torch.Tensor) -> bool:
    # dense, and each sample (index of dim 0) is one contiguous run of numel / size(0) elements
    if _memory_order(t) is None:
        return False
    return t.dim() == 0 or t.shape[0] <= 1 or t.stride(0) * t.shape[0] == t.numel()


def pgd_step_linf_(x_adv, grad, x_orig, alpha: float, eps: float, lo: float, hi: float, *, launch=_identity):
    """l_inf sign step, projection and clip, in place on x_adv (float32 math, rounded once)."""
    numel = x_adv.numel()
    if numel == 0:
        return
    dense = _memory_order(x_adv) is not None
    x = x_adv if dense else x_adv.contiguous()
    g, x0 = _like(x, grad), _like(x, x_orig)
    grid = (triton.cdiv(numel, BLOCK),)
    launch(_pgd_linf_kernel)[grid](x, g, x0, numel, float(alpha), float(eps), float(lo), float(hi),
                                   BLOCK=BLOCK, num_warps=NUM_WARPS)
    if not dense:
        x_adv.copy_(x)


def pgd_step_l2_(x_adv, grad, x_orig, alpha: float, eps: float, lo: float, hi: float, *, launch=_identity):
    """l2 step per sample (dim 0), projection onto the eps ball around x_orig, clip; in place on x_adv."""
    numel = x_adv.numel()
    if numel == 0:
        return
    S = x_adv.shape[0] if x_adv.dim() > 0 else 1
    M = numel // S
    dense = _dense_sample_major(x_adv)
    x = x_adv if dense else x_adv.contiguous()
    g, x0 = _like(x, grad), _like(x, x_orig)
    # enough programs to fill the GPU, at most L2_MAX_CHUNKS partials per sample
    blocks = triton.cdiv(M, L2_BLOCK)
    want_chunks = min(max(1, triton.cdiv(L2_MIN_PROGRAMS, S)), L2_MAX_CHUNKS)
    iters = triton.cdiv(blocks, min(want_chunks, blocks))
    C = triton.cdiv(blocks, iters)
    part = torch.empty((3, S, C), dtype=torch.float32, device=x_adv.device)
    grid = (S, C)
    launch(_pgd_l2_partials_kernel)[grid](x, g, x0, part, S, M, C, iters, BLOCK=L2_BLOCK, num_warps=NUM_WARPS)
    launch(_pgd_l2_apply_kernel)[grid](x, g, x0, part, S, M, C, iters, float(alpha), float(eps), float(lo),
                                       float(hi), BLOCK=L2_BLOCK, BLOCK_C=max(triton.next_power_of_2(C), 16),
                                       num_warps=NUM_WARPS)
    if not dense:
        x_adv.copy_(x)


def _random_start_index(x: torch.Tensor):
    """(memory-order sizes, logical strides) of dense x with at most 4 dims after merging, else None."""
    order = _memory_order(x)
    if order is None:
        return None
    lstrides = [1] * x.dim()
    for i in range(x.dim() - 2, -1, -1):
        lstrides[i] = lstrides[i + 1] * x.shape[i + 1]
    sizes, strides = [], []
    for i in order:
        if x.shape[i] == 1:
            continue
        # merge with the previous memory-order dim when it is also the logically enclosing one
        if sizes and strides[-1] == lstrides[i] * x.shape[i]:
            sizes[-1] *= x.shape[i]
            strides[-1] = lstrides[i]
        else:
            sizes.append(x.shape[i])
            strides.append(lstrides[i])
    if len(sizes) > 4:
        return None
    while len(sizes) < 4:
        sizes.insert(0, 1)
        strides.insert(0, 0)
    return sizes, strides


def pgd_random_start(x, eps: float, lo: float, hi: float, seed: int, *, launch=_identity):
    """clamp(x + eps * (2U - 1), lo, hi), U = tl.rand(seed, logical index); a new tensor like x."""
    index = _random_start_index(x)
    if index is None:  # not dense, or more than 4 dims after merging: work in logical order
        x = x.contiguous()
        index = _random_start_index(x)
    out = torch.empty_like(x)
    numel = x.numel()
    if numel == 0:
        return out
    sizes, lstrides = index
    identity = sizes[:3] == [1, 1, 1] and lstrides[3] == 1
    grid = (triton.cdiv(numel, BLOCK),)
    launch(_pgd_random_start_kernel)[grid](x, out, numel, sizes[1], sizes[2], sizes[3], *lstrides, float(eps),
                                           float(lo), float(hi), int(seed), IDENTITY=identity, BLOCK=BLOCK,
                                           num_warps=NUM_WARPS)
    return out
