"""White-box attacks of the evaluation protocol (docs/PROTOCOL.md sec. 7), l_inf, pixels in [0, 1].

* ``pgd_linf``: random start, K steps of sign-gradient ascent on the cross-entropy of the
  classifier's (averaged) prediction, through the trainer's engine ``urkle_fast.attack.pgd``
  (fused ``pgd_step_``).
* ``apgd_ce``: APGD-CE of Croce & Hein (2020, "Reliable evaluation of adversarial robustness
  with an ensemble of diverse parameter-free attacks"), written here from the paper and the
  reference AutoAttack code: momentum 0.75, step size 2*eps halved at checkpoints when the loss
  oscillates or stalls, restart from the best point. It is the independent check for gradient
  masking (torchattacks pins requests~=2.25, so it is not a dependency).

* ``square_linf``: the Square Attack of Andriushchenko et al. (2020, "Square Attack: a query-efficient
  black-box adversarial attack via random search"), AutoAttack's gradient-free member, written from the
  paper: vertical-stripe start, then random eps-squares whose side shrinks on AutoAttack's schedule,
  a square kept only when it lowers the margin. It needs no gradient at all, so a model that masks
  gradients (stochastic z included) cannot hide from it behind them.

All take a classifier returning log-probabilities [B, C] (``ProbabilisticClassifier``); for a
stochastic classifier each forward draws fresh z samples, so the gradient is an EOT average over
``samples`` x ``eot_iter`` draws (and Square compares margins of such averaged predictions). Gradients
are taken w.r.t. the input only.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm


def _loss_and_grad(clf: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, eot_iter: int):
    """Per-sample CE [B], summed-CE gradient averaged over eot_iter forwards, last log-probs."""
    grad = torch.zeros_like(x_adv)
    loss_sum = torch.zeros(len(y), device=x_adv.device)
    for _ in range(eot_iter):
        xr = x_adv.detach().requires_grad_(True)
        log_p = clf(xr)
        loss = F.nll_loss(log_p, y, reduction="none")
        grad += torch.autograd.grad(loss.sum(), xr)[0]
        loss_sum += loss.detach()
    return loss_sum / eot_iter, grad / eot_iter, log_p.detach()


def pgd_linf(clf: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int = 20,
             alpha: Optional[float] = None, eot_iter: int = 1, random_start: bool = True,
             seed: Optional[int] = 0) -> torch.Tensor:
    """l_inf PGD on one batch with the project's engine (urkle_fast.attack.pgd: fused pgd_step_,
    model frozen in eval mode, input gradient only). x [B, ...] in [0,1], y [B] -> x_adv (last iterate).

    Maximises the per-sample cross-entropy of clf's (averaged) prediction; alpha defaults to eps / 10.
    """
    if eps <= 0:
        return x.clone()
    from urkle_fast.attack import pgd

    alpha = eps / 10 if alpha is None else alpha

    def objective(x_adv: torch.Tensor) -> torch.Tensor:
        return F.nll_loss(clf(x_adv), y, reduction="none")

    return pgd(objective, x, eps=eps, alpha=alpha, steps=steps, random_start=random_start, model=clf,
               eot=eot_iter, seed=seed)


def _apgd_checkpoints(n_iter: int) -> list[int]:
    """Iterations after which APGD may halve its step: p_0 = 0, p_1 = 0.22, p_{j+1} = p_j +
    max(p_j - p_{j-1} - 0.03, 0.06) (Croce & Hein 2020, sec. 3.2), in AutoAttack's integer form."""
    first, decr, least = max(int(0.22 * n_iter), 1), max(int(0.03 * n_iter), 1), max(int(0.06 * n_iter), 1)
    out, k, h = [], 0, first
    while k + h <= n_iter:
        k += h
        out.append(k)
        h = max(h - decr, least)
    return out


def _square_p(p_init: float, it: int, n_iters: int) -> float:
    """Fraction of the image a square covers at query it (AutoAttack's schedule, rescaled to n_iters)."""
    t = int(it / max(1, n_iters) * 10000)
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128),
                       (8000, 256), (10000, 512)):
        if t <= bound:
            return p_init / div
    return p_init / 512


def _margin(log_p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log p_y - max_{c != y} log p_c per sample: negative once misclassified."""
    true = log_p.gather(1, y[:, None]).squeeze(1)
    other = log_p.scatter(1, y[:, None], float("-inf")).amax(1)
    return true - other


@torch.no_grad()
def square_linf(clf: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, queries: int = 1000,
                p_init: float = 0.8, seed: Optional[int] = 0) -> torch.Tensor:
    """Square Attack (l_inf, margin loss) on one batch: at most ``queries`` forward passes per image after
    the start. x [B, C, H, W] in [0,1], y [B] -> x_adv, every point within eps of x and in [0, 1]."""
    if eps <= 0:
        return x.clone()
    if x.dim() != 4:
        raise ValueError(f"square_linf: x must be [B, C, H, W], got shape {tuple(x.shape)}")
    x = x.detach()
    B, C, H, W = x.shape
    g = torch.Generator(device=x.device)
    g.manual_seed(int(seed) if seed is not None else 0)
    g_pos = torch.Generator().manual_seed(int(seed) if seed is not None else 0)  # square positions: host-side

    def signs(*shape):
        return torch.randint(0, 2, shape, generator=g, device=x.device).to(x.dtype) * 2 - 1

    x_best = (x + eps * signs(B, C, 1, W)).clamp(0, 1)  # vertical stripes
    margin = _margin(clf(x_best), y)
    for it in range(queries):
        live = (margin > 0).nonzero(as_tuple=True)[0]
        if len(live) == 0:
            break
        s = int(round(math.sqrt(_square_p(p_init, it, queries) * H * W)))
        s = min(max(s, 1), H - 1 if H > 1 else 1, W - 1 if W > 1 else 1)
        r0 = int(torch.randint(0, H - s + 1, (1,), generator=g_pos))
        c0 = int(torch.randint(0, W - s + 1, (1,), generator=g_pos))
        x_l, best_l = x[live], x_best[live]
        delta = best_l - x_l
        delta[:, :, r0:r0 + s, c0:c0 + s] = eps * signs(len(live), C, 1, 1)
        cand = (x_l + delta).clamp(0, 1)
        m_new = _margin(clf(cand), y[live])
        better = m_new < margin[live]
        idx = live[better]
        x_best[idx], margin[idx] = cand[better], m_new[better]
    return x_best


def apgd_ce(clf: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int = 100,
            eot_iter: int = 1, rho: float = 0.75, momentum: float = 0.75,
            seed: Optional[int] = 0) -> torch.Tensor:
    """APGD-CE (l_inf) on one batch. Returns, per sample, a point the attack found misclassified
    if any, else the highest-loss point. x [B, ...] in [0,1], y [B] -> x_adv [B, ...].
    """
    if eps <= 0:
        return x.clone()
    x = x.detach()
    B = len(y)
    view = (B,) + (1,) * (x.dim() - 1)
    lo_b, hi_b = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)

    def proj(v):
        return torch.minimum(torch.maximum(v, lo_b), hi_b)

    g = torch.Generator(device=x.device)
    g.manual_seed(int(seed) if seed is not None else 0)
    t = 2 * torch.rand(x.shape, generator=g, device=x.device) - 1
    t = t / t.flatten(1).abs().amax(1).clamp_min(1e-12).view(view)
    x_adv = proj(x + eps * t)

    loss, grad, log_p = _loss_and_grad(clf, x_adv, y, eot_iter)
    fooled = log_p.argmax(-1) != y
    x_found = x_adv.clone()  # a misclassified point when one was found
    x_best, loss_best, grad_best = x_adv.clone(), loss.clone(), grad.clone()
    step = torch.full(view, 2.0 * eps, device=x.device)
    checkpoints = set(_apgd_checkpoints(steps))
    last_check = 0
    increases = torch.zeros(B, device=x.device)
    loss_prev = loss.clone()
    loss_best_last_check = loss_best.clone()
    reduced_last_check = torch.ones(B, dtype=torch.bool, device=x.device)
    x_prev = x_adv.clone()
    for k in range(steps):
        with torch.no_grad():
            a = momentum if k > 0 else 1.0
            z = proj(x_adv + step * grad.sign())
            x_new = proj(x_adv + a * (z - x_adv) + (1 - a) * (x_adv - x_prev))
            x_prev, x_adv = x_adv, x_new
        loss, grad, log_p = _loss_and_grad(clf, x_adv, y, eot_iter)
        with torch.no_grad():
            wrong = log_p.argmax(-1) != y
            new_fool = wrong & ~fooled
            x_found[new_fool] = x_adv[new_fool]
            fooled |= wrong
            increases += (loss > loss_prev).float()
            loss_prev = loss
            better = loss > loss_best
            x_best[better], loss_best[better], grad_best[better] = x_adv[better], loss[better], grad[better]
            if k + 1 in checkpoints:
                h = k + 1 - last_check
                osc = increases <= rho * h  # condition 1: too few successful steps (AutoAttack: t <= k * rho)
                stall = ~reduced_last_check & (loss_best <= loss_best_last_check)  # condition 2
                cut = osc | stall
                step[cut] /= 2.0
                x_adv[cut], grad[cut] = x_best[cut], grad_best[cut]
                x_prev[cut] = x_best[cut]
                reduced_last_check = cut
                loss_best_last_check = loss_best.clone()
                increases.zero_()
                last_check = k + 1
    return torch.where(fooled.view(view), x_found, x_best).detach()


def robust_accuracy(clf: nn.Module, x: torch.Tensor, y: torch.Tensor, *, attack: str, eps: float,
                    steps: int, alpha: Optional[float] = None, eot_iter: int = 1, batch_size: int = 256,
                    seed: int = 0, device=None, desc: str = "", return_correct: bool = False, first_batch: int = 0,
                    restarts: int = 1):
    """Accuracy on attacked x: the adversaries are re-evaluated with fresh z samples.

    attack: "pgd", "apgd" or "square" (steps = its queries). x [N, ...] on any device (moved per batch),
    y [N]. Returns the accuracy (float), or (accuracy, per-sample correctness [N] bool) with return_correct=True. Batch b's random
    start is seeded with seed + first_batch + b: a rank evaluating batches [k, ...) of a larger set
    passes first_batch=k and attacks exactly as one process would. ``restarts`` > 1 runs the attack
    again from other random starts; an image counts as correct only if it survives every run (restart 0
    is the single-run attack, so more restarts never raise the accuracy).
    """
    from urkle_fast.data import to_float01  # x may be uint8 (ImageFolder test sets are kept so)

    if attack not in ("pgd", "apgd", "square"):
        raise ValueError(f"unknown attack {attack!r}; expected 'pgd', 'apgd' or 'square'")
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be an int >= 1, got {restarts!r}")
    device = device or next(clf.parameters()).device
    clf.eval()
    correct = []
    for bi, i in enumerate(tqdm(range(0, len(x), batch_size), desc=desc or f"{attack} eps={eps:.4g}", leave=False)):
        xb, yb = to_float01(x[i:i + batch_size].to(device)), y[i:i + batch_size].to(device)
        ok_b = torch.ones(len(yb), dtype=torch.bool)
        for r in range(restarts if eps > 0 else 1):
            sd = seed + first_batch + bi + 1_000_003 * r
            if eps <= 0:
                xa = xb
            elif attack == "pgd":
                xa = pgd_linf(clf, xb, yb, eps=eps, steps=steps, alpha=alpha, eot_iter=eot_iter, seed=sd)
            elif attack == "apgd":
                xa = apgd_ce(clf, xb, yb, eps=eps, steps=steps, eot_iter=eot_iter, seed=sd)
            else:  # square: steps = queries
                xa = square_linf(clf, xb, yb, eps=eps, queries=steps, seed=sd)
            with torch.no_grad():
                ok_b &= (clf(xa).argmax(-1) == yb).cpu()
        correct.append(ok_b)
    ok = torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)
    acc = ok.float().sum().item() / max(1, len(x))
    return (acc, ok) if return_correct else acc
