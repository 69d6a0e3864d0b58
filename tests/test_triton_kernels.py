"""The Triton kernels (kernels/, installed as urkle_fast._kernels) against the pure-torch references.

On the CPU they run under Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py before any
@triton.jit module is imported); the launchers pick one autotune config and big blocks there, and
cast tl.dot operands to float32 (bf16 tl.dot is wrong under the interpreter). Shapes are small and odd
so that every tail mask is exercised. The interpreter rounds float32 -> bfloat16 stores by truncation
(not to nearest even as a GPU does): bf16 outputs may differ from the reference by one ulp.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")  # ships with every CUDA build of torch, and with the dev install

from conftest import TOLERANCES  # noqa: E402
from urkle_fast._kernels import gaussian_kl as kl_k  # noqa: E402
from urkle_fast._kernels import nt_xent as nt_k  # noqa: E402
from urkle_fast._kernels import pgd as pgd_k  # noqa: E402
from urkle_fast.ops.gaussian_kl import gaussian_kl_reference  # noqa: E402
from urkle_fast.ops.nt_xent import nt_xent_rows_backward_reference, nt_xent_rows_reference  # noqa: E402
from urkle_fast.ops.pgd import pgd_step_reference_  # noqa: E402

pytestmark = pytest.mark.triton

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():  # pragma: no cover
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1 set before import", allow_module_level=True)

DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REDUCTIONS = {0: "none", 1: "sum", 2: "mean"}


def _close(actual, expected, dtype, scale=None):
    """assert_close with the dtype's tolerance, atol relative to the size of expected (or scale)."""
    tol = TOLERANCES[dtype]
    ref = expected.double()
    mag = float(ref.abs().max()) if scale is None else scale
    torch.testing.assert_close(actual.double(), ref, rtol=tol["rtol"], atol=tol["atol"] * max(mag, 1.0))


def _ulp(dtype):
    return {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[dtype]


# --------------------------------------------------------------------------------------------------
# Gaussian KL


def _kl_inputs(B, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu_p = torch.randn(B, D, generator=g, dtype=torch.float64)
    lv_p = 0.5 * torch.randn(B, D, generator=g, dtype=torch.float64)
    mu_q = mu_p + 0.3 * torch.randn(B, D, generator=g, dtype=torch.float64)
    lv_q = 0.5 * torch.randn(B, D, generator=g, dtype=torch.float64)
    return [t.to(device=DEVICE, dtype=dtype) for t in (mu_p, lv_p, mu_q, lv_q)]


def _kl_grads_reference(grad, ts, reduction):
    # float64 autograd of the reference on the same (rounded) inputs, upstream gradient `grad`
    xs = [t.double().requires_grad_(True) for t in ts]
    out = gaussian_kl_reference(*xs, REDUCTIONS[reduction])
    return torch.autograd.grad(out, xs, grad.double())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("B,D", [(37, 129), (3, 300), (1, 1)])
def test_gaussian_kl_fwd_bwd(B, D, dtype, reduction):
    ts = _kl_inputs(B, D, dtype)
    out = kl_k.gaussian_kl_fwd(*ts, reduction)
    expected = gaussian_kl_reference(*[t.double() for t in ts], REDUCTIONS[reduction])
    assert out.dtype == torch.float32 and out.shape == expected.shape
    _close(out, expected, torch.float32)

    g = torch.Generator().manual_seed(1)
    grad = (torch.rand(B, generator=g) + 0.5) if reduction == 0 else torch.tensor(0.7)
    grad = grad.to(DEVICE)
    grads = kl_k.gaussian_kl_bwd(grad, *ts, reduction)
    for got, t, exp in zip(grads, ts, _kl_grads_reference(grad, ts, reduction)):
        assert got.dtype == t.dtype and got.shape == t.shape and got.is_contiguous()
        _close(got, exp, dtype)


def test_gaussian_kl_strided_rows_and_expanded_grad():
    B, D = 37, 129
    base = _kl_inputs(B, 2 * D + 5, torch.float32)
    ts = [base[0][:, :D], base[1][:, D + 3:2 * D + 3], base[2].t().contiguous().t()[:, 5:D + 5], base[3][:, 1:D + 1]]
    assert not ts[0].is_contiguous() and ts[2].stride(1) != 1
    out = kl_k.gaussian_kl_fwd(*ts, 0)
    _close(out, gaussian_kl_reference(*[t.double() for t in ts], "none"), torch.float32)
    grad = torch.tensor(0.3, device=DEVICE).expand(B)  # stride 0, as autograd hands it for kl.sum()
    for got, exp in zip(kl_k.gaussian_kl_bwd(grad, *ts, 0), _kl_grads_reference(grad, ts, 0)):
        _close(got, exp, torch.float32)


# --------------------------------------------------------------------------------------------------
# PGD


def _pgd_inputs(shape, dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=g)
    xa = (x0 + 0.05 * torch.randn(shape, generator=g)).clamp(0, 1)
    gr = torch.randn(shape, generator=g)
    gr[..., 0] = 0.0  # sign(0) = 0
    ts = [t.to(device=DEVICE, dtype=dtype) for t in (xa, gr, x0)]
    if layout == "channels_last":
        ts = [t.contiguous(memory_format=torch.channels_last) for t in ts]
    elif layout == "mixed":  # x_adv channels_last, grad contiguous: grad is copied into x_adv's layout
        ts = [ts[0].contiguous(memory_format=torch.channels_last), ts[1], ts[2].contiguous(memory_format=torch.channels_last)]
    elif layout == "strided":  # x_adv a non-dense view: copy, update, write back
        ts = [torch.cat([t, t + 7.0], dim=-1)[..., : shape[-1]] for t in ts]
        assert not ts[0].is_contiguous() and ts[0]._base is not None
    return ts


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "mixed", "strided"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_pgd_step(norm, layout, dtype):
    shape = (3, 5, 7, 9)
    xa, gr, x0 = _pgd_inputs(shape, dtype, layout)
    alpha, eps = (0.01, 0.03) if norm == "linf" else (0.5, 0.6)
    expected = xa.clone()
    pgd_step_reference_(expected, gr, x0, alpha=alpha, eps=eps, lo=0.0, hi=1.0, norm=norm)
    strides, ptr = xa.stride(), xa.data_ptr()
    fn = pgd_k.pgd_step_linf_ if norm == "linf" else pgd_k.pgd_step_l2_
    assert fn(xa, gr, x0, alpha, eps, 0.0, 1.0) is None
    assert xa.stride() == strides and xa.data_ptr() == ptr  # in place, layout kept
    torch.testing.assert_close(xa.float(), expected.float(), rtol=0, atol=2e-6 + 2 * _ulp(dtype))
    if layout == "strided":  # the other half of the base tensor is untouched
        assert (xa._base[..., shape[-1]:].float() >= 6.0).all()


def test_pgd_l2_projection_active():
    # a long step leaves the ball: the projection and the box both bind, over several steps
    x0 = torch.rand(4, 3, 11, 13, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    xa = x0.clone()
    for k in range(3):
        g = torch.randn(x0.shape, generator=torch.Generator().manual_seed(10 + k)).to(DEVICE)
        expected = xa.clone()
        pgd_step_reference_(expected, g, x0, alpha=0.5, eps=0.6, lo=0.0, hi=1.0, norm="l2")
        pgd_k.pgd_step_l2_(xa, g, x0, 0.5, 0.6, 0.0, 1.0)
        torch.testing.assert_close(xa, expected, rtol=0, atol=2e-6)
    assert ((xa - x0).flatten(1).norm(dim=1) <= 0.6 + 1e-5).all()


def test_pgd_l2_many_chunks(monkeypatch):
    # several partial sums per sample (the 2-D grid of the l2 kernels)
    monkeypatch.setattr(pgd_k, "L2_BLOCK", 64)
    monkeypatch.setattr(pgd_k, "L2_MIN_PROGRAMS", 16)
    xa, gr, x0 = _pgd_inputs((2, 3, 17, 19), torch.float32, "contiguous")
    expected = xa.clone()
    pgd_step_reference_(expected, gr, x0, alpha=0.3, eps=0.4, norm="l2")
    pgd_k.pgd_step_l2_(xa, gr, x0, 0.3, 0.4, 0.0, 1.0)
    torch.testing.assert_close(xa, expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pgd_random_start(dtype):
    x = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0)).to(device=DEVICE, dtype=dtype)
    a = pgd_k.pgd_random_start(x, 0.1, 0.0, 1.0, 1234)
    assert a.dtype == dtype and a.shape == x.shape
    # same seed, same result, whatever the layout of x; the output keeps a dense input's layout
    cl = pgd_k.pgd_random_start(x.contiguous(memory_format=torch.channels_last), 0.1, 0.0, 1.0, 1234)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    strided = pgd_k.pgd_random_start(torch.cat([x, x], dim=-1)[..., :7], 0.1, 0.0, 1.0, 1234)
    permuted = pgd_k.pgd_random_start(x.permute(2, 0, 3, 1).contiguous().permute(1, 3, 0, 2), 0.1, 0.0, 1.0, 1234)
    for other in (cl, strided, permuted, pgd_k.pgd_random_start(x, 0.1, 0.0, 1.0, 1234)):
        assert torch.equal(a, other)
    assert not torch.equal(a, pgd_k.pgd_random_start(x, 0.1, 0.0, 1.0, 1235))
    assert ((a >= 0) & (a <= 1)).all()
    ulp = 2 * _ulp(dtype)
    assert ((a.float() - x.float()).abs() <= 0.1 + ulp).all()


def test_pgd_random_start_is_uniform():
    x = torch.zeros(200, 100, device=DEVICE)
    u = pgd_k.pgd_random_start(x, 1.0, -2.0, 2.0, 7)  # U(-1, 1), nothing clipped
    assert -1.0 <= float(u.min()) < -0.99 and 0.99 < float(u.max()) <= 1.0
    assert abs(float(u.mean())) < 0.02 and abs(float(u.std()) - 3 ** -0.5) < 0.01


# --------------------------------------------------------------------------------------------------
# NT-Xent


def _nt_inputs(N, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, d, generator=g, dtype=torch.float64)
    z[N // 2] *= 7.0  # rows of different norms
    return z.to(device=DEVICE, dtype=dtype)


def _check_nt(V, N, d, dtype, denominator, row_offset, n_rows, tau=0.5, seed=0):
    z_cols = _nt_inputs(N, d, dtype, seed)
    z_rows = z_cols if n_rows is None else z_cols[row_offset:row_offset + n_rows]
    n = z_rows.shape[0]
    loss, lse = nt_k.nt_xent_fwd(z_rows, z_cols, V, tau, denominator, row_offset)
    e_loss, e_lse = nt_xent_rows_reference(z_rows.double(), z_cols.double(), V, tau, denominator, row_offset)
    assert loss.dtype == torch.float32 and lse.dtype == torch.float32 and loss.shape == (n,) == lse.shape
    _close(loss, e_loss, torch.float32)
    _close(lse, e_lse, torch.float32)

    grad = (torch.rand(n, generator=torch.Generator().manual_seed(seed + 1)) + 0.5).to(DEVICE)
    dz_rows, dz_cols = nt_k.nt_xent_bwd(grad, z_rows, z_cols, lse, V, tau, denominator, row_offset)
    e_rows, e_cols = nt_xent_rows_backward_reference(grad.double(), z_rows.double(), z_cols.double(), e_lse, V, tau,
                                                     denominator, row_offset)
    assert dz_rows.dtype == dtype and dz_rows.shape == z_rows.shape
    assert dz_cols.dtype == dtype and dz_cols.shape == z_cols.shape
    _close(dz_rows, e_rows, dtype)
    _close(dz_cols, e_cols, dtype)
    # detached columns: the rows kernel alone, the same dz_rows, dz_cols zeros
    rows_only, zero_cols = nt_k.nt_xent_bwd(grad, z_rows, z_cols, lse, V, tau, denominator, row_offset, False)
    assert torch.equal(rows_only, dz_rows) and torch.equal(zero_cols, torch.zeros_like(z_cols))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [2, 4])
@pytest.mark.parametrize("denominator", [0, 1])
@pytest.mark.parametrize("rows", ["all", "slice"])
def test_nt_xent_fwd_bwd(dtype, V, denominator, rows, nan_filled_empty):
    N = 60 if V == 4 else 38  # B = 15 / 19: row blocks wrap around image boundaries, tails in every tile
    if rows == "all":
        _check_nt(V, N, 33, dtype, denominator, 0, None)
    else:  # a rank's slice of the gathered columns, starting mid-image-group
        _check_nt(V, N, 33, dtype, denominator, 13, 23)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("denominator", [0, 1])
def test_nt_xent_chunked_d(monkeypatch, dtype, denominator):
    # d larger than the whole-row tile: logits accumulated over chunks of d, the backward over
    # several output chunks (grid axis 1), positives' dot products chunked too
    monkeypatch.setattr(nt_k, "MAX_SINGLE_D", 16)
    monkeypatch.setattr(nt_k, "D_CHUNK", 16)
    monkeypatch.setattr(nt_k, "MAX_BLOCK_DO", 16)
    assert nt_k._d_blocks(37) == (16, False, 16, False)
    _check_nt(4, 36, 37, dtype, denominator, 5, 20)


@pytest.mark.parametrize("denominator", [0, 1])
def test_nt_xent_mask_free_tiles(denominator):
    # B = 75 > BLOCK_M + BLOCK_N (32 + 32 under the interpreter): most tiles cannot hold a row's own
    # image and take the mask-free path; the others, and a row slice, take the masked one
    assert nt_k._fwd_configs()[0].kwargs["BLOCK_M"] + nt_k._fwd_configs()[0].kwargs["BLOCK_N"] < 75 or DEVICE == "cuda"
    _check_nt(2, 150, 17, torch.float32, denominator, 0, None)
    _check_nt(2, 150, 17, torch.bfloat16, denominator, 40, 70)


@pytest.mark.parametrize("tau", [0.05, 2.0])
def test_nt_xent_temperatures_and_small_batches(tau):
    _check_nt(2, 24, 9, torch.float32, 0, 0, None, tau=tau)
    _check_nt(3, 3, 5, torch.float32, 0, 0, None, tau=tau)  # B = 1: only positives and the diagonal
    _check_nt(2, 41 * 2, 17, torch.float32, 1, 81, 1, tau=tau)  # one row, the last one


def test_nt_xent_float16_small_upstream_gradient():
    # 1 / (N (V-1)) upstream gradients: the float16 tl.dot operand of the columns kernel is rescaled
    z = _nt_inputs(48, 33, torch.float16)
    loss, lse = nt_k.nt_xent_fwd(z, z, 4, 0.5, 0, 0)
    grad = torch.full((48,), 1.0 / (16384 * 3), device=DEVICE)
    dz_rows, dz_cols = nt_k.nt_xent_bwd(grad, z, z, lse, 4, 0.5, 0, 0)
    e_rows, e_cols = nt_xent_rows_backward_reference(grad.double(), z.double(), z.double(), lse.double(), 4, 0.5, 0, 0)
    for got, exp in ((dz_rows, e_rows), (dz_cols, e_cols)):
        # the outputs themselves are float16 subnormals here: compare at their resolution
        torch.testing.assert_close(got.double(), exp, rtol=2e-3, atol=2.0 ** -24 * 2)


# --------------------------------------------------------------------------------------------------
# launch=: torch.library.wrap_triton, and tracing with fake tensors


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's case; on a GPU the next test runs the wrapped kernels")
def test_wrap_triton_is_the_identity_under_the_interpreter():
    # why the next test is GPU-only: here wrap_triton hands the kernel back unchanged, so both of its
    # launches would run the same code (that every launcher routes its kernels through launch= is checked
    # by test_launchers_trace_with_fake_tensors, on the CPU too)
    kernel = kl_k._gaussian_kl_fwd_kernel
    assert torch.library.wrap_triton(kernel) is kernel


@pytest.mark.skipif(DEVICE == "cpu", reason="under TRITON_INTERPRET=1 wrap_triton is the identity (test above)")
def test_launch_wrap_triton_eager():
    # The registered ops pass torch.library.wrap_triton; on a GPU it wraps the kernel for the
    # triton_kernel_wrapper HOP. An eager call must give the same numbers as the default launch.
    W = torch.library.wrap_triton
    ts = _kl_inputs(37, 129, torch.float32)
    assert torch.equal(kl_k.gaussian_kl_fwd(*ts, 2, launch=W), kl_k.gaussian_kl_fwd(*ts, 2))
    grad = torch.tensor(0.5, device=DEVICE)
    for a, b in zip(kl_k.gaussian_kl_bwd(grad, *ts, 2, launch=W), kl_k.gaussian_kl_bwd(grad, *ts, 2)):
        assert torch.equal(a, b)

    xa, gr, x0 = _pgd_inputs((3, 5, 7, 9), torch.float32, "channels_last")
    for fn in (pgd_k.pgd_step_linf_, pgd_k.pgd_step_l2_):
        a, b = xa.clone(), xa.clone()
        fn(a, gr, x0, 0.01, 0.03, 0.0, 1.0, launch=W)
        fn(b, gr, x0, 0.01, 0.03, 0.0, 1.0)
        assert torch.equal(a, b)
    assert torch.equal(pgd_k.pgd_random_start(x0, 0.1, 0.0, 1.0, 3, launch=W),
                       pgd_k.pgd_random_start(x0, 0.1, 0.0, 1.0, 3))

    z = _nt_inputs(24, 33, torch.float32)
    loss, lse = nt_k.nt_xent_fwd(z, z, 2, 0.5, 0, 0, launch=W)
    loss2, lse2 = nt_k.nt_xent_fwd(z, z, 2, 0.5, 0, 0)
    assert torch.equal(loss, loss2) and torch.equal(lse, lse2)
    g = torch.ones(24, device=DEVICE)
    for a, b in zip(nt_k.nt_xent_bwd(g, z, z, lse, 2, 0.5, 0, 0, launch=W), nt_k.nt_xent_bwd(g, z, z, lse, 2, 0.5, 0, 0)):
        assert torch.equal(a, b)


class _RecordingLaunch:
    """A launch= that records each kernel launch instead of running it (for fake tensors)."""

    def __init__(self):
        self.calls = []

    def __call__(self, kernel):
        rec = self

        class _Indexed:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    meta = dict(kwargs)
                    configs = getattr(kernel, "configs", None)
                    if configs:  # autotuned: the grid may read the config's meta-parameters
                        assert len({tuple(sorted(c.kwargs)) for c in configs}) == 1
                        meta.update(configs[0].kwargs)
                    g = grid(meta) if callable(grid) else grid
                    assert all(isinstance(x, int) and x >= 1 for x in g), g
                    for a in args:
                        assert isinstance(a, (torch.Tensor, int, float, bool)), type(a)
                    name = getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel))
                    rec.calls.append((name, tuple(g)))
                return run

        return _Indexed()


def test_launchers_trace_with_fake_tensors():
    # make_fx with fake tensors: the launchers' Python must use only shapes, strides and dtypes
    # (no .item(), no data pointers) and allocate outputs with torch.empty.
    from torch.fx.experimental.proxy_tensor import make_fx

    rec = _RecordingLaunch()

    def kl(a, b, c, d):
        out = kl_k.gaussian_kl_fwd(a, b, c, d, 2, launch=rec)
        return (out, *kl_k.gaussian_kl_bwd(out, a, b, c, d, 2, launch=rec))

    def pgd(xa, gr, x0):
        pgd_k.pgd_step_linf_(xa, gr, x0, 0.01, 0.03, 0.0, 1.0, launch=rec)
        pgd_k.pgd_step_l2_(xa, gr, x0, 0.01, 0.03, 0.0, 1.0, launch=rec)
        return pgd_k.pgd_random_start(x0, 0.1, 0.0, 1.0, 5, launch=rec)

    def nt(zc):
        zr = zc[8:20]
        loss, lse = nt_k.nt_xent_fwd(zr, zc, 4, 0.5, 1, 8, launch=rec)
        return nt_k.nt_xent_bwd(torch.ones_like(loss), zr, zc, lse, 4, 0.5, 1, 8, launch=rec)

    make_fx(kl, tracing_mode="fake")(*_kl_inputs(37, 129, torch.bfloat16))
    make_fx(pgd, tracing_mode="fake")(*_pgd_inputs((3, 5, 7, 9), torch.float16, "strided"))
    make_fx(nt, tracing_mode="fake")(_nt_inputs(40, 33, torch.float16))
    names = [c[0] for c in rec.calls]
    for kernel in ("_gaussian_kl_fwd_kernel", "_gaussian_kl_reduce_kernel", "_gaussian_kl_bwd_kernel",
                   "_pgd_linf_kernel", "_pgd_l2_partials_kernel", "_pgd_l2_apply_kernel", "_pgd_random_start_kernel",
                   "_row_rnorm_kernel", "_nt_xent_fwd_kernel", "_nt_xent_bwd_rows_kernel", "_nt_xent_bwd_cols_kernel"):
        assert kernel in names, (kernel, names)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nt_xent_low_precision_error_at_most_plain_torch(dtype):
    # Near convergence (views of an image almost equal, small tau) the positive terms
    # (V-1) exp(s_ip - lse_i) - 1 nearly cancel. The kernel's error against float64 must stay within
    # about 2x that of plain torch autograd in the same precision (STYLE.md, pattern 7).
    import torch.nn.functional as F

    V, B, d, tau = 4, 15, 33, 0.2
    g = torch.Generator().manual_seed(5)
    base = torch.randn(B, d, generator=g, dtype=torch.float64)
    z = torch.cat([base + 0.05 * torch.randn(B, d, generator=g, dtype=torch.float64) for _ in range(V)])
    z = z.to(device=DEVICE, dtype=dtype)
    N = z.shape[0]
    c = torch.full((N,), 1.0 / (N * (V - 1)), dtype=torch.float64, device=DEVICE)
    zd = z.double()
    _, e_lse = nt_xent_rows_reference(zd, zd, V, tau, 0, 0)
    e_rows, e_cols = nt_xent_rows_backward_reference(c, zd, zd, e_lse, V, tau, 0, 0)
    expected = e_rows + e_cols

    _, lse = nt_k.nt_xent_fwd(z, z, V, tau, 0, 0)
    dz_rows, dz_cols = nt_k.nt_xent_bwd(c.float(), z, z, lse, V, tau, 0, 0)
    err = float((dz_rows.double() + dz_cols.double() - expected).abs().max())

    zt = z.clone().requires_grad_(True)
    u = F.normalize(zt, dim=1)
    eye = torch.eye(N, dtype=torch.bool, device=DEVICE)
    s = (u @ u.T / tau).float().masked_fill(eye, float("-inf"))
    pos = (torch.arange(N)[:, None] % B == torch.arange(N)[None, :] % B).to(DEVICE) & ~eye
    loss = ((V - 1) * torch.logsumexp(s, 1) - s.masked_fill(~pos, 0.0).sum(1)).sum() / (N * (V - 1))
    (plain,) = torch.autograd.grad(loss, zt)
    plain_err = float((plain.double() - expected).abs().max())
    assert err <= 2.0 * plain_err + 1e-9, (err, plain_err)
