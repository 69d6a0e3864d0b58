"""pgd_step_ / pgd_random_start: the reference against an independent float64 formula, every backend
against the reference on odd shapes, dtypes and layouts, and bad input."""

import numpy as np
import pytest
import torch

from urkle_fast import pgd_random_start, pgd_step_, pgd_step_reference_

OP = "pgd"
SHAPES = [(37, 3, 5, 7), (1, 1), (4, 3, 32, 32), (129,)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _state(shape, dtype=torch.float32, device="cpu", seed=0, zero_frac=0.1):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=g, dtype=torch.float64)
    x = (x0 + 0.05 * (2 * torch.rand(shape, generator=g, dtype=torch.float64) - 1)).clamp(0, 1)
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    grad[torch.rand(shape, generator=g) < zero_frac] = 0.0  # sign(0) = 0 must hold
    return [t.to(device=device, dtype=dtype) for t in (x, grad, x0)]


def _numpy_linf(x, g, x0, alpha, eps, lo, hi):
    x, g, x0 = (np.asarray(t, dtype=np.float64) for t in (x, g, x0))
    return np.clip(np.clip(x + alpha * np.sign(g), x0 - eps, x0 + eps), lo, hi)


def _numpy_l2(x, g, x0, alpha, eps, lo, hi):
    x, g, x0 = (np.asarray(t, dtype=np.float64) for t in (x, g, x0))
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        step = x[i] + alpha * g[i] / max(np.linalg.norm(g[i]), 1e-12)
        d = step - x0[i]
        n = np.linalg.norm(d)
        if n > eps:
            d = d * eps / n
        out[i] = np.clip(x0[i] + d, lo, hi)
    return out


@pytest.mark.parametrize("norm,formula", [("linf", _numpy_linf), ("l2", _numpy_l2)])
def test_reference_matches_numpy(norm, formula):
    x, g, x0 = _state((9, 3, 4, 4), torch.float64)
    expected = formula(x, g, x0, 0.02, 0.03, 0.0, 1.0)
    out = pgd_step_reference_(x.clone(), g, x0, alpha=0.02, eps=0.03, norm=norm)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)


def _ulp(dtype):
    return {torch.float32: 0.0, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_backend_matches_reference(backend, shape, dtype, norm):
    if norm == "l2" and len(shape) == 1:
        shape = (shape[0], 1)
    x, g, x0 = _state(shape, dtype, backend.device)
    alpha, eps = 0.01, 0.03
    out = x.clone()
    assert pgd_step_(out, g, x0, alpha=alpha, eps=eps, norm=norm) is out
    ref = pgd_step_reference_(x.clone(), g, x0, alpha=alpha, eps=eps, norm=norm)
    assert out.dtype == dtype and out.shape == x.shape
    # one rounding of a float32 result to the storage dtype: at most one ulp apart
    atol = 1e-6 if norm == "linf" else 2e-6
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=atol + 2 * _ulp(dtype))
    # invariants: in the ball and in the box
    ulp = _ulp(dtype) + 1e-6
    if norm == "linf":
        assert ((out.float() - x0.float()).abs() <= eps + ulp).all()
    assert ((out >= 0) & (out <= 1)).all()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_channels_last_and_strided(backend, norm):
    x, g, x0 = _state((6, 3, 9, 11), torch.float32, backend.device)
    ref = pgd_step_reference_(x.clone(), g, x0, alpha=0.01, eps=0.02, norm=norm)
    cl = x.clone().contiguous(memory_format=torch.channels_last)
    pgd_step_(cl, g.contiguous(memory_format=torch.channels_last), x0, alpha=0.01, eps=0.02, norm=norm)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl, ref, rtol=0, atol=2e-6)
    # a strided view: only every other column is updated, the rest untouched
    big = torch.stack([x, x], dim=-1).clone()
    view = big[..., 0]
    assert not view.is_contiguous()
    pgd_step_(view, g, x0, alpha=0.01, eps=0.02, norm=norm)
    torch.testing.assert_close(big[..., 0], ref, rtol=0, atol=2e-6)
    assert torch.equal(big[..., 1], x)


def test_sign_of_zero_gradient_is_zero(backend):
    x, _, x0 = _state((5, 7), torch.float32, backend.device)
    out = x.clone()
    pgd_step_(out, torch.zeros_like(x), x0, alpha=0.5, eps=1.0)
    assert torch.equal(out, x.clamp(0, 1))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_start(backend, norm):
    x = torch.rand(8, 3, 5, 5, generator=torch.Generator().manual_seed(0)).to(backend.device)
    a = pgd_random_start(x, 0.1, norm=norm, seed=123)
    b = pgd_random_start(x, 0.1, norm=norm, seed=123)
    c = pgd_random_start(x, 0.1, norm=norm, seed=124)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert ((a >= 0) & (a <= 1)).all()
    delta = (a - x).flatten(1)
    if norm == "linf":
        assert delta.abs().max() <= 0.1 + 1e-6
        # uniform in the ball: interior points far from x, not just a sign pattern
        assert delta.abs().mean() > 0.02
    else:
        assert (delta.norm(dim=1) <= 0.1 + 1e-6).all()
    torch.manual_seed(5)
    d = pgd_random_start(x, 0.1, norm=norm)
    torch.manual_seed(5)
    assert torch.equal(d, pgd_random_start(x, 0.1, norm=norm))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(alpha=-0.1, eps=0.1), ValueError, r"alpha must be >= 0.0, got -0.1"),
        (dict(alpha=0.1, eps=-1), ValueError, r"eps must be >= 0.0, got -1.0"),
        (dict(alpha=0.1, eps=float("nan")), ValueError, r"eps must be finite, got nan"),
        (dict(alpha=0.1, eps=0.1, lo=1.0, hi=0.0), ValueError, r"lo must be <= hi, got lo=1.0, hi=0.0"),
        (dict(alpha=0.1, eps=0.1, norm="l1"), ValueError, r"norm must be one of \('linf', 'l2'\), got 'l1'"),
        (dict(alpha="0.1", eps=0.1), TypeError, r"alpha must be a real number, got str"),
    ],
)
def test_bad_scalars(kwargs, exc, match):
    x, g, x0 = _state((2, 3))
    with pytest.raises(exc, match=match):
        pgd_step_(x, g, x0, **kwargs)


def test_bad_tensors():
    x, g, x0 = _state((2, 3))
    with pytest.raises(ValueError, match=r"grad must have the shape of x_adv \(2, 3\), got \(3, 2\)"):
        pgd_step_(x, g.t(), x0, alpha=0.1, eps=0.1)
    with pytest.raises(TypeError, match=r"x_orig must have the dtype of x_adv \(float32\), got float16"):
        pgd_step_(x, g, x0.half(), alpha=0.1, eps=0.1)
    g_inf = g.clone()
    g_inf[0, 1] = float("inf")
    with pytest.raises(ValueError, match=r"grad must be finite, got 1 non-finite value\(s\) \(NaN or inf\) of 6"):
        pgd_step_(x, g_inf, x0, alpha=0.1, eps=0.1)
    with pytest.raises(ValueError, match="x_adv must not require grad"):
        pgd_step_(x.clone().requires_grad_(), g, x0, alpha=0.1, eps=0.1)
    with pytest.raises(ValueError, match=r"x_adv must not be empty, got shape \(0, 3\)"):
        pgd_step_(x[:0], g[:0], x0[:0], alpha=0.1, eps=0.1)
    with pytest.raises(ValueError, match=r"x_adv must be at least 2-D \[samples, ...\] for norm='l2', got shape \(6,\)"):
        pgd_step_(x.flatten(), g.flatten(), x0.flatten(), alpha=0.1, eps=0.1, norm="l2")
    with pytest.raises(TypeError, match="x_adv must have dtype in .*got int64"):
        pgd_step_(x.long(), g.long(), x0.long(), alpha=1, eps=1)
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\) or None, got -1"):
        pgd_random_start(x, 0.1, seed=-1)
    with pytest.raises(ValueError, match=r"eps must be >= 0.0, got -0.5"):
        pgd_random_start(x, -0.5)
