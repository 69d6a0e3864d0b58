"""gaussian_kl: the reference against torch.distributions, its float64 gradcheck, and every backend
against the reference on odd shapes, dtypes, reductions, layouts and upstream gradients."""

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from conftest import TOLERANCES
from urkle_fast import GaussianKL, gaussian_kl, gaussian_kl_reference

OP = "gaussian_kl"
SHAPES = [(37, 129), (1, 1), (5, 2048 + 3), (130, 7)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REDUCTIONS = ["none", "sum", "mean"]


def _inputs(B, D, dtype=torch.float32, device="cpu", seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    mu_p = torch.randn(B, D, generator=g, dtype=torch.float64)
    lv_p = 0.5 * torch.randn(B, D, generator=g, dtype=torch.float64)
    mu_q = mu_p + 0.3 * torch.randn(B, D, generator=g, dtype=torch.float64)
    lv_q = 0.5 * torch.randn(B, D, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in (mu_p, lv_p, mu_q, lv_q)]


@pytest.mark.parametrize("B,D", [(37, 129), (1, 1), (4, 3)])
def test_reference_matches_torch_distributions(B, D):
    mu_p, lv_p, mu_q, lv_q = _inputs(B, D, torch.float64)
    p = Normal(mu_p, torch.exp(0.5 * lv_p))
    q = Normal(mu_q, torch.exp(0.5 * lv_q))
    expected = kl_divergence(p, q).sum(-1)
    torch.testing.assert_close(gaussian_kl_reference(mu_p, lv_p, mu_q, lv_q, "none"), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gaussian_kl_reference(mu_p, lv_p, mu_q, lv_q, "sum"), expected.sum())
    torch.testing.assert_close(gaussian_kl_reference(mu_p, lv_p, mu_q, lv_q, "mean"), expected.mean())
    torch.testing.assert_close(gaussian_kl_reference(mu_p, lv_p, mu_q, lv_q, "batchmean"), expected.mean())


def test_kl_of_identical_gaussians_is_zero():
    mu, lv = _inputs(9, 17, torch.float64)[:2]
    assert torch.allclose(gaussian_kl_reference(mu, lv, mu, lv, "none"), torch.zeros(9, dtype=torch.float64))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_gradcheck_float64(reduction):
    args = _inputs(6, 5, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: gaussian_kl_reference(*a, reduction), args)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_registered_op_gradcheck_float64(reduction):
    # float64 goes through the registered op and its hand-written backward formula
    args = _inputs(6, 5, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: gaussian_kl(*a, reduction=reduction), args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,D", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backend_matches_reference(backend, B, D, dtype, reduction):
    tol = TOLERANCES[dtype]
    x = _inputs(B, D, dtype, backend.device, requires_grad=True)
    x_ref = [t.detach().clone().requires_grad_(True) for t in x]
    out = gaussian_kl(*x, reduction=reduction)
    ref = gaussian_kl_reference(*x_ref, reduction)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=max(tol["rtol"], 1e-5), atol=max(tol["atol"], 1e-4) * max(1, D / 64))
    # an upstream gradient other than ones
    up = torch.rand(ref.shape, generator=torch.Generator().manual_seed(1)).to(backend.device) + 0.5
    grads = torch.autograd.grad(out, x, up)
    grads_ref = torch.autograd.grad(ref, x_ref, up)
    for name, g, gr in zip(("mu_p", "logvar_p", "mu_q", "logvar_q"), grads, grads_ref):
        assert g.dtype == dtype, name
        torch.testing.assert_close(g.float(), gr.float(), **tol, msg=lambda m: f"{name}: {m}")


def test_non_contiguous_inputs(backend):
    base = _inputs(40, 2 * 65, torch.float32, backend.device)
    x = [t[::2, ::2] for t in base]  # strided in both dims
    x.append(x.pop(0).t().contiguous().t())  # a transposed layout too
    x = [t.requires_grad_(True) for t in x]
    assert not any(t.is_contiguous() for t in x[:3])
    out = gaussian_kl(*x, reduction="none")
    ref = gaussian_kl_reference(*[t.detach().contiguous() for t in x], "none")
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=1e-4)
    g = torch.autograd.grad(out.sum(), x)
    xr = [t.detach().contiguous().requires_grad_(True) for t in x]
    gr = torch.autograd.grad(gaussian_kl_reference(*xr, "none").sum(), xr)
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


def test_only_some_inputs_require_grad(backend):
    mu_p, lv_p, mu_q, lv_q = _inputs(11, 13, torch.float32, backend.device)
    mu_q.requires_grad_(True)
    lv_q.requires_grad_(True)
    gq = torch.autograd.grad(gaussian_kl(mu_p, lv_p, mu_q, lv_q), (mu_q, lv_q))
    ref = [t.detach().clone().requires_grad_(True) for t in (mu_q, lv_q)]
    gr = torch.autograd.grad(gaussian_kl_reference(mu_p, lv_p, *ref), ref)
    for a, b in zip(gq, gr):
        torch.testing.assert_close(a, b)


def test_module_form_equals_function():
    x = _inputs(7, 9)
    assert torch.equal(GaussianKL("sum")(*x), gaussian_kl(*x, reduction="sum"))
    assert "reduction='sum'" in repr(GaussianKL("sum"))


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda x: [x[0][0]] + x[1:], ValueError, "mu_p must be 2-D, got 1-D"),
        (lambda x: [x[0], x[1][:, :-1]] + x[2:], ValueError, r"logvar_p must have the shape of mu_p \(8, 6\), got \(8, 5\)"),
        (lambda x: x[:2] + [x[2].double(), x[3]], TypeError, "mu_q must have the dtype of mu_p .float32., got float64"),
        (lambda x: [x[0].long()] + x[1:], TypeError, "mu_p must have dtype in .*got int64"),
        (lambda x: [t[:0] for t in x], ValueError, "mu_p must have at least one row"),
        (lambda x: x[:3] + [x[3].masked_fill(x[3] > 0.5, float("nan"))], ValueError, "logvar_q must be finite"),
        (lambda x: x[:3] + [[1.0]], TypeError, "logvar_q must be a torch.Tensor, got list"),
    ],
)
def test_bad_input_names_the_argument(mutate, exc, match):
    x = _inputs(8, 6)
    with pytest.raises(exc, match=match):
        gaussian_kl(*mutate(x))


def test_bad_reduction():
    with pytest.raises(ValueError, match=r"reduction must be one of \('none', 'sum', 'mean', 'batchmean'\), got 'avg'"):
        gaussian_kl(*_inputs(2, 2), reduction="avg")
