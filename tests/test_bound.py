"""Proposition 1 (urkle_fast.evaluation.bound) on a model where both sides are known exactly, and its
per-example inequality on a trained digits model (issue 10, item 4).

The exact model: a linear Gaussian encoder z = a.x + b + sigma * eps (d_z = 1) and a 2-class linear head. Then
max_{x'} KL[p(z|x) || p(z|x')] over the l_inf ball is (eps ||a||_1)^2 / (2 sigma^2) for x inside [eps, 1 - eps],
and every expectation over z is a 1-D Gaussian integral (Gauss-Hermite quadrature, exact to ~1e-12 here)."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from urkle_fast.evaluation.bound import proposition1
from urkle_fast.evaluation.probe import bounded_log_probs

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SIGMA, M, EPS = 0.5, 4.0, 0.05


class LinearGaussian(nn.Module):
    kind = "representation"
    d_z = 1
    deterministic = False

    def __init__(self, a: torch.Tensor, b: float):
        super().__init__()
        self.a = nn.Parameter(a.clone())
        self.b = b

    def encode(self, x):
        mu = x.flatten(1) @ self.a[:, None] + self.b
        return mu, torch.full_like(mu, 2 * math.log(SIGMA))


def _gauss_expect(f, mu: np.ndarray, n: int = 80) -> np.ndarray:
    """E_{z ~ N(mu, SIGMA^2)} f(z) per entry of mu."""
    t, w = np.polynomial.hermite_e.hermegauss(n)
    z = mu[:, None] + SIGMA * t[None, :]
    return (f(z) * w[None, :]).sum(1) / math.sqrt(2 * math.pi)


def _bounded_p(z: np.ndarray, head: nn.Linear, y: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        zt = torch.as_tensor(z, dtype=torch.float64).reshape(-1, 1)
        log_p = bounded_log_probs(torch.log_softmax(head.double()(zt), -1), M).reshape(*z.shape, 2)
    return log_p.exp().numpy()[np.arange(len(y))[:, None], np.arange(z.shape[1])[None, :], y[:, None]]


def test_proposition1_matches_the_exact_values_of_a_linear_gaussian_encoder():
    torch.manual_seed(0)
    D = 16
    a = torch.randn(D) * 0.3
    model = LinearGaussian(a, 0.0).eval()
    head = nn.Linear(1, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[-2.0], [2.0]]))
        head.bias.zero_()
    x = EPS + (1 - 2 * EPS) * torch.rand(200, 1, 4, 4)  # inside [eps, 1 - eps]: the box never clips the ball
    with torch.no_grad():
        mu = model.encode(x)[0].squeeze(1).double().numpy()
    y = (mu > 0).astype(np.int64)
    y[:40] = 1 - y[:40]  # some misclassified images too
    yt = torch.as_tensor(y)

    r = proposition1(model, head, x, yt, M=M, eps=EPS, samples=4000, kl_steps=40, kl_restarts=1, attack_steps=40)
    shift = EPS * a.abs().sum().item()
    exact_term2 = shift ** 2 / (2 * SIGMA ** 2)
    exact_term1 = np.mean(_gauss_expect(lambda z: -np.log(_bounded_p(z, head, y)), mu))
    # the worst x' moves mu to an end of [mu - shift, mu + shift] (the head is monotone in z)
    exact_lhs = np.mean(np.maximum(*[-np.log(_gauss_expect(lambda z: _bounded_p(z, head, y), mu + s))
                                     for s in (-shift, shift)]))
    exact_rhs = exact_term1 + M / math.sqrt(2) * math.sqrt(exact_term2)
    assert abs(r["term2"] - exact_term2) <= 1e-4 * exact_term2  # the KL attack reaches the corner of the ball
    assert abs(r["term1"] - exact_term1) <= 0.02  # 4000 samples per image, 200 images
    assert abs(r["lhs"] - exact_lhs) <= 0.02
    assert abs(r["rhs"] - exact_rhs) <= 0.02
    assert exact_lhs <= exact_rhs and r["holds"] and r["violations"] == 0
    assert r["vacuous"] == (r["rhs"] >= M) and r["n"] == 200


def test_proposition1_refuses_what_it_cannot_measure():
    model = LinearGaussian(torch.ones(4), 0.0)
    head = nn.Linear(1, 2)
    x, y = torch.rand(3, 1, 2, 2), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="samples"):
        proposition1(model, head, x, y, M=M, eps=EPS, samples=8)
    model.deterministic = True
    with pytest.raises(ValueError, match="Gaussian encoder"):
        proposition1(model, head, x, y, M=M, eps=EPS)


def test_per_example_inequality_holds_on_a_trained_digits_model(tmp_path):
    """A SimCLR+Urkle encoder trained briefly on digits, evaluated with --bound: 0 violations of the
    per-example inequality over every adversary, the aggregate LHS <= RHS, and the table says so."""
    from urkle_fast.demo import DEMO
    from urkle_fast.eval import EvalConfig, evaluate_checkpoints
    from urkle_fast.train import TrainConfig, train

    ck = train(TrainConfig(method="simclr_urkle", out_dir=str(tmp_path / "run"), progress=False,
                           **{**DEMO, "epochs": 6, "warmup_epochs": 1, "beta_warmup_epochs": 1}))["checkpoint"]
    res = evaluate_checkpoints({"urkle": ck}, EvalConfig(
        dataset="digits", eps=[0.1], n_test=100, attack_steps=5, apgd_steps=0, square_queries=0, eot_iter=1,
        head_epochs=30, bound=5.0, bound_samples=32, head_loss="bounded", plots=False, verbose=False,
        out=str(tmp_path / "ev")))
    b = res["models"]["urkle"]["budgets"]["all"]["bound"]["0.1"]
    assert b["violations"] == 0 and b["checked_pairs"] == 600  # 100 images x (clean, 3 KL restarts, PGD, APGD)
    assert b["lhs"] <= b["rhs"] and 0 < b["term1"] and b["term2"] > 0
    assert "Proposition 1" in (tmp_path / "ev" / "table.md").read_text()
