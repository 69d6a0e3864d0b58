"""What only the native layer (urkle_fast._C, csrc/) shows: the module attributes, the TORCH_CHECK
messages of the raw ops, the row_offset / aliasing contract of NT-Xent, layouts kept by the in-place
PGD step, and the per-capability copies of the CPU loops agreeing with each other.

The public ops against the reference, on every backend, are tests/test_gaussian_kl.py, test_pgd.py and
test_nt_xent.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from urkle_fast import _backend
from urkle_fast.ops.gaussian_kl import gaussian_kl_reference
from urkle_fast.ops.nt_xent import nt_xent_rows_reference

pytestmark = pytest.mark.native

if not _backend.native_ops_present():
    if "native" in {b.strip() for b in os.environ.get("URKLE_FAST_REQUIRE_BACKENDS", "").split(",")}:
        raise RuntimeError(f"urkle_fast._C is required but failed to import: {_backend._C_ERROR}")
    pytest.skip(f"urkle_fast._C not built ({_backend._C_ERROR})", allow_module_level=True)

from urkle_fast import _C  # noqa: E402

ops = torch.ops.urkle_fast


# ------------------------------------------------------------------------------------- module attributes

def test_module_attributes():
    assert isinstance(_C.WITH_CUDA, bool)
    assert _C.CPU_CAPABILITY in ("DEFAULT", "AVX2", "AVX512")
    # a build with CUDA kernels registers them for the CUDA dispatch key
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("urkle_fast::gaussian_kl_fwd_native", "CUDA")
    assert has_cuda_kernel == _C.WITH_CUDA


# ------------------------------------------------------------------------------------- argument checks

def _kl(B=4, D=5, dtype=torch.float32):
    return [torch.randn(B, D, dtype=dtype) for _ in range(4)]


@pytest.mark.parametrize("case,pattern", [
    ("1d", r"gaussian_kl_fwd_native: mu_p must be 2-D \[B, D\], got 1-D with shape \[4\]"),
    ("shape", r"gaussian_kl_fwd_native: mu_q must have the shape of mu_p \[4, 5\], got \[4, 6\]"),
    ("dtype", r"gaussian_kl_fwd_native: logvar_p must have the dtype of mu_p \(Float\), got BFloat16"),
    ("float64", r"gaussian_kl_fwd_native: mu_p must have dtype float32, bfloat16 or float16, got Double"),
    ("reduction", r"gaussian_kl_fwd_native: reduction must be 0 \(none\), 1 \(sum\) or 2 \(mean\), got 3"),
])
def test_kl_fwd_checks(case, pattern):
    mp, lp, mq, lq = _kl()
    red = 2
    if case == "1d":
        mp = mp[:, 0]
    elif case == "shape":
        mq = torch.randn(4, 6)
    elif case == "dtype":
        lp = lp.bfloat16()
    elif case == "float64":
        mp, lp, mq, lq = (t.double() for t in (mp, lp, mq, lq))
    elif case == "reduction":
        red = 3
    with pytest.raises(RuntimeError, match=pattern):
        ops.gaussian_kl_fwd_native(mp, lp, mq, lq, red)


def test_kl_bwd_checks():
    ins = _kl()
    with pytest.raises(RuntimeError, match=r"gaussian_kl_bwd_native: grad must have shape \[B\] = \[4\] for "
                                           r"reduction 0 \(none\), got \[3\]"):
        ops.gaussian_kl_bwd_native(torch.ones(3), *ins, 0)
    with pytest.raises(RuntimeError, match=r"gaussian_kl_bwd_native: grad must be a scalar \(shape \[\]\) for "
                                           r"reduction 2, got shape \[4\]"):
        ops.gaussian_kl_bwd_native(torch.ones(4), *ins, 2)
    with pytest.raises(RuntimeError, match=r"gaussian_kl_bwd_native: grad must be float32, got Half"):
        ops.gaussian_kl_bwd_native(torch.ones(4, dtype=torch.half), *ins, 0)


def test_pgd_checks():
    x, g, x0 = (torch.rand(2, 3, 4, 4) for _ in range(3))
    with pytest.raises(RuntimeError, match=r"pgd_step_linf_native_: grad must have the shape of x_adv "
                                           r"\[2, 3, 4, 4\], got \[2, 3, 4\]"):
        ops.pgd_step_linf_native_(x, g[..., 0], x0, 0.1, 0.1, 0.0, 1.0)
    with pytest.raises(RuntimeError, match=r"pgd_step_l2_native_: x_orig must have the dtype of x_adv "
                                           r"\(Float\), got Half"):
        ops.pgd_step_l2_native_(x, g, x0.half(), 0.1, 0.1, 0.0, 1.0)
    with pytest.raises(RuntimeError, match=r"pgd_step_linf_native_: lo must be <= hi, got lo=1, hi=0"):
        ops.pgd_step_linf_native_(x, g, x0, 0.1, 0.1, 1.0, 0.0)
    with pytest.raises(RuntimeError, match=r"pgd_step_linf_native_: eps must be finite and >= 0, got -0.1"):
        ops.pgd_step_linf_native_(x, g, x0, 0.1, -0.1, 0.0, 1.0)


@pytest.mark.parametrize("case,pattern", [
    ("views", r"nt_xent_fwd_native: views must divide z_cols.size\(0\) = N, got N=12, views=5"),
    ("views1", r"nt_xent_fwd_native: views must be >= 2, got 1"),
    ("offset", r"nt_xent_fwd_native: row_offset must satisfy 0 <= row_offset and row_offset \+ n <= N "
               r"\(n = z_rows.size\(0\) = 12, N = z_cols.size\(0\) = 12\), got row_offset=1"),
    ("d", r"nt_xent_fwd_native: z_cols must have d = z_rows.size\(1\) = 8 columns, got shape \[12, 7\]"),
    ("tau", r"nt_xent_fwd_native: temperature must be finite and > 0, got 0"),
    ("den", r"nt_xent_fwd_native: denominator must be 0 \(all\) or 1 \(negatives\), got 2"),
    ("3d", r"nt_xent_fwd_native: z_rows must be 2-D \[n, d\], got 3-D with shape \[3, 4, 8\]"),
])
def test_nt_xent_fwd_checks(case, pattern):
    z = torch.randn(12, 8)
    zr, zc, views, tau, den, off = z, z, 3, 0.5, 0, 0
    if case == "views":
        views = 5
    elif case == "views1":
        views = 1
    elif case == "offset":
        off = 1
    elif case == "d":
        zc = torch.randn(12, 7)
    elif case == "tau":
        tau = 0.0
    elif case == "den":
        den = 2
    elif case == "3d":
        zr = z.view(3, 4, 8)
    with pytest.raises(RuntimeError, match=pattern):
        ops.nt_xent_fwd_native(zr, zc, views, tau, den, off)


def test_nt_xent_bwd_checks():
    z = torch.randn(12, 8)
    _, lse = ops.nt_xent_fwd_native(z, z, 3, 0.5, 0, 0)
    with pytest.raises(RuntimeError, match=r"nt_xent_bwd_native: lse must have shape \[n\] = \[12\], got \[11\]"):
        ops.nt_xent_bwd_native(torch.ones(12), z, z, lse[:11], 3, 0.5, 0, 0)
    with pytest.raises(RuntimeError, match=r"nt_xent_bwd_native: grad_rows must be float32, got BFloat16"):
        ops.nt_xent_bwd_native(torch.ones(12, dtype=torch.bfloat16), z, z, lse, 3, 0.5, 0, 0)


# ------------------------------------------------------------------------------- NT-Xent rows vs columns

@pytest.mark.parametrize("strategy", ["private", "split"])
@pytest.mark.parametrize("denominator", [0, 1])
@pytest.mark.parametrize("views", [2, 4])
def test_nt_xent_row_offset_shards_add_up(views, denominator, strategy, monkeypatch):
    """Rows split across 'ranks' (row_offset, z_rows a slice of the gathered z_cols) give the full call's
    loss rows, and the per-rank gradients summed (all-reduce of dz_cols, dz_rows placed at the rows)
    give the full gradient. Both CPU backward strategies (per-thread dU_cols buffers, or the
    column-parallel second pass used on many-core machines)."""
    monkeypatch.setenv("URKLE_FAST_NT_XENT_CPU_BWD", strategy)
    torch.manual_seed(0)
    B, d = 37, 129
    N = views * B
    z = torch.randn(N, d)
    c = torch.randn(N)
    loss, lse = ops.nt_xent_fwd_native(z, z, views, 0.3, denominator, 0)
    dzr, dzc = ops.nt_xent_bwd_native(c, z, z, lse, views, 0.3, denominator, 0)
    full_grad = dzr + dzc
    bounds = [0, 29, 30, N // 2, N - 1, N]  # uneven shards, one of a single row
    shard_grad = torch.zeros(N, d)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        l_s, lse_s = ops.nt_xent_fwd_native(z[lo:hi], z, views, 0.3, denominator, lo)
        torch.testing.assert_close(l_s, loss[lo:hi], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lse_s, lse[lo:hi], rtol=1e-6, atol=1e-6)
        r_s, c_s = ops.nt_xent_bwd_native(c[lo:hi], z[lo:hi], z, lse_s, views, 0.3, denominator, lo)
        shard_grad[lo:hi] += r_s
        shard_grad += c_s
    torch.testing.assert_close(shard_grad, full_grad, rtol=1e-5, atol=1e-6)
    # and autograd through the float64 reference of the same contract
    zd = z.double().requires_grad_()
    ref, ref_lse = nt_xent_rows_reference(zd, zd, views, 0.3, denominator, 0)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    (ref_grad,) = torch.autograd.grad(ref, zd, c.double())
    torch.testing.assert_close(full_grad.double(), ref_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy", ["private", "split"])
def test_nt_xent_bwd_without_cols_grad_gives_the_same_rows(strategy, monkeypatch, nan_filled_empty):
    """cols_grad=False (detached columns): dz_rows bit-identical to the full backward's under either strategy,
    dz_cols zeros, for the whole batch and for a shard with a row offset."""
    monkeypatch.setenv("URKLE_FAST_NT_XENT_CPU_BWD", strategy)
    torch.manual_seed(2)
    z = torch.randn(3 * 23, 40)
    for lo, hi in ((0, 69), (11, 50)):
        _, lse = ops.nt_xent_fwd_native(z[lo:hi], z, 3, 0.4, 0, lo)
        c = torch.randn(hi - lo)
        full = ops.nt_xent_bwd_native(c, z[lo:hi], z, lse, 3, 0.4, 0, lo)
        rows_only = ops.nt_xent_bwd_native(c, z[lo:hi], z, lse, 3, 0.4, 0, lo, False)
        assert torch.equal(rows_only[0], full[0])
        assert torch.equal(rows_only[1], torch.zeros_like(z)) and full[1].abs().max() > 0


def test_nt_xent_alias_and_copy_agree():
    """z_rows as a view into z_cols (U_rows shared with U_cols) and as a separate copy: same numbers."""
    torch.manual_seed(1)
    z = torch.randn(4 * 11, 33, dtype=torch.bfloat16)
    lo, hi = 7, 30
    a = ops.nt_xent_fwd_native(z[lo:hi], z, 4, 0.5, 1, lo)
    b = ops.nt_xent_fwd_native(z[lo:hi].clone(), z, 4, 0.5, 1, lo)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    c = torch.randn(hi - lo)
    ga = ops.nt_xent_bwd_native(c, z[lo:hi], z, a[1], 4, 0.5, 1, lo)
    gb = ops.nt_xent_bwd_native(c, z[lo:hi].clone(), z, a[1], 4, 0.5, 1, lo)
    for x, y in zip(ga, gb):
        assert torch.equal(x, y)


def test_nt_xent_noncontiguous_columns():
    torch.manual_seed(2)
    z = torch.randn(40, 2 * 17)[:, ::2]  # row stride 34, inner stride 2
    zt = torch.randn(17, 40).t()  # column-major
    for zz in (z, zt):
        got = ops.nt_xent_fwd_native(zz, zz, 4, 0.5, 0, 0)
        want = ops.nt_xent_fwd_native(zz.contiguous(), zz.contiguous(), 4, 0.5, 0, 0)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# -------------------------------------------------------------------------------------------- PGD layout

@pytest.mark.parametrize("fn", ["pgd_step_linf_native_", "pgd_step_l2_native_"])
def test_pgd_in_place_keeps_layout(fn):
    torch.manual_seed(3)
    x0 = torch.rand(5, 3, 7, 9)
    g = torch.randn(5, 3, 7, 9)
    want = x0.clone()
    getattr(ops, fn)(want, g, x0, 0.05, 0.1, 0.0, 1.0)
    # channels_last x_adv: stepped in place in its own layout (grad, x_orig contiguous)
    x = x0.clone().contiguous(memory_format=torch.channels_last)
    ptr = x.data_ptr()
    getattr(ops, fn)(x, g, x0, 0.05, 0.1, 0.0, 1.0)
    assert x.data_ptr() == ptr and x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x, want, rtol=0, atol=1e-6)
    # a strided view: the values land in the parent tensor
    parent = torch.zeros(5, 3, 7, 18)
    view = parent[..., ::2]
    view.copy_(x0)
    getattr(ops, fn)(view, g, x0, 0.05, 0.1, 0.0, 1.0)
    torch.testing.assert_close(parent[..., ::2], want, rtol=0, atol=1e-6)
    assert torch.equal(parent[..., 1::2], torch.zeros(5, 3, 7, 9))


def test_kl_thread_count_does_not_change_results():
    ins = _kl(B=301, D=77)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.gaussian_kl_fwd_native(*ins, 1)
        torch.set_num_threads(max(2, prev))
        many = ops.gaussian_kl_fwd_native(*ins, 1)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(one, many)
    torch.testing.assert_close(one.double(), gaussian_kl_reference(*[t.double() for t in ins], "sum"),
                               rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ every copy of the CPU loops agrees

_PROBE = r"""
import json, torch
from urkle_fast import _C
ops = torch.ops.urkle_fast
g = torch.Generator().manual_seed(0)
out = {"cap": _C.CPU_CAPABILITY}
for dt in (torch.float32, torch.bfloat16, torch.float16):
    kl = [torch.randn(37, 129, generator=g).to(dt) for _ in range(4)]
    out[f"kl_{dt}"] = ops.gaussian_kl_fwd_native(*kl, 0).tolist()
    out[f"klg_{dt}"] = [t.float().sum(1).tolist() for t in ops.gaussian_kl_bwd_native(torch.ones(37), *kl, 0)]
    x0 = torch.rand(5, 3, 7, 9, generator=g).to(dt); x = x0.clone(); gr = torch.randn(5, 3, 7, 9, generator=g).to(dt)
    ops.pgd_step_linf_native_(x, gr, x0, 0.05, 0.1, 0.0, 1.0)
    ops.pgd_step_l2_native_(x, gr, x0, 0.3, 0.5, 0.0, 1.0)
    out[f"pgd_{dt}"] = x.float().flatten().tolist()
    z = torch.randn(4 * 37, 129, generator=g).to(dt)
    loss, lse = ops.nt_xent_fwd_native(z, z, 4, 0.5, 1, 0)
    dzr, dzc = ops.nt_xent_bwd_native(torch.ones(148), z, z, lse, 4, 0.5, 1, 0)
    out[f"ntx_{dt}"] = loss.tolist() + (dzr.float() + dzc.float()).sum(1).tolist()
print(json.dumps(out))
"""


def _probe(capability: str) -> dict:
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


_FAST = {"DEFAULT": [], "AVX2": ["AVX2"], "AVX512": ["AVX2", "AVX512"]}.get(_C.CPU_CAPABILITY, [])


@pytest.fixture(scope="module")
def portable_probe():
    return _probe("default")


@pytest.mark.parametrize("capability", _FAST or [pytest.param("none", marks=pytest.mark.skip(
    reason="only the portable copy of the loops runs on this CPU"))])
def test_capability_copies_agree(capability, portable_probe):
    """ATEN_CPU_CAPABILITY=default runs the portable copy of the loops: every vectorised copy this CPU
    can run must agree with it."""
    fast, portable = _probe(capability.lower()), portable_probe
    assert fast["cap"] == capability and portable["cap"] == "DEFAULT"
    for key in fast:
        if key == "cap":
            continue
        a, b = torch.tensor(fast[key], dtype=torch.float64), torch.tensor(portable[key], dtype=torch.float64)
        # relative to the largest value: sums of gradients cancel, so elementwise rtol would be too strict
        tol = 1e-5 if "float32" in key else 1e-2
        err = (a - b).abs().max().item() / b.abs().max().clamp_min(1e-6).item()
        assert err <= tol, f"{key}: {_C.CPU_CAPABILITY} vs DEFAULT differ by {err:.3g} (relative to max)"


# ------------------------------------------------------------------- CUDA kernels (csrc/cuda) vs the CPU ones

_needs_cuda_kernels = pytest.mark.skipif(not (torch.cuda.is_available() and _C.WITH_CUDA),
                                         reason="needs a CUDA device and urkle_fast._C built with nvcc")
_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
        torch.float16: dict(rtol=2e-3, atol=2e-3)}


@pytest.mark.gpu
@_needs_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,D,offset", [(37, 129, 0), (64, 512, 0), (64, 512, 1), (5, 8, 0)])
def test_cuda_kl_matches_cpu(dtype, B, D, offset):
    """16-byte packed path (D % 8 == 0, aligned) and the scalar one (odd D, or rows that start 1 element in)."""
    torch.manual_seed(4)
    ins = [torch.randn(B, D + offset)[:, offset:].to(dtype) for _ in range(4)]
    dev = [t.cuda() for t in ins]
    for red in (0, 1, 2):
        want = ops.gaussian_kl_fwd_native(*ins, red)
        got = ops.gaussian_kl_fwd_native(*dev, red)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-3 * max(1.0, want.abs().max().item()))
        g = torch.randn(B) if red == 0 else torch.tensor(0.7)
        for a, b in zip(ops.gaussian_kl_bwd_native(g.cuda(), *dev, red), ops.gaussian_kl_bwd_native(g, *ins, red)):
            assert a.dtype == dtype and a.is_contiguous()
            torch.testing.assert_close(a.cpu().float(), b.float(), **_TOL[dtype])


@pytest.mark.gpu
@_needs_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(37, 3, 5, 7), (4, 3, 32, 32)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("fn,alpha,eps", [("pgd_step_linf_native_", 0.01, 0.03), ("pgd_step_l2_native_", 0.5, 1.0)])
def test_cuda_pgd_matches_cpu(dtype, shape, layout, fn, alpha, eps):
    torch.manual_seed(5)
    x0 = torch.rand(shape)
    x = (x0 + 0.05 * torch.randn(shape)).clamp(0, 1).to(dtype)
    x0 = x0.to(dtype)
    g = torch.randn(shape)
    g.view(-1)[::7] = 0
    g = g.to(dtype)
    want = x.clone()
    getattr(ops, fn)(want, g, x0, alpha, eps, 0.0, 1.0)
    if layout == "channels_last":
        xd = x.cuda().contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        xd = torch.zeros(shape[:-1] + (2 * shape[-1],), dtype=dtype, device="cuda")[..., ::2]
        xd.copy_(x)
    else:
        xd = x.cuda()
    getattr(ops, fn)(xd, g.cuda(), x0.cuda(), alpha, eps, 0.0, 1.0)
    atol = 1e-6 if dtype == torch.float32 else (8e-3 if dtype == torch.bfloat16 else 1e-3)
    torch.testing.assert_close(xd.cpu(), want, rtol=0, atol=atol)
