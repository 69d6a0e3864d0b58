"""Proposition 1 of the paper, measured on a trained model (``python -m urkle_fast.eval ... --bound M``).

With the bounded softmax of footnote 1, p~_c = p_c (1 - C e^-M) + e^-M, every loss -log p~(y|z) lies in
[0, M]. For any x' (docs/MATH.md sec. 6):

    -log E_{z~p(z|x')} p~(y|z)  <=  E_{z~p(z|x')} [-log p~(y|z)]                      (Jensen)
                               <=  E_{z~p(z|x)} [-log p~(y|z)] + M * TV(p(z|x), p(z|x'))
                               <=  E_{z~p(z|x)} [-log p~(y|z)] + M * sqrt(KL[p(z|x) || p(z|x')] / 2)   (Pinsker)

and, taking the max over the ball and the mean over the data (Jensen again on the square root),

    LHS = E_{x,y} max_{x'} -log q~(y|x')  <=  term1 + M / sqrt(2) * sqrt(term2) = RHS,
    term1 = E_{x,y} E_{z~p(z|x)} [-log p~(y|z)],   term2 = E_x max_{x'} KL[p(z|x) || p(z|x')].

Measured here: term1 with S >= 32 samples per image; term2 from the Urkle attack (PGD on the KL) with more
steps and restarts than training, the model in eval mode; LHS from the evaluation's attacks on the bounded
S-sample prediction (PGD, APGD-CE), the KL adversary and the clean image, per image the largest loss. The
attacks only lower-bound the two maxima, so the aggregate comparison depends on their strength; the
per-example inequality does not (it holds for every x'), and is checked for every adversary used, with an
allowance of 3 Monte-Carlo standard errors of the two sample means (its sides are estimated from z samples).
A bound is vacuous when RHS >= M (every bounded loss is at most M anyway).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from urkle_fast.attack import pgd, urkle_kl
from urkle_fast.evaluation.attacks import apgd, pgd_linf
from urkle_fast.evaluation.probe import ProbabilisticClassifier, bounded_log_probs
from urkle_fast.ops import gaussian_kl


def _bounded_nll_samples(model: nn.Module, head: nn.Module, x: torch.Tensor, y: torch.Tensor, M: float, S: int,
                         g: torch.Generator) -> torch.Tensor:
    """-log p~(y|z_s) for S fresh z_s ~ p(z|x): [S, B]."""
    mu, logvar = model.encode(x)
    mu, logvar = mu.float(), logvar.float()
    eps = torch.randn((S,) + tuple(mu.shape), generator=g, device=mu.device)
    z = mu.unsqueeze(0) + torch.exp(0.5 * logvar).unsqueeze(0) * eps
    log_p = torch.log_softmax(head(z.reshape(-1, mu.shape[1])), dim=-1)
    log_pb = bounded_log_probs(log_p, M).reshape(S, len(y), -1)
    return -log_pb.gather(2, y.view(1, -1, 1).expand(S, -1, 1)).squeeze(2)


@torch.no_grad()
def _sides(model, head, x, x_adv, y, M, S, g):
    """Per image: LHS estimate -log mean_s p~(y|z'_s), and the per-example RHS with its MC allowance."""
    f_clean = _bounded_nll_samples(model, head, x, y, M, S, g)  # [S, B] under p(z|x)
    f_adv = _bounded_nll_samples(model, head, x_adv, y, M, S, g)  # under p(z|x')
    lhs = -(torch.logsumexp(-f_adv, dim=0) - math.log(S))  # -log of the averaged bounded probability
    mu0, lv0 = model.encode(x)
    mu1, lv1 = model.encode(x_adv)
    kl = gaussian_kl(mu0.float(), lv0.float(), mu1.float(), lv1.float(), reduction="none")
    term1 = f_clean.mean(0)
    rhs = term1 + M * torch.sqrt(kl.clamp_min(0) / 2)
    allowance = 3 * torch.sqrt((f_clean.var(0) + f_adv.var(0)) / S)
    return lhs, term1, kl, rhs, allowance


def proposition1(model: nn.Module, head: nn.Module, x: torch.Tensor, y: torch.Tensor, *, M: float, eps: float,
                 samples: int = 64, kl_steps: int = 100, kl_restarts: int = 3, attack_steps: int = 50,
                 batch_size: int = 256, seed: int = 0, device=None) -> dict:
    """Both sides of Proposition 1 at radius eps for a Gaussian encoder and its (bounded) head; see the module
    docstring. x [N, ...] in [0, 1], y [N]. Returns term1, term2, rhs, lhs (means over images), vacuous
    (rhs >= M), violations (images whose per-example inequality fails beyond Monte-Carlo error, for any of the
    adversaries used), n."""
    from urkle_fast.data import to_float01

    if samples < 32:
        raise ValueError(f"proposition1: samples must be >= 32 (the clean term is a Monte-Carlo mean), got {samples}")
    if getattr(model, "deterministic", False) or getattr(model, "kind", None) != "representation":
        raise ValueError("proposition1 needs a Gaussian encoder p(z|x): a deterministic one has no finite KL")
    device = device or next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    clf = ProbabilisticClassifier(model, head, path="samples", samples=samples, bounded_M=M, seed=seed).to(device)
    t1, kls, lhss, violations = [], [], [], 0
    for bi, i in enumerate(range(0, len(y), batch_size)):
        xb, yb = to_float01(x[i:i + batch_size].to(device)), y[i:i + batch_size].to(device)
        # term 2: the Urkle attack, more steps and restarts than training; per image the largest KL found
        kl_best, x_kl = torch.zeros(len(yb), device=device), xb.clone()
        for r in range(kl_restarts):
            xa = pgd(urkle_kl(model, xb), xb, eps=eps, alpha=2.5 * eps / kl_steps, steps=kl_steps, model=model,
                     seed=seed + 1009 * bi + 7 * r)
            with torch.no_grad():
                mu0, lv0 = model.encode(xb)
                mu1, lv1 = model.encode(xa)
                kl = gaussian_kl(mu0.float(), lv0.float(), mu1.float(), lv1.float(), reduction="none")
            better = kl > kl_best
            kl_best, x_kl[better] = torch.where(better, kl, kl_best), xa[better]
        # LHS: the evaluation's attacks on the bounded S-sample prediction, the KL adversary, the clean image
        candidates = [xb, x_kl,
                      pgd_linf(clf, xb, yb, eps=eps, steps=attack_steps, seed=seed + bi),
                      apgd(clf, xb, yb, eps=eps, steps=attack_steps, loss="ce", seed=seed + bi)]
        lhs_b = torch.zeros(len(yb), device=device)
        for xa in candidates:
            lhs, term1, _, rhs, allowance = _sides(model, head, xb, xa, yb, M, samples, g)
            lhs_b = torch.maximum(lhs_b, lhs)
            violations += int((lhs > rhs + allowance).sum())
        t1.append(term1.cpu())
        kls.append(kl_best.cpu())
        lhss.append(lhs_b.cpu())
    term1, term2, lhs = (torch.cat(v).mean().item() if v else 0.0 for v in (t1, kls, lhss))
    rhs = term1 + M / math.sqrt(2) * math.sqrt(max(term2, 0.0))
    return dict(M=M, eps=eps, samples=samples, kl_steps=kl_steps, kl_restarts=kl_restarts, term1=term1, term2=term2,
                rhs=rhs, lhs=lhs, holds=lhs <= rhs, vacuous=rhs >= M, violations=violations,
                checked_pairs=len(y) * 4, n=len(y))
