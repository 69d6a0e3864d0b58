"""Models and the protocol every checkpoint follows (what eval relies on).

Every model is an nn.Module with ``kind`` in {"representation", "supervised"} and takes x in [0, 1]
NCHW (pixel normalisation happens inside, so attack epsilons are in [0, 1] pixels).

* representation: ``encode(x) -> (mu, logvar)``, each [B, d_z] (p(z|x)); ``d_z``; ``deterministic``
  (True for SimCLR, RoCL and the auto-encoder of AE+TRADES: a linear last layer, logvar the constant
  DETERMINISTIC_LOGVAR, and ``sample`` returns mu); ``sample(mu, logvar)``; SimCLR-type models also ``project(z)``,
  VAE / AE models also ``decode(z)`` (pixel means in [0, 1] for the VAE; the squared-error AE's linear output,
  config ``decoder_output``) and ``decode_logits(z)``.
* supervised: ``logits(x) -> [B, num_classes]``; ``forward = logits``.

``build_model(config)`` rebuilds a model from a resolved training config dict (checkpoint["config"]):
its ``family`` (contrastive, vae, ae or supervised: the method registry says which a method needs)
and its architecture, its ``encoder`` (gaussian or deterministic) and, for classifiers, its ``classifier``
head (linear or mlp3). Models know families, never method names.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.nn as nn

from .backbones import DigitsConv, DigitsDecoder, MNISTConv, MNISTDecoder, NarrowResNet, resnet
from .heads import GaussianHead, Normalize, Projector, make_head

__all__ = [
    "RepresentationModel", "SupervisedModel", "GaussianHead", "Projector", "Normalize", "build_model",
    "FAMILIES", "ARCH_D_Z", "DETERMINISTIC_LOGVAR",
]

DETERMINISTIC_LOGVAR = -20.0  # sigma = exp(-10) ~ 4.5e-5: z = mu for every practical purpose

FAMILIES = ("contrastive", "vae", "ae", "supervised")  # what a method needs (urkle_fast.methods.Method.family)
# backbone -> d_z when the config leaves it open (the feature width of the ResNets; small for the conv nets)
ARCH_D_Z = {"resnet18": 512, "resnet50": 2048, "resnet18_w16": 128, "resnet18_w32": 256, "mnist_conv": 128,
            "digits_conv": 64}


def _backbone(arch: str, in_channels: int, stem: str) -> tuple[nn.Module, int]:
    if arch == "resnet18":
        return resnet(18, in_channels, stem)
    if arch == "resnet50":
        return resnet(50, in_channels, stem)
    if arch in ("resnet18_w16", "resnet18_w32"):
        net = NarrowResNet(int(arch.rsplit("_w", 1)[1]), in_channels, stem)
        return net, net.feat_dim
    if arch == "mnist_conv":
        return MNISTConv(in_channels), MNISTConv.feat_dim
    if arch == "digits_conv":
        return DigitsConv(in_channels), DigitsConv.feat_dim
    raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCH_D_Z)}")


class RepresentationModel(nn.Module):
    """Encoder x -> p(z|x) = N(mu, diag(exp(logvar))), with an optional projector or decoder."""

    kind = "representation"

    def __init__(self, backbone: nn.Module, feat_dim: int, d_z: int, mean, std, *, variance: str = "softplus",
                 sigma_min: float = 1e-2, projector: Optional[nn.Module] = None,
                 decoder: Optional[nn.Module] = None, deterministic: bool = False, decoder_output: str = "sigmoid"):
        super().__init__()
        if decoder_output not in ("sigmoid", "linear"):
            raise ValueError(f"decoder_output must be 'sigmoid' or 'linear', got {decoder_output!r}")
        self.d_z, self.deterministic, self.decoder_output = d_z, deterministic, decoder_output
        self.normalize = Normalize(mean, std)
        self.backbone = backbone
        self.head = nn.Linear(feat_dim, d_z) if deterministic else GaussianHead(feat_dim, d_z, variance, sigma_min)
        self.projector = projector
        self.decoder = decoder

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, C, H, W] in [0, 1] -> (mu, logvar), each [B, d_z]."""
        h = self.backbone(self.normalize(x)).flatten(1)
        if self.deterministic:
            with torch.autocast(device_type=h.device.type, enabled=False):  # float32, as GaussianHead's
                mu = self.head(h.float())
            return mu, torch.full_like(mu, DETERMINISTIC_LOGVAR)
        return self.head(h)

    forward = encode

    def sample(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """Reparameterised z = mu + sigma * eps; a deterministic encoder returns mu itself (logvar ignored)."""
        if self.deterministic:
            return mu
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def project(self, z: torch.Tensor) -> torch.Tensor:
        if self.projector is None:
            raise AttributeError("this model has no projector (not a SimCLR-type model)")
        return self.projector(z)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        if self.decoder is None:
            raise AttributeError("this model has no decoder (not a VAE / AE)")
        return self.decoder(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, d_z] -> reconstruction [B, C, H, W]: Bernoulli means in [0, 1] (sigmoid output, the VAE's), or
        the decoder's linear output (the squared-error auto-encoder's: a sigmoid would saturate and stall it)."""
        out = self.decode_logits(z)
        return torch.sigmoid(out) if self.decoder_output == "sigmoid" else out


class SupervisedModel(nn.Module):
    """Classifier x -> logits; the backbone is the same as the representation models'."""

    kind = "supervised"

    def __init__(self, backbone: nn.Module, feat_dim: int, num_classes: int, mean, std, classifier: str = "linear"):
        super().__init__()
        self.num_classes = num_classes
        self.normalize = Normalize(mean, std)
        self.backbone = backbone
        # the same classifier as the representation models' downstream head (the paper's MNIST: three FC layers)
        self.classifier = make_head(classifier, feat_dim, num_classes)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(self.normalize(x)).flatten(1))

    forward = logits


def build_model(config: Mapping[str, Any]) -> nn.Module:
    """Build the model a resolved training config describes (keys: family, arch, stem, in_channels,
    num_classes, d_z, variance, sigma_min, proj_hidden, proj_dim, pixel_mean, pixel_std)."""
    family = config.get("family")
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES} (a resolved training config "
                         f"names it; see urkle_fast.train.resolve_config)")
    arch = config["arch"]
    in_ch = int(config.get("in_channels", 3))
    mean, std = config["pixel_mean"], config["pixel_std"]
    backbone, feat_dim = _backbone(arch, in_ch, config.get("stem", "cifar"))
    if family == "supervised":
        return SupervisedModel(backbone, feat_dim, int(config["num_classes"]), mean, std,
                               classifier=config.get("classifier") or "linear")
    d_z = int(config["d_z"])
    kw = dict(variance=config.get("variance", "softplus"), sigma_min=float(config.get("sigma_min", 1e-2)))
    # checkpoints written before configs named the encoder: only the auto-encoder was deterministic
    encoder = config.get("encoder") or ("deterministic" if family == "ae" else "gaussian")
    if encoder not in ("gaussian", "deterministic"):
        raise ValueError(f"unknown encoder {encoder!r}; expected 'gaussian' or 'deterministic'")
    if family == "contrastive":
        proj = Projector(d_z, int(config["proj_hidden"]), int(config["proj_dim"]))
        return RepresentationModel(backbone, feat_dim, d_z, mean, std, projector=proj,
                                   deterministic=(encoder == "deterministic"), **kw)
    decoders = {"mnist_conv": MNISTDecoder, "digits_conv": DigitsDecoder}
    if arch not in decoders:
        raise ValueError(f"model family {family!r} needs a decoder; available for arch mnist_conv or digits_conv, "
                         f"not {arch!r}")
    decoder = decoders[arch](d_z, in_ch)
    return RepresentationModel(backbone, feat_dim, d_z, mean, std, decoder=decoder,
                               deterministic=(encoder == "deterministic"),
                               decoder_output=config.get("decoder_output") or "sigmoid", **kw)
