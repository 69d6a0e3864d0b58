"""PGD (urkle_fast.attack): each objective rises, the iterates stay in the ball and in [0, 1], the
model's mode and parameters are untouched, the clean posterior is computed once per batch."""

import pytest
import torch

from urkle_fast.attack import ae_recon, cross_entropy, pgd, rocl_nt_xent, trades_kl, urkle_kl
from urkle_fast.data import as_tensors, load_dataset
from urkle_fast.models import build_model
from urkle_fast.train import TrainConfig, resolve_config


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: intra-op threads only add contention on a shared machine
    yield
    torch.set_num_threads(n)


def _model(method):
    torch.manual_seed(0)
    c = resolve_config(TrainConfig(method=method))
    c.num_classes = 10
    return build_model(vars(c))


@pytest.fixture(scope="module")
def digits():
    x, y = as_tensors(load_dataset("digits", split="test"), limit=64)
    return x, y


def test_urkle_kl_rises_at_every_step_and_stays_in_the_ball(digits):
    x, _ = digits
    model = _model("simclr_urkle").train()
    eps, steps = 0.1, 10
    x_adv, hist = pgd(urkle_kl(model, x), x, eps=eps, alpha=eps / 8, steps=steps, model=model, seed=0,
                      return_history=True)
    assert len(hist) == steps + 1
    diffs = torch.diff(torch.tensor(hist))
    assert torch.all(diffs > 0), f"KL did not rise at every step: {hist}"
    assert hist[-1] > 2 * hist[0]
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert model.training  # mode restored


def test_l2_ball(digits):
    x, _ = digits
    model = _model("simclr_urkle")
    eps = 0.5
    x_adv, hist = pgd(urkle_kl(model, x), x, eps=eps, alpha=0.1, steps=8, norm="l2", model=model, seed=0,
                      return_history=True)
    assert (x_adv - x).flatten(1).norm(dim=1).max() <= eps + 1e-5
    assert x_adv.min() >= 0 and x_adv.max() <= 1 and hist[-1] > hist[0]


def test_clean_posterior_computed_once_and_no_weight_grads(digits):
    x, _ = digits
    model = _model("simclr_urkle").train()
    calls = []
    enc = model.encode
    model.encode = lambda t: (calls.append(t.shape[0]), enc(t))[1]
    flags = [p.requires_grad for p in model.parameters()]
    pgd(urkle_kl(model, x), x, eps=0.1, alpha=0.02, steps=5, model=model)
    assert len(calls) == 1 + 5  # clean once, then one forward per step
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.training


def test_model_is_in_eval_mode_during_the_attack(digits):
    x, _ = digits
    model = _model("simclr_urkle").train()
    modes = []

    def objective(x_adv):
        modes.append(model.training)
        return model.encode(x_adv)[0].sum()

    pgd(objective, x, eps=0.1, alpha=0.02, steps=3, model=model)
    assert modes == [False] * 3 and model.training


@pytest.mark.parametrize("method", ["rocl", "ae_trades", "at", "trades"])
def test_other_objectives_rise(method, digits):
    x, y = digits
    model = _model(method).eval()
    if method == "rocl":
        torch.manual_seed(1)
        obj = rocl_nt_xent(model, x.flip(-1))
        eot = 4
    elif method == "ae_trades":
        obj, eot = ae_recon(model, x), 1
    elif method == "at":
        obj, eot = cross_entropy(model, y), 1
    else:
        obj, eot = trades_kl(model, x), 1
    torch.manual_seed(0)
    x_adv, hist = pgd(obj, x, eps=0.2, alpha=0.05, steps=6, model=model, eot=eot, seed=0, return_history=True)
    assert hist[-1] > hist[0], hist
    assert (x_adv - x).abs().max() <= 0.2 + 1e-6


def test_eot_averages_over_draws(digits):
    x, _ = digits
    n = []

    def objective(x_adv):
        n.append(1)
        return (x_adv ** 2).sum()

    pgd(objective, x, eps=0.1, alpha=0.02, steps=3, eot=4)
    assert len(n) == 12


def test_bad_arguments(digits):
    x, _ = digits
    with pytest.raises(ValueError, match="norm"):
        pgd(lambda t: t.sum(), x, eps=0.1, alpha=0.01, steps=1, norm="l1")
