"""White-box attacks of the evaluation protocol (docs/PROTOCOL.md sec. 7), l_inf, pixels in [0, 1].

* ``pgd_linf``: random start, K steps of sign-gradient ascent on the cross-entropy of the
  classifier's (averaged) prediction, through the trainer's engine ``urkle_fast.attack.pgd``
  (fused ``pgd_step_``).
* ``apgd``: APGD of Croce & Hein (2020, "Reliable evaluation of adversarial robustness with an
  ensemble of diverse parameter-free attacks"), written here from the paper and the reference
  AutoAttack code: momentum 0.75, step size 2*eps halved at checkpoints when the loss oscillates or
  stalls, restart from the best point; on the cross-entropy (APGD-CE), the DLR loss (APGD-DLR) or the
  targeted DLR loss, once per target class (``apgd_targeted``, APGD-T). tests/test_eval_strength.py
  checks APGD-DLR and APGD-T against torchattacks' (a test-only dependency: it pins requests~=2.25).

* ``square_linf``: the Square Attack of Andriushchenko et al. (2020, "Square Attack: a query-efficient
  black-box adversarial attack via random search"), AutoAttack's gradient-free member, written from the
  paper: vertical-stripe start, then random eps-squares whose side shrinks on AutoAttack's schedule,
  a square kept only when it lowers the margin. It needs no gradient at all, so a model that masks
  gradients (stochastic z included) cannot hide from it behind them.

All take a classifier returning log-probabilities [B, C] (``ProbabilisticClassifier``); for a
stochastic classifier each forward draws fresh z samples, so the gradient is an EOT average over
``samples`` x ``eot_iter`` draws (and Square compares margins of such averaged predictions). Gradients
are taken w.r.t. the input only. ``attack_scores`` runs one attack over a test set and scores its
adversaries with fresh z draws (a fool is confirmed by most of ``redraws`` new predictions), on the
attacked classifier and, for the transfer attack, on another (the S-sample prediction of the same model).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm


def dlr_loss(log_p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of Logits Ratio (Croce & Hein 2020, Eq. 6), per sample [B]; larger = more adversarial:
    -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3). Invariant to a shift of each row, so the log-probabilities
    of an averaged prediction serve as its logits. Needs >= 3 classes."""
    s, order = log_p.sort(dim=1)
    true = log_p.gather(1, y[:, None]).squeeze(1)
    top_is_y = order[:, -1] == y
    other = torch.where(top_is_y, s[:, -2], s[:, -1])
    return -(true - other) / (s[:, -1] - s[:, -3] + 1e-12)


def dlr_targeted_loss(log_p: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR (Croce & Hein 2020, Eq. 7), per sample [B]: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2).
    Needs >= 4 classes."""
    s, _ = log_p.sort(dim=1)
    true = log_p.gather(1, y[:, None]).squeeze(1)
    tgt = log_p.gather(1, target[:, None]).squeeze(1)
    return -(true - tgt) / (s[:, -1] - 0.5 * (s[:, -3] + s[:, -4]) + 1e-12)


LOSSES = ("ce", "dlr", "dlr-targeted")


def _per_sample_loss(loss: str, log_p: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor]) -> torch.Tensor:
    if loss == "ce":
        return F.nll_loss(log_p, y, reduction="none")
    if loss == "dlr":
        return dlr_loss(log_p, y)
    return dlr_targeted_loss(log_p, y, target)


def _loss_and_grad(clf: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, eot_iter: int, loss_name: str = "ce",
                   target: Optional[torch.Tensor] = None):
    """Per-sample loss [B] and the summed-loss gradient, both averaged over eot_iter draws, and the log of the
    draws' averaged probabilities [B, C] (what APGD judges "fooled" by: one draw of a stochastic prediction is
    too noisy to stop attacking an image). A classifier with ``eot_log_probs`` gives every draw from one
    encoder pass."""
    if eot_iter > 1 and hasattr(clf, "eot_log_probs"):
        xr = x_adv.detach().requires_grad_(True)
        log_ps = clf.eot_log_probs(xr, eot_iter)
        loss = torch.stack([_per_sample_loss(loss_name, lp, y, target) for lp in log_ps]).mean(0)
        grad = torch.autograd.grad(loss.sum(), xr)[0]
        return loss.detach(), grad, (torch.logsumexp(log_ps, 0) - math.log(eot_iter)).detach()
    grad = torch.zeros_like(x_adv)
    loss_sum = torch.zeros(len(y), device=x_adv.device)
    log_ps = []
    for _ in range(eot_iter):
        xr = x_adv.detach().requires_grad_(True)
        log_p = clf(xr)
        loss = _per_sample_loss(loss_name, log_p, y, target)
        grad += torch.autograd.grad(loss.sum(), xr)[0]
        loss_sum += loss.detach()
        log_ps.append(log_p.detach())
    return loss_sum / eot_iter, grad / eot_iter, torch.logsumexp(torch.stack(log_ps), 0) - math.log(eot_iter)


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
    batched = eot_iter > 1 and hasattr(clf, "eot_log_probs")  # every EOT draw from one encoder pass

    def objective(x_adv: torch.Tensor) -> torch.Tensor:
        if batched:
            return torch.stack([F.nll_loss(lp, y, reduction="none") for lp in clf.eot_log_probs(x_adv, eot_iter)]).mean(0)
        return F.nll_loss(clf(x_adv), y, reduction="none")

    return pgd(objective, x, eps=eps, alpha=alpha, steps=steps, random_start=random_start, model=clf,
               eot=1 if batched else eot_iter, seed=seed)


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
                p_init: float = 0.8, seed: Optional[int] = 0, redraws: int = 5) -> torch.Tensor:
    """Square Attack (l_inf, margin loss) on one batch: at most ``queries`` forward passes per image after
    the start. x [B, C, H, W] in [0,1], y [B] -> x_adv, every point within eps of x and in [0, 1].

    A stochastic classifier (the S-sample prediction) gives a noisy margin, so (i) each query draws the current
    best point's margin afresh next to the candidate's (a margin kept from earlier is the luckiest of many
    draws, which would reject later real improvements), and (ii) an image stops being attacked only when most
    of ``redraws`` fresh predictions are wrong, the rule ``attack_scores`` scores it by (one draw would retire
    images that score as right). For a deterministic classifier both reduce to the plain attack."""
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

    stochastic = bool(getattr(clf, "stochastic", False))

    def retire(idx: torch.Tensor) -> None:  # images whose best margin is <= 0: done, if the scoring would agree
        if stochastic and len(idx):
            wrong = torch.zeros(len(idx), device=x.device)
            for _ in range(redraws):
                wrong += (clf(x_best[idx]).argmax(-1) != y[idx]).float()
            idx = idx[wrong > redraws / 2]
        done[idx] = True

    x_best = (x + eps * signs(B, C, 1, W)).clamp(0, 1)  # vertical stripes
    margin = _margin(clf(x_best), y)
    done = torch.zeros(B, dtype=torch.bool, device=x.device)
    retire((margin <= 0).nonzero(as_tuple=True)[0])
    for it in range(queries):
        live = (~done).nonzero(as_tuple=True)[0]
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
        m_cur = _margin(clf(best_l), y[live]) if stochastic else margin[live]
        better = m_new < m_cur
        x_best[live[better]] = cand[better]
        margin[live] = torch.where(better, m_new, m_cur)
        retire(live[margin[live] <= 0])
    return x_best


def apgd_ce(clf: nn.Module, x: torch.Tensor, y: torch.Tensor, **kw) -> torch.Tensor:
    """APGD-CE (l_inf) on one batch: ``apgd(..., loss="ce")``."""
    return apgd(clf, x, y, loss="ce", **kw)


def apgd_targeted(clf: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int = 100,
                  n_targets: int = 9, eot_iter: int = 1, seed: Optional[int] = 0) -> torch.Tensor:
    """APGD-T (AutoAttack's standard member): APGD on the targeted DLR loss, once per target class, the
    targets being the 2nd, 3rd, ... most likely classes of the clean prediction; an image fooled under one
    target is not attacked again. Returns a misclassified point per image where one was found, else the
    last target's best point. Needs >= 4 classes."""
    x = x.detach()
    x_out = x.clone()
    with torch.no_grad():
        log_p = clf(x)
    C = log_p.shape[1]
    if C < 4:
        raise ValueError(f"apgd_targeted: the targeted DLR loss needs >= 4 classes, got {C}")
    order = log_p.argsort(dim=1)
    # as AutoAttack: only images the clean prediction gets right (for the others the 2nd class can be y itself)
    live = log_p.argmax(1) == y
    for k in range(2, min(n_targets, C - 1) + 2):
        idx = live.nonzero(as_tuple=True)[0]
        if len(idx) == 0:
            break
        target = order[idx, -k]
        xa = apgd(clf, x[idx], y[idx], eps=eps, steps=steps, loss="dlr-targeted", target=target, eot_iter=eot_iter,
                  seed=None if seed is None else seed + 7919 * k)
        x_out[idx] = xa
        with torch.no_grad():
            fooled = clf(xa).argmax(-1) != y[idx]
        live[idx[fooled]] = False
    return x_out


def apgd(clf: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int = 100, loss: str = "ce",
         target: Optional[torch.Tensor] = None, eot_iter: int = 1, rho: float = 0.75, momentum: float = 0.75,
         seed: Optional[int] = 0) -> torch.Tensor:
    """APGD (l_inf) on one batch with the cross-entropy, DLR or targeted-DLR loss (``target`` [B]). Returns,
    per sample, a point the attack found misclassified if any, else the highest-loss point.
    x [B, ...] in [0,1], y [B] -> x_adv [B, ...].
    """
    if loss not in LOSSES:
        raise ValueError(f"apgd: loss must be one of {LOSSES}, got {loss!r}")
    if (loss == "dlr-targeted") != (target is not None):
        raise ValueError("apgd: give target exactly when loss is 'dlr-targeted'")
    if eps <= 0:
        return x.clone()
    x = x.detach()
    loss_name = loss
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

    loss, grad, log_p = _loss_and_grad(clf, x_adv, y, eot_iter, loss_name, target)
    fooled = log_p.argmax(-1) != y
    # the misclassified point with the highest loss found so far. AutoAttack keeps the latest one; for a
    # deterministic classifier any fool scores the same, but the S-sample prediction is scored afresh (most of
    # `redraws` predictions must be wrong) and the first point whose EOT average flips sits on the boundary
    x_found, loss_found = x_adv.clone(), torch.where(fooled, loss, torch.full_like(loss, -math.inf))
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
        loss, grad, log_p = _loss_and_grad(clf, x_adv, y, eot_iter, loss_name, target)
        with torch.no_grad():
            wrong = log_p.argmax(-1) != y
            deeper = wrong & (loss >= loss_found)
            x_found[deeper], loss_found[deeper] = x_adv[deeper], loss[deeper]
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


ATTACKS = ("pgd", "apgd", "apgd-dlr", "apgd-t", "square")


@torch.no_grad()
def score(clf: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, redraws: int = 1) -> torch.Tensor:
    """Fraction of predictions that are correct, per image [B] float (CPU). A stochastic classifier (the
    S-sample prediction) is asked ``redraws`` times with fresh z draws, none of them the draws the attack
    saw; a deterministic one once."""
    n = redraws if getattr(clf, "stochastic", False) else 1
    hits = torch.zeros(len(y))
    for _ in range(n):
        hits += (clf(x_adv).argmax(-1) == y).float().cpu()
    return hits / n


def _run_attack(attack: str, clf, xb, yb, *, eps, steps, alpha, eot_iter, n_targets, seed, redraws):
    if attack == "pgd":
        return pgd_linf(clf, xb, yb, eps=eps, steps=steps, alpha=alpha, eot_iter=eot_iter, seed=seed)
    if attack == "apgd":
        return apgd(clf, xb, yb, eps=eps, steps=steps, loss="ce", eot_iter=eot_iter, seed=seed)
    if attack == "apgd-dlr":
        return apgd(clf, xb, yb, eps=eps, steps=steps, loss="dlr", eot_iter=eot_iter, seed=seed)
    if attack == "apgd-t":
        return apgd_targeted(clf, xb, yb, eps=eps, steps=steps, n_targets=n_targets, eot_iter=eot_iter, seed=seed)
    return square_linf(clf, xb, yb, eps=eps, queries=steps, seed=seed, redraws=redraws)  # square: steps = queries


def attack_scores(clf: nn.Module, x: torch.Tensor, y: torch.Tensor, *, attack: str, eps: float, steps: int,
                  alpha: Optional[float] = None, eot_iter: int = 1, batch_size: int = 256, seed: int = 0, device=None,
                  desc: str = "", first_batch: int = 0, restarts: int = 1, n_targets: int = 9, redraws: int = 1,
                  transfer_to: Optional[nn.Module] = None) -> dict:
    """Attack every image and score the adversaries: {"frac": [N] float, the share of fresh predictions that
    are still correct (the image's worst over restarts), "ok": [N] bool, frac >= 1/2: a fool of a stochastic
    prediction counts only when most fresh draws confirm it}. With ``transfer_to`` (the S-sample classifier
    of the same model), the same adversaries are scored on it as well: {"transfer": {"frac", "ok"}}.

    attack: one of ATTACKS ("square": steps = queries). Batch b's random start is seeded with seed +
    first_batch + b, and a stochastic classifier's z stream is reseeded per batch too (a rank evaluating
    batches [k, ...) passes first_batch=k and attacks exactly as one process would); restart r adds
    1_000_003 r, restart 0 being the single-run attack, so more restarts never raise the accuracy."""
    from urkle_fast.data import to_float01  # x may be uint8 (ImageFolder test sets are kept so)

    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; expected one of {ATTACKS}")
    for name, v in (("restarts", restarts), ("redraws", redraws), ("n_targets", n_targets)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if redraws % 2 == 0:  # "most predictions wrong" must have no tie (a tie would count as right)
        raise ValueError(f"redraws must be odd, got {redraws}")
    device = device or next(clf.parameters()).device
    clf.eval()
    fracs, t_fracs = [], []
    z_seeds = [getattr(c, "_seed", 0) for c in (clf, transfer_to)]
    for bi, i in enumerate(tqdm(range(0, len(x), batch_size), desc=desc or f"{attack} eps={eps:.4g}", leave=False)):
        xb, yb = to_float01(x[i:i + batch_size].to(device)), y[i:i + batch_size].to(device)
        for c, s0 in zip((clf, transfer_to), z_seeds):  # z draws per batch: one process or W ranks draw the same
            if hasattr(c, "reseed"):
                c.reseed(s0 + 7919 * (first_batch + bi))
        frac_b, t_frac_b = torch.ones(len(yb)), torch.ones(len(yb))
        for r in range(restarts if eps > 0 else 1):
            sd = seed + first_batch + bi + 1_000_003 * r
            xa = xb if eps <= 0 else _run_attack(attack, clf, xb, yb, eps=eps, steps=steps, alpha=alpha,
                                                 eot_iter=eot_iter, n_targets=n_targets, seed=sd, redraws=redraws)
            frac_b = torch.minimum(frac_b, score(clf, xa, yb, redraws))
            if transfer_to is not None:
                t_frac_b = torch.minimum(t_frac_b, score(transfer_to, xa, yb, redraws))
        fracs.append(frac_b)
        t_fracs.append(t_frac_b)
    for c, s0 in zip((clf, transfer_to), z_seeds):  # the caller's seed back: every rank leaves in the same state
        if hasattr(c, "reseed"):
            c.reseed(s0)
    frac = torch.cat(fracs) if fracs else torch.zeros(0)
    out = {"frac": frac, "ok": frac >= 0.5}
    if transfer_to is not None:
        t_frac = torch.cat(t_fracs) if t_fracs else torch.zeros(0)
        out["transfer"] = {"frac": t_frac, "ok": t_frac >= 0.5}
    return out


def robust_accuracy(clf: nn.Module, x: torch.Tensor, y: torch.Tensor, *, attack: str, eps: float, steps: int,
                    return_correct: bool = False, **kw):
    """Accuracy under one attack (``attack_scores``' confirmed-correct share); with return_correct=True,
    (accuracy, per-image correctness [N] bool)."""
    ok = attack_scores(clf, x, y, attack=attack, eps=eps, steps=steps, **kw)["ok"]
    acc = ok.float().sum().item() / max(1, len(x))
    return (acc, ok) if return_correct else acc


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion k / n (better than the normal one near 0 and 1)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)
