"""PGD on any objective, and the objectives training and evaluation maximise.

``pgd(objective, x, eps=..., alpha=..., steps=..., model=model)`` maximises ``objective(x_adv)``
(a scalar or a per-sample [B] loss; per-sample losses are summed, which leaves each sample's
gradient its own) over the l_inf (default) or l2 ball of radius eps around x, inside [lo, hi].
During the attack the model is in eval mode and its parameters do not require grad, so only the
input gradient is computed (torch.autograd.grad w.r.t. x_adv); both are restored afterwards.

Objective builders compute everything that depends on the clean input once, detached:
``urkle_kl`` (KL[p(z|x) || p(z|x_adv)], docs/MATH.md sec 5), ``rocl_nt_xent``, ``cross_entropy``,
``trades_kl``, ``ae_recon``. With a stochastic objective (it samples z), ``eot=n`` averages the
input gradient over n evaluations (expectation over transformation).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from urkle_fast.ops import gaussian_kl, nt_xent, pgd_random_start, pgd_step_

Objective = Callable[[torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def frozen(*models: Optional[nn.Module]) -> Iterator[None]:
    """Eval mode and requires_grad=False on every parameter inside the block; restored on exit."""
    models = [m for m in models if m is not None]
    modes = [m.training for m in models]
    flags = [[p.requires_grad for p in m.parameters()] for m in models]
    try:
        for m in models:
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
        yield
    finally:
        for m, mode, fl in zip(models, modes, flags):
            m.train(mode)
            for p, f in zip(m.parameters(), fl):
                p.requires_grad_(f)


def _input_grad(objective: Objective, x_adv: torch.Tensor, eot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradient, objective value) averaged over eot draws; the value stays a device tensor, so a PGD
    loop on a GPU never waits for the host."""
    grad = torch.zeros_like(x_adv)
    total = x_adv.new_zeros((), dtype=torch.float32)
    for _ in range(eot):
        x_req = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = objective(x_req).float().sum()
            (g,) = torch.autograd.grad(loss, x_req)
        grad += g
        total = total + loss.detach()
    if eot > 1:
        grad /= eot
    return grad, total / eot


def pgd(objective: Objective, x: torch.Tensor, *, eps: float, alpha: float, steps: int, norm: str = "linf",
        random_start: bool = True, model: Union[nn.Module, Iterable[nn.Module], None] = None, eot: int = 1,
        lo: float = 0.0, hi: float = 1.0, seed: Optional[int] = None, return_history: bool = False):
    """Projected gradient ascent on ``objective`` from x ([B, ...] in [lo, hi]).

    Returns x_adv (detached, same shape/dtype as x), or (x_adv, history) with return_history=True,
    where history[k] is the objective (summed over the batch, averaged over EOT draws) at the k-th
    iterate, k = 0 (the random start) .. steps (one extra forward pass for the last one).
    """
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    if steps < 0 or eot < 1:
        raise ValueError(f"steps must be >= 0 and eot >= 1, got steps={steps}, eot={eot}")
    models = [model] if isinstance(model, nn.Module) else list(model or [])
    x = x.detach()
    history: list[float] = []
    with frozen(*models):
        if random_start and eps > 0:
            x_adv = pgd_random_start(x, eps, lo=lo, hi=hi, norm=norm, seed=seed)
        else:
            x_adv = x.clone()
        x_adv = x_adv.detach()
        for _ in range(steps):
            grad, value = _input_grad(objective, x_adv, eot)
            if return_history:
                history.append(float(value))
            pgd_step_(x_adv, grad, x, alpha=alpha, eps=eps, lo=lo, hi=hi, norm=norm)
        if return_history:
            with torch.no_grad():
                history.append(sum(float(objective(x_adv).float().sum()) for _ in range(eot)) / eot)
    return (x_adv, history) if return_history else x_adv


# ----------------------------------------------------------------------------------------------
# objectives


def urkle_kl(model: nn.Module, x: torch.Tensor) -> Objective:
    """x_adv -> KL[p(z|x) || p(z|x_adv)] per sample [B]; p(z|x) computed once here, detached."""
    with torch.no_grad(), frozen(model):
        mu0, logvar0 = model.encode(x)
    mu0, logvar0 = mu0.detach(), logvar0.detach()

    def objective(x_adv: torch.Tensor) -> torch.Tensor:
        mu, logvar = model.encode(x_adv)
        return gaussian_kl(mu0, logvar0, mu, logvar, reduction="none")

    return objective


def rocl_nt_xent(model: nn.Module, x_other: torch.Tensor, temperature: float = 0.5,
                 detach_columns: bool = False) -> Objective:
    """RoCL: x_adv -> NT-Xent of (x_adv's projection, the other view's projection), scalar.

    The other view's projected z is sampled once and held fixed; a Gaussian encoder's adversary z is
    sampled (reparameterisation) at each call, so use eot > 1 to average over it. ``detach_columns``:
    the official code's similarity P (P.detach())^T (the gradient reaches x_adv through its rows only)."""
    from urkle_fast.ops.nt_xent import nt_xent_column_detached

    loss_fn = nt_xent_column_detached if detach_columns else nt_xent

    with torch.no_grad(), frozen(model):
        mu, logvar = model.encode(x_other)
        p_other = model.project(model.sample(mu, logvar)).detach()

    def objective(x_adv: torch.Tensor) -> torch.Tensor:
        mu, logvar = model.encode(x_adv)
        p_adv = model.project(model.sample(mu, logvar))
        return loss_fn(torch.stack([p_adv, p_other.to(p_adv.dtype)]), views=2, temperature=temperature)

    return objective


def cross_entropy(model: nn.Module, y: torch.Tensor) -> Objective:
    """x_adv -> cross-entropy of model.logits(x_adv) against y, per sample [B] (AT, evaluation)."""

    def objective(x_adv: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model.logits(x_adv).float(), y, reduction="none")

    return objective


def trades_kl(model: nn.Module, x: torch.Tensor) -> Objective:
    """TRADES: x_adv -> KL(p(y|x) || p(y|x_adv)) on class probabilities, per sample [B]."""
    with torch.no_grad(), frozen(model):
        logp0 = F.log_softmax(model.logits(x).float(), dim=1).detach()

    def objective(x_adv: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(model.logits(x_adv).float(), dim=1)
        return (logp0.exp() * (logp0 - logp)).sum(1)

    return objective


def ae_recon(model: nn.Module, x: torch.Tensor) -> Objective:
    """AE+TRADES: x_adv -> ||h(g(x_adv)) - h(g(x))||^2 per sample [B] (g encoder mean, h decoder)."""
    with torch.no_grad(), frozen(model):
        r0 = model.decode(model.encode(x)[0]).detach()

    def objective(x_adv: torch.Tensor) -> torch.Tensor:
        r = model.decode(model.encode(x_adv)[0])
        return (r.float() - r0.float()).pow(2).flatten(1).sum(1)

    return objective
