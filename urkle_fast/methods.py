"""One training loss per method (SPEC sec 5). Each is ``loss(model, views, y, cfg) -> (loss, metrics)``:

* views: [V, B, C, H, W] in [0, 1] -- V = 2 augmentations for the contrastive methods, V = 1 otherwise;
* y: [B] labels (used only by the supervised methods);
* cfg: anything with the attributes of urkle_fast.train.TrainConfig that the method reads
  (eps, pgd_steps, pgd_alpha, norm, beta_robust, beta_vae, temperature, denominator, eot);
* loss: a float32 scalar to minimise; metrics: detached scalars for logging.

The model is in train mode; every attack (urkle_fast.attack.pgd) flips it to eval mode with frozen
parameters for the attack only. Clean and adversarial inputs share ONE forward pass (one batch).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from urkle_fast import gaussian_kl
from urkle_fast.distributed import nt_xent_global
from urkle_fast.attack import ae_recon, cross_entropy, pgd, rocl_nt_xent, trades_kl, urkle_kl


def _attack(objective, x, cfg, model, eot: int = 1) -> torch.Tensor:
    return pgd(objective, x, eps=cfg.eps, alpha=cfg.pgd_alpha, steps=cfg.pgd_steps, norm=cfg.norm, model=model,
               eot=eot)


def _contrastive(model, x: torch.Tensor, views: int, cfg):
    """x [views*B, ...] view-major -> (NT-Xent over the views, mu, logvar) with one z sample per row.
    Under torch.distributed the NT-Xent is over the global batch (every rank's rows are columns)."""
    mu, logvar = model.encode(x)
    p = model.project(model.sample(mu, logvar))
    return nt_xent_global(p, views=views, temperature=cfg.temperature, denominator=cfg.denominator), mu, logvar


def contrastive_inputs(method: str, model, views, cfg) -> tuple[torch.Tensor, int]:
    """The encoder input of a contrastive method, view-major [V' * B, ...] (attacks run here), and V'.
    urkle_fast.microbatch builds its chunks with it too."""
    if method == "simclr":
        return views.flatten(0, 1), 2
    if method == "simclr_urkle":  # view 1 rows, view 2 rows, then their Urkle adversaries
        x = views.flatten(0, 1)
        return torch.cat([x, _attack(urkle_kl(model, x), x, cfg, model)]), 4
    if method == "rocl":  # the adversary of view 1 against view 2 joins as a third view
        x1, x2 = views[0], views[1]
        return torch.cat([x1, x2, _attack(rocl_nt_xent(model, x2, cfg.temperature), x1, cfg, model, eot=cfg.eot)]), 3
    raise ValueError(f"{method!r} is not a contrastive method (simclr, simclr_urkle, rocl)")


def simclr(model, views, y, cfg):
    """Plain SimCLR: NT-Xent over the 2 augmentations (beta = 0, no adversaries)."""
    loss, _, _ = _contrastive(model, *contrastive_inputs("simclr", model, views, cfg), cfg)
    return loss, {"nt_xent": loss.detach()}


def simclr_urkle(model, views, y, cfg):
    """SimCLR + Urkle (paper Eq. 12): the two augmentations and their two Urkle adversaries in one
    4-view forward pass; NT-Xent(V=4) + beta_robust * mean_{2B} KL[p(z|x) || p(z|x_adv)]."""
    x, V = contrastive_inputs("simclr_urkle", model, views, cfg)
    con, mu, logvar = _contrastive(model, x, V, cfg)
    n = x.shape[0] // 2
    kl = gaussian_kl(mu[:n], logvar[:n], mu[n:], logvar[n:], reduction="mean")
    loss = con + cfg.beta_robust * kl
    return loss, {"nt_xent": con.detach(), "urkle_kl": kl.detach()}


def rocl(model, views, y, cfg):
    """RoCL: the adversary of view 1 maximises its NT-Xent against view 2 (EOT over z samples when
    cfg.eot > 1); it joins the two views as a third positive: NT-Xent(V=3)."""
    loss, _, _ = _contrastive(model, *contrastive_inputs("rocl", model, views, cfg), cfg)
    return loss, {"nt_xent": loss.detach()}


def _bce(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log q(x|z) for Bernoulli pixels, summed over pixels, averaged over the batch."""
    return F.binary_cross_entropy_with_logits(logits.float(), x.float(), reduction="sum") / x.shape[0]


def vae_urkle(model, views, y, cfg):
    """VAE + Urkle (paper Eq. 6): BCE reconstruction + beta_vae * KL[p(z|x) || N(0, I)]
    + beta_robust * KL[p(z|x) || p(z|x_adv)] (beta_vae = 0 in the paper's MNIST table)."""
    x = views[0]
    x_adv = _attack(urkle_kl(model, x), x, cfg, model)
    mu, logvar = model.encode(torch.cat([x, x_adv]))
    n = x.shape[0]
    recon = _bce(model.decode_logits(model.sample(mu[:n], logvar[:n])), x)
    zeros = torch.zeros_like(mu[:n])
    prior = gaussian_kl(mu[:n], logvar[:n], zeros, zeros, reduction="mean")
    kl = gaussian_kl(mu[:n], logvar[:n], mu[n:], logvar[n:], reduction="mean")
    loss = recon + cfg.beta_vae * prior + cfg.beta_robust * kl
    return loss, {"recon": recon.detach(), "prior_kl": prior.detach(), "urkle_kl": kl.detach()}


def ae_trades(model, views, y, cfg):
    """Deterministic AE + TRADES-style term: BCE(h(g(x)), x) + beta_robust * ||h(g(x_adv)) - h(g(x))||^2,
    x_adv maximising that distance."""
    x = views[0]
    x_adv = _attack(ae_recon(model, x), x, cfg, model)
    mu, _ = model.encode(torch.cat([x, x_adv]))
    logits = model.decode_logits(mu)
    n = x.shape[0]
    recon = _bce(logits[:n], x)
    r = torch.sigmoid(logits.float())
    dist = (r[n:] - r[:n]).pow(2).flatten(1).sum(1).mean()
    loss = recon + cfg.beta_robust * dist
    return loss, {"recon": recon.detach(), "adv_dist": dist.detach()}


def standard(model, views, y, cfg):
    """Supervised cross-entropy on clean inputs."""
    logits = model.logits(views[0])
    loss = F.cross_entropy(logits.float(), y)
    return loss, {"ce": loss.detach(), "acc": (logits.argmax(1) == y).float().mean()}


def at(model, views, y, cfg):
    """Adversarial training (Madry): cross-entropy on PGD adversaries of the cross-entropy."""
    x = views[0]
    x_adv = _attack(cross_entropy(model, y), x, cfg, model)
    logits = model.logits(x_adv)
    loss = F.cross_entropy(logits.float(), y)
    return loss, {"ce_adv": loss.detach(), "acc_adv": (logits.argmax(1) == y).float().mean()}


def trades(model, views, y, cfg):
    """TRADES: CE(x) + beta_robust * KL(p(y|x) || p(y|x_adv)) (beta 6), x_adv maximising that KL."""
    x = views[0]
    x_adv = _attack(trades_kl(model, x), x, cfg, model)
    logits = model.logits(torch.cat([x, x_adv])).float()
    n = x.shape[0]
    ce = F.cross_entropy(logits[:n], y)
    logp, logq = F.log_softmax(logits[:n], 1), F.log_softmax(logits[n:], 1)
    kl = (logp.exp() * (logp - logq)).sum(1).mean()
    loss = ce + cfg.beta_robust * kl
    return loss, {"ce": ce.detach(), "trades_kl": kl.detach()}


METHODS: dict[str, Callable[..., tuple[torch.Tensor, dict[str, Any]]]] = {
    "simclr_urkle": simclr_urkle, "simclr": simclr, "rocl": rocl, "vae_urkle": vae_urkle,
    "ae_trades": ae_trades, "standard": standard, "at": at, "trades": trades,
}
# how many augmented views of each image a method's loss takes
NUM_VIEWS = {"simclr_urkle": 2, "simclr": 2, "rocl": 2, "vae_urkle": 1, "ae_trades": 1,
             "standard": 1, "at": 1, "trades": 1}
# beta_robust when the command line does not set it: TRADES' 6 from its paper; SimCLR+Urkle 0.01 tuned
# on digits (the KL is in units of (delta mu / sigma)^2 and gets large; 0.1 and 1 collapsed the encoder);
# VAE+Urkle and AE+TRADES 1 (their reconstruction terms are summed over pixels, hundreds of nats)
DEFAULT_BETA = {"simclr_urkle": 0.01, "simclr": 0.0, "rocl": 0.0, "vae_urkle": 1.0, "ae_trades": 1.0,
                "standard": 0.0, "at": 0.0, "trades": 6.0}
