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
from urkle_fast.ops.nt_xent import nt_xent_column_detached

Metrics = dict[str, Tensor]


@dataclass(frozen=True)
class LossParams:
    """What the losses read besides the model and the data (built once per run from the TrainConfig)."""

    eps: float  # l_inf (or l2) radius of the training attacks, [0, 1] pixels
    pgd_alpha: float
    pgd_steps: int
    norm: str = "linf"
    eot: int = 1  # z samples averaged per RoCL attack step (a Gaussian RoCL encoder, --encoder gaussian)
    temperature: float = 0.5
    denominator: str = "all"
    beta_vae: float = 0.0  # weight of KL[p(z|x) || N(0, I)] in VAE+Urkle
    detach_columns: bool = False  # RoCL's official similarity: gradients through the rows of S = P P^T only

    @classmethod
    def of(cls, cfg: Any) -> "LossParams":
        """From anything with these attributes (a resolved urkle_fast.train.TrainConfig)."""
        return cls(eps=cfg.eps, pgd_alpha=cfg.pgd_alpha, pgd_steps=cfg.pgd_steps, norm=cfg.norm, eot=cfg.eot,
                   temperature=cfg.temperature, denominator=cfg.denominator, beta_vae=cfg.beta_vae,
                   detach_columns=bool(getattr(cfg, "detach_columns", False)))


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
    # the loss over the projections P [V * B, d] of every row (view-major) when it is not plain NT-Xent:
    # contrast(P, V, hp, beta) -> (loss, metrics); RoCL adds its official 1/256-weighted term here
    contrast: Optional[Callable[[Tensor, int, LossParams, float], tuple[Tensor, Metrics]]] = None
    encoder: str = "gaussian"  # p(z|x): gaussian, or deterministic (z = mu; the paper's SimCLR, RoCL, AE)
    alpha_rule: float = 2.5  # training PGD step when --pgd-alpha is not given: alpha_rule * eps / steps
    urkle: bool = False  # the loss holds KL[p(z|x) || p(z|x_adv)]: a Gaussian encoder is required

    @property
    def ramp(self) -> bool:
        """beta_robust ramps in over --beta-warmup-epochs by default: an Urkle choice, not the baselines'."""
        return self.urkle

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
        con, metrics = self.contrast_loss(p, V, hp, beta)
        if self.extra is None:
            return con, metrics
        term = self.extra.fn(mu, logvar, "mean")
        return con + beta * term, {**metrics, self.extra.name: term.detach()}

    def contrast_loss(self, p: Tensor, V: int, hp: LossParams, beta: float) -> tuple[Tensor, Metrics]:
        """The loss that couples the rows: NT-Xent over the V views (global under torch.distributed), or
        the method's ``contrast``. The gradient cache calls this on the projections of every chunk."""
        if self.contrast is not None:
            return self.contrast(p, V, hp, beta)
        con = contrastive(p, V, hp)
        return con, {"nt_xent": con.detach()}


def contrastive(p: Tensor, V: int, hp: LossParams) -> Tensor:
    """NT-Xent over V views of p [V * B, d]: the fused op gathered over ranks, with hp.detach_columns RoCL's
    column-detached similarity."""
    if hp.detach_columns:
        return nt_xent_column_detached(p, views=V, temperature=hp.temperature, denominator=hp.denominator,
                                       gather_distributed=True)
    return nt_xent(p, views=V, temperature=hp.temperature, denominator=hp.denominator, gather_distributed=True)


def embed(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(projection of one z sample (z = mu for a deterministic encoder), mu, logvar) per row of x."""
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
    """The adversary of view 1 maximises its NT-Xent against view 2 (RoCL's attack_to = other; EOT over z
    samples when the encoder is Gaussian and eot > 1) and joins the two views as a third positive."""
    x1, x2 = crops[0], crops[1]
    objective = rocl_nt_xent(model, x2, hp.temperature, detach_columns=hp.detach_columns)
    return torch.cat([x1, x2, _attack(objective, x1, hp, model, eot=hp.eot)]), 3


def _rocl_contrast(p, V, hp, beta):
    """RoCL's official loss (Kim et al. 2020, rocl_train.py + attack_lib.py, defaults): the 3-view NT-Xent
    summed over each row's 2 positives (our NT-Xent averages them: x (V - 1)), plus (1 / lamda) times the
    NT-Xent of the adversary against the other view (regularize_to = other), lamda = 256: beta = 1/256."""
    B = p.shape[0] // V
    con = (V - 1) * contrastive(p, V, hp)
    adv = contrastive(p[B:], 2, hp)  # rows [view 2; adversaries]: a 2-view batch
    return con + beta * adv, {"nt_xent": con.detach(), "rocl_adv": adv.detach()}


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
    """Deterministic AE + TRADES-style term (paper Eq. 35/36): ||h(g(x)) - x||^2 + beta * ||h(g(x_adv)) -
    h(g(x))||^2, both squared errors summed over pixels (so the two terms share units), x_adv maximising
    the second. Clean and adversarial inputs go through separate passes (batch norm sees each alone)."""
    x = crops[0]
    x_adv = _attack(ae_recon(model, x), x, hp, model)
    r = model.decode(model.encode(x)[0]).float()
    r_adv = model.decode(model.encode(x_adv)[0]).float()
    recon = (r - x.float()).pow(2).flatten(1).sum(1).mean()
    dist = (r_adv - r).pow(2).flatten(1).sum(1).mean()
    loss = recon + beta * dist
    return loss, {"recon_se": recon.detach(), "adv_dist": dist.detach()}


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
    """TRADES: CE(x) + beta * KL(p(y|x) || p(y|x_adv)), x_adv maximising that KL (Zhang et al. 2019)."""
    x = crops[0]
    x_adv = _attack(trades_kl(model, x), x, hp, model)
    # two passes, as the official TRADES code: one joint pass would mix clean and adversarial batch statistics
    logits, logits_adv = model.logits(x).float(), model.logits(x_adv).float()
    ce = F.cross_entropy(logits, labels)
    logp, logq = F.log_softmax(logits, 1), F.log_softmax(logits_adv, 1)
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
    if method.contrast is not None and method.inputs is None:
        raise ValueError(f"method {method.name!r}: contrast is the loss of a contrastive method (give inputs too)")
    if method.urkle and method.encoder != "gaussian":
        raise ValueError(f"method {method.name!r}: the Urkle KL needs encoder='gaussian'")
    if method.encoder not in ("gaussian", "deterministic"):
        raise ValueError(f"method {method.name!r}: encoder must be 'gaussian' or 'deterministic', got {method.encoder!r}")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name]


_CONTRASTIVE_PRESETS = ("digits", "simclr")  # crops, flips, jitter (grey: no colour, small shifts)
_LIGHT_PRESETS = ("none", "light")  # the supervised and reconstruction baselines: flips and crops on colour only

# beta_robust defaults: SimCLR+Urkle 0.01, tuned on digits (the KL is in units of (delta mu / sigma)^2 and
# gets large; 0.1 and 1 collapsed the encoder); RoCL 1/256, its official lamda; TRADES' 6 from its paper;
# VAE+Urkle and AE+TRADES 1 (their reconstruction terms are summed over pixels). Only the Urkle methods ramp
# beta in by default. SimCLR, RoCL and the AE are deterministic: the paper's probabilistic network "only
# differs in the last layer". RoCL's training attack: its official 7 steps of 0.007 at eps 8/255, i.e.
# alpha = 1.5617 * eps / steps.
_ROCL_ALPHA_RULE = 0.007 * 7 / (8 / 255)
register(Method("simclr_urkle", "contrastive", 2, 4, 0.01, _CONTRASTIVE_PRESETS,
                "SimCLR + Urkle: NT-Xent over 2 crops and their 2 Urkle adversaries + beta * KL (paper Eq. 12)",
                inputs=_urkle_inputs, extra=ExtraTerm("urkle_kl", _urkle_kl_term, lambda B: 2 * B),
                urkle=True))
register(Method("simclr", "contrastive", 2, 2, 0.0, _CONTRASTIVE_PRESETS,
                "plain SimCLR: NT-Xent over 2 crops, deterministic encoder", inputs=_simclr_inputs,
                encoder="deterministic"))
register(Method("rocl", "contrastive", 2, 3, 1 / 256, _CONTRASTIVE_PRESETS,
                "RoCL (official code's loss and attack): the adversary of crop 1 against crop 2 joins as a third "
                "view, + 1/256 x its NT-Xent against crop 2", inputs=_rocl_inputs, contrast=_rocl_contrast,
                encoder="deterministic", alpha_rule=_ROCL_ALPHA_RULE))
register(Method("vae_urkle", "vae", 1, 2, 1.0, _LIGHT_PRESETS,
                "VAE + Urkle: reconstruction + beta_vae * prior KL + beta * Urkle KL (paper Eq. 6)",
                per_sample=vae_urkle_loss, urkle=True))
register(Method("ae_trades", "ae", 1, 2, 1.0, _LIGHT_PRESETS,
                "deterministic auto-encoder + TRADES-style reconstruction distance (paper Eq. 35/36)",
                per_sample=ae_trades_loss, encoder="deterministic"))
register(Method("standard", "supervised", 1, 1, 0.0, _LIGHT_PRESETS, "supervised cross-entropy",
                per_sample=standard_loss))
register(Method("at", "supervised", 1, 1, 0.0, _LIGHT_PRESETS, "adversarial training (Madry et al.)",
                per_sample=adversarial_training_loss))
register(Method("trades", "supervised", 1, 2, 6.0, _LIGHT_PRESETS, "TRADES (Zhang et al.)",
                per_sample=trades_loss))
