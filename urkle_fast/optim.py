"""The optimiser and the schedules of training: LARS, its parameter groups, warm-up + cosine, the beta ramp."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017, SimCLR's variant).

    Parameters in a group with ``exclude=True`` (biases, norm weights) get neither weight decay nor
    the trust ratio: plain momentum SGD."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 1e-6,
                 trust_coef: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coef=trust_coef, exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if not group["exclude"]:
                    g = g.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    trust = torch.where((w_norm > 0) & (g_norm > 0), group["trust_coef"] * w_norm / g_norm,
                                        torch.ones_like(w_norm))
                    g = g.mul(trust)
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = torch.clone(g).detach()
                else:
                    buf.mul_(group["momentum"]).add_(g)
                p.add_(buf, alpha=-group["lr"])
        return loss


def param_groups(model: nn.Module) -> list[dict]:
    """Biases and normalisation parameters (ndim <= 1) are excluded from weight decay and LARS."""
    decay, exclude = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (exclude if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "exclude": False}, {"params": exclude, "exclude": True, "weight_decay": 0.0}]


def make_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """cfg.optimizer over ``param_groups(model)`` at SimCLR's lr = base_lr * batch_size / 256."""
    lr = cfg.base_lr * cfg.batch_size / 256
    if cfg.optimizer == "lars":
        return LARS(param_groups(model), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                    trust_coef=cfg.trust_coef)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups(model), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(param_groups(model), lr=lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; expected lars, sgd or adamw")


def warmup_cosine(warmup_steps: int, total_steps: int):
    """LambdaLR factor: linear warm-up over warmup_steps, then a cosine to 0 at total_steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    return factor


def beta_ramp(step: int, ramp_steps: float) -> float:
    """Factor in [0, 1] on beta_robust at ``step``: linear from 0 over ``ramp_steps``. A collapsed encoder
    (mu barely varying, z all noise) gives NT-Xent no gradient, so a full-strength KL at step 0 can win
    before features form."""
    return min(1.0, step / ramp_steps) if ramp_steps > 0 else 1.0
