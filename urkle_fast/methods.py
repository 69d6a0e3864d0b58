"""Every training method of the paper as one object, in one registry (docs/MATH.md sec 5).

A ``Method`` carries its own facts: the model family it needs, how many augmented crops of each
image its loss takes, its default beta_robust, its augmentation presets, and its loss. Adding a
method touches this file only: write its parts and add one ``register(Method(...))`` line.

Two kinds of loss:

* contrastive (SimCLR, SimCLR+Urkle, RoCL): built from parts, so that the micro-batch gradient
  cache (urkle_fast.microbatch) can run them chunk by chunk without knowing which method it is:
  ``inputs(model, crops, hp) -> (x, V)`` is the encoder input, view-major [V * B, ...] (attacks run
  here); the loss is NT-Xent over the V views of one z sample per row, plus, optionally,
  ``beta * extra`` where ``extra`` is a mean over per-row terms of (mu, logvar) (the Urkle KL).
* per-sample (VAE+Urkle, AE+TRADES, Standard, AT, TRADES): ``per_sample(model, crops, labels, hp,
  beta) -> (loss, metrics)``, a mean over the batch, so chunks are plain gradient accumulation.

Arguments every loss takes: crops [V, B, C, H, W] in [0, 1] (V = ``crops_per_image``); labels [B]
(read by the supervised methods only); hp, a ``LossParams`` (eps, PGD steps and step, norm, EOT,
temperature, denominator, beta_vae); beta, the weight of the robustness term at this step (the trainer
ramps it in). Every loss returns (a float32 scalar to minimise, detached scalars for logging). The
model is in train mode; each attack (urkle_fast.attack.pgd) flips it to eval mode with frozen
parameters for the attack only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from urkle_fast.attack import ae_recon, cross_entropy, pgd, rocl_nt_xent, trades_kl, urkle_kl
from urkle_fast.ops import gaussian_kl, nt_xent

Metrics = dict[str, Tensor]


@dataclass(frozen=True)
class LossParams:
    """What the losses read besides the model and the data (built once per run from the TrainConfig)."""

    eps: float  # l_inf (or l2) radius of the training attacks, [0, 1] pixels
    pgd_alpha: float
    pgd_steps: int
    norm: str = "linf"
    eot: int = 1  # z samples averaged per RoCL attack step
    temperature: float = 0.5
    denominator: str = "all"
    beta_vae: float = 0.0  # weight of KL[p(z|x) || N(0, I)] in VAE+Urkle

    @classmethod
    def of(cls, cfg: Any) -> "LossParams":
        """From anything with these attributes (a resolved urkle_fast.train.TrainConfig)."""
        return cls(eps=cfg.eps, pgd_alpha=cfg.pgd_alpha, pgd_steps=cfg.pgd_steps, norm=cfg.norm, eot=cfg.eot,
                   temperature=cfg.temperature, denominator=cfg.denominator, beta_vae=cfg.beta_vae)


@dataclass(frozen=True)
class ExtraTerm:
    """A per-row regulariser next to NT-Xent: ``fn(mu, logvar, reduction)`` over the encoder rows of x
    (reduction "mean" or "sum"), and ``count(B)``, the number of terms it averages for B images (the
    gradient cache sums chunks and divides by the count of the whole batch)."""

    name: str
    fn: Callable[[Tensor, Tensor, str], Tensor]
    count: Callable[[int], int]


@dataclass(frozen=True)
class Method:
    name: str
    family: str  # the model it needs: contrastive | vae | ae | supervised (urkle_fast.models)
    crops_per_image: int  # augmented crops of each image the loader delivers
    forward_rows: int  # encoder rows per image in one step (clean + adversaries): sets the step's memory
    default_beta: float  # beta_robust when the command line does not set it
    presets: tuple[str, str]  # augmentation preset for grey (1-channel) and for colour datasets
    summary: str
    inputs: Optional[Callable[[nn.Module, Tensor, LossParams], tuple[Tensor, int]]] = None
    extra: Optional[ExtraTerm] = None
    per_sample: Optional[Callable[..., tuple[Tensor, Metrics]]] = None

    @property
    def contrastive(self) -> bool:
        return self.inputs is not None

    def preset(self, in_channels: int) -> str:
        return self.presets[0] if in_channels == 1 else self.presets[1]

    def loss(self, model: nn.Module, crops: Tensor, labels: Tensor, hp: LossParams, beta: float) -> tuple[Tensor, Metrics]:
        """The method's training loss on this rank's batch (the global NT-Xent under torch.distributed)."""
        if not self.contrastive:
            return self.per_sample(model, crops, labels, hp, beta)
        x, V = self.inputs(model, crops, hp)
        p, mu, logvar = embed(model, x)
        con = nt_xent(p, views=V, temperature=hp.temperature, denominator=hp.denominator, gather_distributed=True)
        if self.extra is None:
            return con, {"nt_xent": con.detach()}
        term = self.extra.fn(mu, logvar, "mean")
        return con + beta * term, {"nt_xent": con.detach(), self.extra.name: term.detach()}


def embed(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(projection of one z sample, mu, logvar) per row of x."""
    mu, logvar = model.encode(x)
    return model.project(model.sample(mu, logvar)), mu, logvar


def _attack(objective, x: Tensor, hp: LossParams, model: nn.Module, eot: int = 1) -> Tensor:
    return pgd(objective, x, eps=hp.eps, alpha=hp.pgd_alpha, steps=hp.pgd_steps, norm=hp.norm, model=model, eot=eot)


# ----------------------------------------------------------------------------------------------
# contrastive parts


def _simclr_inputs(model, crops, hp):
    return crops.flatten(0, 1), 2


def _urkle_inputs(model, crops, hp):
    """View 1 rows, view 2 rows, then their Urkle adversaries (paper Eq. 12): a 4-view batch."""
    x = crops.flatten(0, 1)
    return torch.cat([x, _attack(urkle_kl(model, x), x, hp, model)]), 4


def _urkle_kl_term(mu: Tensor, logvar: Tensor, reduction: str) -> Tensor:
    """KL[p(z|x) || p(z|x_adv)]: the first half of the rows are clean, the second their adversaries."""
    n = mu.shape[0] // 2
    return gaussian_kl(mu[:n], logvar[:n], mu[n:], logvar[n:], reduction=reduction)


def _rocl_inputs(model, crops, hp):
    """The adversary of view 1 maximises its NT-Xent against view 2 (EOT over z samples when eot > 1)
    and joins the two views as a third positive."""
    x1, x2 = crops[0], crops[1]
    return torch.cat([x1, x2, _attack(rocl_nt_xent(model, x2, hp.temperature), x1, hp, model, eot=hp.eot)]), 3


# ----------------------------------------------------------------------------------------------
# per-sample losses


def _bce(logits: Tensor, x: Tensor) -> Tensor:
    """-log q(x|z) for Bernoulli pixels, summed over pixels, averaged over the batch."""
    return F.binary_cross_entropy_with_logits(logits.float(), x.float(), reduction="sum") / x.shape[0]


def vae_urkle_loss(model, crops, labels, hp, beta):
    """VAE + Urkle (paper Eq. 6): BCE reconstruction + beta_vae * KL[p(z|x) || N(0, I)]
    + beta * KL[p(z|x) || p(z|x_adv)] (beta_vae = 0 in the paper's MNIST table)."""
    x = crops[0]
    x_adv = _attack(urkle_kl(model, x), x, hp, model)
    mu, logvar = model.encode(torch.cat([x, x_adv]))
    n = x.shape[0]
    recon = _bce(model.decode_logits(model.sample(mu[:n], logvar[:n])), x)
    zeros = torch.zeros_like(mu[:n])
    prior = gaussian_kl(mu[:n], logvar[:n], zeros, zeros, reduction="mean")
    kl = gaussian_kl(mu[:n], logvar[:n], mu[n:], logvar[n:], reduction="mean")
    loss = recon + hp.beta_vae * prior + beta * kl
    return loss, {"recon": recon.detach(), "prior_kl": prior.detach(), "urkle_kl": kl.detach()}


def ae_trades_loss(model, crops, labels, hp, beta):
    """Deterministic AE + TRADES-style term: BCE(h(g(x)), x) + beta * ||h(g(x_adv)) - h(g(x))||^2,
    x_adv maximising that distance."""
    x = crops[0]
    x_adv = _attack(ae_recon(model, x), x, hp, model)
    mu, _ = model.encode(torch.cat([x, x_adv]))
    logits = model.decode_logits(mu)
    n = x.shape[0]
    recon = _bce(logits[:n], x)
    r = torch.sigmoid(logits.float())
    dist = (r[n:] - r[:n]).pow(2).flatten(1).sum(1).mean()
    loss = recon + beta * dist
    return loss, {"recon": recon.detach(), "adv_dist": dist.detach()}


def standard_loss(model, crops, labels, hp, beta):
    """Supervised cross-entropy on clean inputs."""
    logits = model.logits(crops[0])
    loss = F.cross_entropy(logits.float(), labels)
    return loss, {"ce": loss.detach(), "acc": (logits.argmax(1) == labels).float().mean()}


def adversarial_training_loss(model, crops, labels, hp, beta):
    """Adversarial training (Madry): cross-entropy on PGD adversaries of the cross-entropy."""
    x = crops[0]
    x_adv = _attack(cross_entropy(model, labels), x, hp, model)
    logits = model.logits(x_adv)
    loss = F.cross_entropy(logits.float(), labels)
    return loss, {"ce_adv": loss.detach(), "acc_adv": (logits.argmax(1) == labels).float().mean()}


def trades_loss(model, crops, labels, hp, beta):
    """TRADES: CE(x) + beta * KL(p(y|x) || p(y|x_adv)), x_adv maximising that KL."""
    x = crops[0]
    x_adv = _attack(trades_kl(model, x), x, hp, model)
    logits = model.logits(torch.cat([x, x_adv])).float()
    n = x.shape[0]
    ce = F.cross_entropy(logits[:n], labels)
    logp, logq = F.log_softmax(logits[:n], 1), F.log_softmax(logits[n:], 1)
    kl = (logp.exp() * (logp - logq)).sum(1).mean()
    loss = ce + beta * kl
    return loss, {"ce": ce.detach(), "trades_kl": kl.detach()}


# ----------------------------------------------------------------------------------------------
# the registry

METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    if (method.inputs is None) == (method.per_sample is None):
        raise ValueError(f"method {method.name!r}: give exactly one of inputs (contrastive) or per_sample")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name]


_CONTRASTIVE_PRESETS = ("digits", "simclr")  # crops, flips, jitter (grey: no colour, small shifts)
_LIGHT_PRESETS = ("none", "light")  # the supervised and reconstruction baselines: flips and crops on colour only

# beta_robust defaults: SimCLR+Urkle 0.01, tuned on digits (the KL is in units of (delta mu / sigma)^2 and
# gets large; 0.1 and 1 collapsed the encoder); TRADES' 6 from its paper; VAE+Urkle and AE+TRADES 1 (their
# reconstruction terms are summed over pixels, hundreds of nats)
register(Method("simclr_urkle", "contrastive", 2, 4, 0.01, _CONTRASTIVE_PRESETS,
                "SimCLR + Urkle: NT-Xent over 2 crops and their 2 Urkle adversaries + beta * KL (paper Eq. 12)",
                inputs=_urkle_inputs, extra=ExtraTerm("urkle_kl", _urkle_kl_term, lambda B: 2 * B)))
register(Method("simclr", "contrastive", 2, 2, 0.0, _CONTRASTIVE_PRESETS,
                "plain SimCLR: NT-Xent over 2 crops", inputs=_simclr_inputs))
register(Method("rocl", "contrastive", 2, 3, 0.0, _CONTRASTIVE_PRESETS,
                "RoCL: the adversary of crop 1 against crop 2 joins as a third view", inputs=_rocl_inputs))
register(Method("vae_urkle", "vae", 1, 2, 1.0, _LIGHT_PRESETS,
                "VAE + Urkle: reconstruction + beta_vae * prior KL + beta * Urkle KL (paper Eq. 6)",
                per_sample=vae_urkle_loss))
register(Method("ae_trades", "ae", 1, 2, 1.0, _LIGHT_PRESETS,
                "deterministic auto-encoder + TRADES-style reconstruction distance", per_sample=ae_trades_loss))
register(Method("standard", "supervised", 1, 1, 0.0, _LIGHT_PRESETS, "supervised cross-entropy",
                per_sample=standard_loss))
register(Method("at", "supervised", 1, 1, 0.0, _LIGHT_PRESETS, "adversarial training (Madry et al.)",
                per_sample=adversarial_training_loss))
register(Method("trades", "supervised", 1, 2, 6.0, _LIGHT_PRESETS, "TRADES (Zhang et al.)",
                per_sample=trades_loss))
