"""nt_xent: the reference against an independent float64 loop and against SimCLR's NT-Xent, its
float64 gradcheck, and every backend against the reference (V in {2, 4}, both denominators, odd N,
row offsets, dtypes, upstream gradients), and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TOLERANCES, NtXentBackwardCalls
from urkle_fast import NTXent, nt_xent, nt_xent_reference
from urkle_fast.ops.nt_xent import (nt_xent_column_detached, nt_xent_column_detached_reference,
                                   nt_xent_rows_backward_reference, nt_xent_rows_reference)

OP = "nt_xent"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _z(V, B, d, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, d, generator=g, dtype=torch.float64)
    # views of one image are correlated, as augmentations are: the loss is then far from log(N)
    z = torch.stack([base + 0.7 * torch.randn(B, d, generator=g, dtype=torch.float64) for _ in range(V)])
    return z.to(device=device, dtype=dtype)


def _loop_formula(z, V, tau, denominator):
    """docs/MATH.md section 4 written as plain loops over rows, float64."""
    N = z.shape[0] * z.shape[1]
    B = N // V
    u = [row / row.norm() for row in z.reshape(N, -1).double()]
    total = 0.0
    for i in range(N):
        s = [float(u[i] @ u[k]) / tau for k in range(N)]
        if denominator == "all":
            den = [k for k in range(N) if k != i]
        else:
            den = [k for k in range(N) if k % B != i % B]
        log_d = math.log(sum(math.exp(s[k]) for k in den))
        for p in (k for k in range(N) if k != i and k % B == i % B):
            total += log_d - s[p]
    return total / (N * (V - 1))


@pytest.mark.parametrize("V,B", [(2, 3), (4, 5), (3, 2)])
@pytest.mark.parametrize("denominator", ["all", "negatives"])
def test_reference_matches_loop_formula(V, B, denominator):
    z = _z(V, B, 7, torch.float64)
    got = nt_xent_reference(z, views=V, temperature=0.3, denominator=denominator)
    assert got.item() == pytest.approx(_loop_formula(z, V, 0.3, denominator), rel=1e-12)


def _simclr_nt_xent(z1, z2, tau):
    """SimCLR's NT-Xent as usually written: cross-entropy over the 2B x 2B similarities."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / tau
    sim.fill_diagonal_(float("-inf"))
    B = z1.shape[0]
    targets = torch.cat([torch.arange(B, 2 * B), torch.arange(0, B)])
    return F.cross_entropy(sim, targets)


def test_v2_all_equals_simclr(backend):
    z = _z(2, 33, 16, torch.float32, backend.device)
    expected = _simclr_nt_xent(z[0].double().cpu(), z[1].double().cpu(), 0.5)
    got = nt_xent(z, views=2, temperature=0.5, denominator="all")
    torch.testing.assert_close(got.double().cpu(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("denominator", ["all", "negatives"])
def test_reference_gradcheck_float64(denominator):
    z = _z(4, 3, 5, torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: nt_xent_reference(t, views=4, temperature=0.4,
                                                                denominator=denominator), (z,))


@pytest.mark.parametrize("denominator", ["all", "negatives"])
def test_registered_op_gradcheck_float64(denominator):
    # float64 runs the op's explicit-G backward formula, not autograd of the reference
    z = _z(3, 4, 6, torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: nt_xent(t, views=3, temperature=0.4, denominator=denominator), (z,))


def test_explicit_backward_reference_matches_autograd_with_row_offset():
    z = _z(4, 5, 6, torch.float64).reshape(20, 6)
    rows = z[7:15].clone().requires_grad_(True)
    cols = z.clone().requires_grad_(True)
    loss_rows, lse = nt_xent_rows_reference(rows, cols, 4, 0.5, 1, 7)
    up = torch.rand(8, dtype=torch.float64) + 0.5
    g_rows, g_cols = torch.autograd.grad(loss_rows, (rows, cols), up)
    e_rows, e_cols = nt_xent_rows_backward_reference(up, rows.detach(), cols.detach(), lse.detach(), 4, 0.5, 1, 7)
    torch.testing.assert_close(e_rows, g_rows)
    torch.testing.assert_close(e_cols, g_cols)


# B = 1 has no negatives, so only the "all" denominator exists for it
_SHAPES = [(V, B, d, den) for V, B, d in [(2, 19, 33), (4, 13, 33), (4, 1, 5), (3, 7, 129)]
           for den in ("all", "negatives") if den == "all" or B >= 2]


@pytest.mark.parametrize("detach_columns", [False, True], ids=["nt_xent", "column_detached"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V,B,d,denominator", _SHAPES)
def test_backend_matches_reference(backend, V, B, d, dtype, denominator, detach_columns):
    """nt_xent, and RoCL's official similarity (the same fused op, columns detached), against their references:
    the value, and the gradient under an upstream gradient other than 1. No gradcheck for the column-detached
    form: its rows-only gradient is not the gradient of its value, on purpose."""
    fn, reference = ((nt_xent_column_detached, nt_xent_column_detached_reference) if detach_columns
                     else (nt_xent, nt_xent_reference))
    tol = TOLERANCES[dtype]
    z = _z(V, B, d, dtype, backend.device).requires_grad_(True)
    z_ref = z.detach().clone().requires_grad_(True)
    out = fn(z, views=V, temperature=0.5, denominator=denominator)
    ref = reference(z_ref, views=V, temperature=0.5, denominator=denominator)
    assert out.dtype == torch.float32 and out.dim() == 0
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    up = torch.tensor(1.7, device=backend.device)
    (g,) = torch.autograd.grad(out, z, up)
    (gr,) = torch.autograd.grad(ref, z_ref, up)
    assert g.dtype == dtype and g.shape == z.shape
    scale = gr.float().abs().max().item()
    torch.testing.assert_close(g.float(), gr.float(), rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1e-3))
    if detach_columns:  # the same value as nt_xent, but not its gradient: the columns' share is gone
        torch.testing.assert_close(out, nt_xent(z.detach(), views=V, temperature=0.5, denominator=denominator))
        (g_full,) = torch.autograd.grad(nt_xent_reference(z_ref, views=V, temperature=0.5, denominator=denominator),
                                        z_ref, up)
        assert (g_full.float() - gr.float()).abs().max() > 10 * tol["atol"] * max(scale, 1e-3)


@pytest.mark.parametrize("detach_columns", [False, True])
def test_backward_skips_the_columns_only_when_they_are_detached(backend, detach_columns):
    """The registered backward is asked for the columns' gradient exactly when the columns need one."""
    z = _z(4, 6, 10, torch.float32, backend.device).requires_grad_(True)
    fn = nt_xent_column_detached if detach_columns else nt_xent
    loss = fn(z, views=4)
    with NtXentBackwardCalls() as rec:
        loss.backward()
    assert rec.cols_grad == [not detach_columns]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("denominator", [0, 1])
@pytest.mark.parametrize("V", [2, 4])
def test_rows_op_with_row_offset(backend, V, denominator, dtype):
    """The distributed form: local rows against gathered columns, with per-row upstream gradients."""
    B, d = 11, 20
    z = _z(V, B, d, dtype, backend.device).reshape(V * B, d)
    lo, hi = 5, 5 + 2 * B - 3  # an offset that is not a multiple of B
    rows = z[lo:hi].clone().requires_grad_(True)
    cols = z.clone().requires_grad_(True)
    loss_rows, lse = torch.ops.urkle_fast.nt_xent_fwd(rows, cols, V, 0.25, denominator, lo)
    rows_r = rows.detach().clone().requires_grad_(True)
    cols_r = cols.detach().clone().requires_grad_(True)
    loss_ref, lse_ref = nt_xent_rows_reference(rows_r, cols_r, V, 0.25, denominator, lo)
    torch.testing.assert_close(lse, lse_ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_rows, loss_ref.detach(), rtol=1e-5, atol=1e-4)
    up = torch.rand(rows.shape[0], generator=torch.Generator().manual_seed(3)).to(backend.device) - 0.3
    g = torch.autograd.grad(loss_rows, (rows, cols), up)
    gr = torch.autograd.grad(loss_ref, (rows_r, cols_r), up)
    tol = TOLERANCES[dtype]
    for a, b in zip(g, gr):
        scale = b.float().abs().max().item()
        torch.testing.assert_close(a.float(), b.float(), rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1e-3))


def test_non_contiguous_and_flat_input(backend):
    z = _z(4, 9, 24, torch.float32, backend.device)
    zt = z.transpose(0, 1).contiguous().transpose(0, 1)  # [V, B, d] with non-view-major memory
    assert not zt.is_contiguous()
    ref = nt_xent_reference(z, views=4)
    torch.testing.assert_close(nt_xent(zt, views=4), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nt_xent(z.reshape(36, 24), views=4), ref, rtol=1e-5, atol=1e-5)
    wide = torch.cat([z, z], dim=-1)[..., ::2]  # strided last dim
    torch.testing.assert_close(nt_xent(wide, views=4), nt_xent_reference(wide.contiguous(), views=4),
                               rtol=1e-5, atol=1e-5)


def test_module_form_equals_function():
    z = _z(4, 6, 8)
    assert torch.equal(NTXent(views=4, temperature=0.2)(z), nt_xent(z, views=4, temperature=0.2))


@pytest.mark.parametrize(
    "z,kwargs,exc,match",
    [
        (torch.randn(10, 4), dict(views=4), ValueError, r"views must divide the number of rows N, got N=10, views=4"),
        (torch.randn(3, 5, 4), dict(views=4), ValueError, r"z of shape \[V, B, d\] must have V == views == 4, got shape \(3, 5, 4\)"),
        (torch.randn(8, 4), dict(views=1), ValueError, r"views must be >= 2"),
        (torch.randn(8, 4), dict(views=2.0), TypeError, r"views must be an int, got float"),
        (torch.randn(8, 4), dict(views=2, temperature=0.0), ValueError, r"temperature must be > 0.0, got 0.0"),
        (torch.randn(8, 4), dict(views=2, denominator="neg"), ValueError, r"denominator must be one of \('all', 'negatives'\), got 'neg'"),
        (torch.randn(0, 4), dict(views=2), ValueError, r"z must not be empty, got shape \(0, 4\)"),
        (torch.randn(8), dict(views=2), ValueError, r"z must be 2-D or 3-D, got 1-D"),
        (torch.randint(0, 3, (8, 4)), dict(views=2), TypeError, r"z must have dtype in .*got int64"),
        (torch.randn(4, 4), dict(views=4, denominator="negatives"), ValueError, r"denominator='negatives' needs at least 2 images"),
        (torch.full((8, 4), float("nan")), dict(views=2), ValueError, r"z must be finite, got 32 non-finite"),
    ],
)
@pytest.mark.parametrize("fn", [nt_xent, nt_xent_column_detached])
def test_bad_input_names_the_argument(fn, z, kwargs, exc, match):
    with pytest.raises(exc, match=f"{fn.__name__}: {match}"):
        fn(z, **kwargs)
