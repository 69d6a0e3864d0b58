"""Fused op 3: multi-positive NT-Xent over V views, without the N x N logits in the fused kernels.

reference -> registered ops (``urkle_fast::nt_xent_fwd``, ``urkle_fast::nt_xent_bwd``) -> public
``nt_xent()``. docs/MATH.md section 4; calling convention (rows vs gathered columns with a row offset):
docs/KERNEL_CONTRACT.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from urkle_fast import _backend
from urkle_fast import distributed as udist
from urkle_fast.ops._checks import (NonFiniteInputError, check_choice, check_finite, check_finite_enabled,
                                    check_number, check_tensor)

DENOMINATORS = {"all": 0, "negatives": 1}
_FN = "nt_xent"
_NORM_FLOOR = 1e-12


def _acc(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _masks(n: int, N: int, views: int, denominator: int, row_offset: int, device):
    B = N // views
    gi = torch.arange(row_offset, row_offset + n, device=device)[:, None]
    k = torch.arange(N, device=device)[None, :]
    same_image = (gi % B) == (k % B)
    diag = gi == k
    pos = same_image & ~diag
    den = ~diag if denominator == 0 else ~same_image
    return pos, den


def nt_xent_rows_reference(z_rows: Tensor, z_cols: Tensor, views: int, temperature: float, denominator: int,
                           row_offset: int) -> tuple[Tensor, Tensor]:
    """Materialising reference of the kernel contract: (loss_rows, lse), each [n], float32 (float64 in).

    ``loss_rows_i = (V-1) * lse_i - sum_{p in P(i)} s_ip``; differentiable by autograd.
    """
    u_r = F.normalize(_acc(z_rows), dim=1, eps=_NORM_FLOOR)
    u_c = F.normalize(_acc(z_cols), dim=1, eps=_NORM_FLOOR)
    s = u_r @ u_c.T / temperature
    pos, den = _masks(z_rows.shape[0], z_cols.shape[0], views, denominator, row_offset, z_rows.device)
    lse = torch.logsumexp(s.masked_fill(~den, float("-inf")), dim=1)
    loss_rows = (views - 1) * lse - (s * pos).sum(1)
    return loss_rows, lse


def nt_xent_rows_backward_reference(grad_rows: Tensor, z_rows: Tensor, z_cols: Tensor, lse: Tensor, views: int,
                                    temperature: float, denominator: int, row_offset: int,
                                    cols_grad: bool = True) -> tuple[Tensor, Tensor]:
    """Materialising reference of the kernel backward (explicit G, not autograd): (dz_rows, dz_cols); with
    cols_grad=False dz_cols is zeros (detached columns)."""
    zr, zc = _acc(z_rows), _acc(z_cols)
    nr = zr.norm(dim=1, keepdim=True).clamp_min(_NORM_FLOOR)
    nc = zc.norm(dim=1, keepdim=True).clamp_min(_NORM_FLOOR)
    u_r, u_c = zr / nr, zc / nc
    s = u_r @ u_c.T / temperature
    pos, den = _masks(z_rows.shape[0], z_cols.shape[0], views, denominator, row_offset, z_rows.device)
    c = _acc(grad_rows)[:, None]
    p = torch.exp(s - _acc(lse)[:, None]) * den
    G = c * ((views - 1) * p - pos.to(p.dtype))
    du_r = G @ u_c / temperature
    du_c = G.T @ u_r / temperature if cols_grad else None
    dz_r = (du_r - u_r * (u_r * du_r).sum(1, keepdim=True)) / nr
    if not cols_grad:
        return dz_r.to(z_rows.dtype), torch.zeros_like(z_cols)
    dz_c = (du_c - u_c * (u_c * du_c).sum(1, keepdim=True)) / nc
    return dz_r.to(z_rows.dtype), dz_c.to(z_cols.dtype)


def nt_xent_reference(z: Tensor, *, views: int, temperature: float = 0.5, denominator: str = "all") -> Tensor:
    """Pure-torch multi-view NT-Xent of docs/MATH.md section 4 (materialises the N x N logits)."""
    z2 = z.reshape(-1, z.shape[-1])
    loss_rows, _ = nt_xent_rows_reference(z2, z2, views, temperature, DENOMINATORS[denominator], 0)
    return loss_rows.sum() / (z2.shape[0] * (views - 1))


def nt_xent_column_detached_reference(z: Tensor, *, views: int, temperature: float = 0.5,
                                      denominator: str = "all") -> Tensor:
    """Pure-torch NT-Xent with RoCL's official similarity S = P (P.detach())^T (Kim et al. 2020, loss.py):
    the value of ``nt_xent_reference``, but the gradient flows through each row's own projection only."""
    z2 = z.reshape(-1, z.shape[-1])
    loss_rows, _ = nt_xent_rows_reference(z2, z2.detach(), views, temperature, DENOMINATORS[denominator], 0)
    return loss_rows.sum() / (z2.shape[0] * (views - 1))


def nt_xent_column_detached(z: Tensor, *, views: int, temperature: float = 0.5, denominator: str = "all",
                            gather_distributed: bool = False) -> Tensor:
    """NT-Xent with RoCL's official similarity S = P (P.detach())^T: the fused op with the columns detached.

    The same registered op as ``nt_xent`` (rows against columns), so the C++ kernels run on the CPU and
    Triton on CUDA, without the N x N logits. The columns do not require grad, so its backward runs the
    kernels' rows pass only (``cols_grad=False``).
    ``gather_distributed`` as in ``nt_xent``: this rank's rows against every rank's (detached) columns, so
    DDP's gradient averaging gives the rows-only gradient of the global batch's loss."""
    return _nt_xent("nt_xent_column_detached", z, views, temperature, denominator, gather_distributed,
                    detach_columns=True)


def _backend_for(t: Tensor) -> str:
    return _backend.select_for("nt_xent", t)


@torch.library.triton_op("urkle_fast::nt_xent_fwd", mutates_args=())
def _nt_xent_fwd_op(z_rows: Tensor, z_cols: Tensor, views: int, temperature: float, denominator: int,
                    row_offset: int) -> tuple[Tensor, Tensor]:
    backend = _backend_for(z_rows)
    if backend == "triton":
        return _backend.kernels_module("nt_xent").nt_xent_fwd(z_rows, z_cols, views, temperature, denominator,
                                                              row_offset, launch=torch.library.wrap_triton)
    if backend == "native":
        return tuple(torch.ops.urkle_fast.nt_xent_fwd_native(z_rows, z_cols, views, temperature, denominator,
                                                             row_offset))
    with torch.no_grad():
        return nt_xent_rows_reference(z_rows, z_cols, views, temperature, denominator, row_offset)


@torch.library.triton_op("urkle_fast::nt_xent_bwd", mutates_args=())
def _nt_xent_bwd_op(grad_rows: Tensor, z_rows: Tensor, z_cols: Tensor, lse: Tensor, views: int, temperature: float,
                    denominator: int, row_offset: int, cols_grad: bool = True) -> tuple[Tensor, Tensor]:
    backend = _backend_for(z_rows)
    if backend == "triton":
        return _backend.kernels_module("nt_xent").nt_xent_bwd(grad_rows, z_rows, z_cols, lse, views, temperature,
                                                              denominator, row_offset, cols_grad,
                                                              launch=torch.library.wrap_triton)
    if backend == "native":
        return tuple(torch.ops.urkle_fast.nt_xent_bwd_native(grad_rows, z_rows, z_cols, lse, views, temperature,
                                                             denominator, row_offset, cols_grad))
    return nt_xent_rows_backward_reference(grad_rows, z_rows, z_cols, lse, views, temperature, denominator,
                                           row_offset, cols_grad)


def _setup_context(ctx, inputs, output):
    z_rows, z_cols, views, temperature, denominator, row_offset = inputs
    _, lse = output
    ctx.mark_non_differentiable(lse)  # a saved statistic for the backward, not a loss
    ctx.save_for_backward(z_rows, z_cols, lse)
    ctx.args = (views, temperature, denominator, row_offset)


def _backward(ctx, grad_rows, grad_lse):
    z_rows, z_cols, lse = ctx.saved_tensors
    if grad_rows is None:
        grad_rows = torch.zeros_like(lse)
    # columns that need no gradient (RoCL's detached similarity) are not differentiated at all: the kernels skip
    # their pass (on the CPU the forward+backward takes 0.74x the time, BENCHMARKS.md)
    cols_grad = bool(ctx.needs_input_grad[1])
    dz_rows, dz_cols = torch.ops.urkle_fast.nt_xent_bwd(grad_rows.contiguous(), z_rows, z_cols, lse, *ctx.args,
                                                        cols_grad)
    return dz_rows, dz_cols if cols_grad else None, None, None, None, None


_nt_xent_fwd_op.register_autograd(_backward, setup_context=_setup_context)

if _backend.native_ops_present():
    @torch.library.register_fake("urkle_fast::nt_xent_fwd_native")
    def _(z_rows, z_cols, views, temperature, denominator, row_offset):
        n = z_rows.shape[0]
        return z_rows.new_empty((n,), dtype=torch.float32), z_rows.new_empty((n,), dtype=torch.float32)

    @torch.library.register_fake("urkle_fast::nt_xent_bwd_native")
    def _(grad_rows, z_rows, z_cols, lse, views, temperature, denominator, row_offset, cols_grad=True):
        return torch.empty(z_rows.shape, dtype=z_rows.dtype, device=z_rows.device), \
            torch.empty(z_cols.shape, dtype=z_cols.dtype, device=z_cols.device)


def check_nt_xent_args(fn: str, z: Tensor, views, temperature, denominator) -> tuple[int, int, int]:
    """Validate and return (N, B, d) for a [V, B, d] or view-major [V*B, d] input."""
    check_tensor(fn, "z", z, ndim=(2, 3))
    if isinstance(views, bool) or not isinstance(views, int):
        raise TypeError(f"{fn}: views must be an int, got {type(views).__name__} {views!r}")
    if views < 2:
        raise ValueError(f"{fn}: views must be >= 2 (each row needs a positive), got {views}")
    check_number(fn, "temperature", temperature, minimum=0.0, strict=True)
    check_choice(fn, "denominator", denominator, tuple(DENOMINATORS))
    if z.dim() == 3 and z.shape[0] != views:
        raise ValueError(f"{fn}: z of shape [V, B, d] must have V == views == {views}, got shape {tuple(z.shape)}")
    N, d = (z.shape[0] * z.shape[1], z.shape[2]) if z.dim() == 3 else tuple(z.shape)
    if N == 0 or d == 0:
        raise ValueError(f"{fn}: z must not be empty, got shape {tuple(z.shape)}")
    if N % views != 0:
        raise ValueError(f"{fn}: views must divide the number of rows N, got N={N}, views={views}")
    B = N // views
    if denominator == "negatives" and B < 2:
        raise ValueError(f"{fn}: denominator='negatives' needs at least 2 images (B >= 2), got B={B}")
    return N, B, d


def nt_xent(z: Tensor, *, views: int, temperature: float = 0.5, denominator: str = "all",
            gather_distributed: bool = False) -> Tensor:
    """Multi-positive NT-Xent (docs/MATH.md section 4) of V views of B images.

    Args:
        z: [V, B, d] or view-major [V*B, d] (row v*B + b is view v of image b); float32, bfloat16,
            float16 (float64 runs the reference). Any strides.
        views: V >= 2. temperature: tau > 0. denominator: "all" (SimCLR for V=2) or "negatives" (Eq. 9).
        gather_distributed: under torch.distributed, the loss over the GLOBAL batch (as lightly's
            ``NTXentLoss(gather_distributed=True)``): this rank's rows against every rank's columns.
            Every rank passes the same B. Returns this rank's mean over its rows, so the mean over
            ranks is ``nt_xent`` of the concatenated global batch (rank-major within each view) and
            DDP's gradient averaging gives its exact gradient. No effect in a single process.
    Returns:
        float32 scalar ``1/(N (V-1)) * sum_i sum_{p in P(i)} [log D_i - s_ip]``.
    """
    return _nt_xent(_FN, z, views, temperature, denominator, gather_distributed, detach_columns=False)


def _nt_xent(fn: str, z: Tensor, views, temperature, denominator, gather_distributed: bool,
             detach_columns: bool) -> Tensor:
    """The body of ``nt_xent`` and ``nt_xent_column_detached``: checks, then this process's rows against its own
    columns (detached for RoCL's similarity) or, gathered, against every rank's."""
    N, b, d = check_nt_xent_args(fn, z, views, temperature, denominator)
    if gather_distributed and udist.is_distributed():
        _check_finite_on_every_rank(fn, z)
        return _nt_xent_global(z, views, float(temperature), DENOMINATORS[denominator], N, b, d, detach_columns)
    check_finite(fn, {"z": z})
    z2 = z.reshape(N, d)
    loss_rows, _ = torch.ops.urkle_fast.nt_xent_fwd(z2, z2.detach() if detach_columns else z2, views,
                                                    float(temperature), DENOMINATORS[denominator], 0)
    return loss_rows.sum() / (N * (views - 1))


def _check_finite_on_every_rank(fn: str, z: Tensor) -> None:
    """Every rank learns of a non-finite rank and raises with it: a rank raising alone would leave the others
    waiting in the all-gather until the process group's timeout."""
    if check_finite_enabled(z.device):
        bad = udist.ranks_flagging(not bool(torch.isfinite(z).all()))
        if bad:
            raise NonFiniteInputError(f"{fn}: z must be finite, got NaN or inf on rank(s) {bad} of "
                                      f"{udist.world_size()}")


def _nt_xent_global(z: Tensor, views: int, temperature: float, den: int, N_local: int, b: int, d: int,
                    detach_columns: bool = False) -> Tensor:
    """The rows of this rank against the columns of every rank (docs/KERNEL_CONTRACT.md, row offset).

    The columns are all-gathered with a gradient (urkle_fast.distributed.all_gather_with_grad, whose
    backward sums every rank's column gradient), or without one (``detach_columns``: RoCL's similarity);
    one fused-op call per view block, since a rank's rows are V separate runs of the global view-major
    order [V, W * b, d]."""
    W, r = udist.world_size(), udist.rank()
    z3 = z.reshape(views, b, d)
    local = z3.reshape(N_local, d)
    # [W * V * b, d] in rank order -> the global view-major order [V, W * b, d]
    cols = udist.all_gather_with_grad(local.detach() if detach_columns else local).view(W, views, b, d).transpose(0, 1)
    cols = cols.reshape(W * N_local, d)
    B = W * b
    total = z.new_zeros((), dtype=torch.float32)
    for v in range(views):
        loss_rows, _ = torch.ops.urkle_fast.nt_xent_fwd(z3[v], cols, views, temperature, den, v * B + r * b)
        total = total + loss_rows.sum()
    return total / (N_local * (views - 1))
