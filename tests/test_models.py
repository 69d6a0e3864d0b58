"""The model protocol eval relies on, and the architectures of docs/MATH.md sec 1."""

import pytest
import torch
import torch.nn as nn

from urkle_fast.models import DETERMINISTIC_LOGVAR, GaussianHead, build_model
from urkle_fast.train import TrainConfig, resolve_config


def _cfg(method, dataset="digits", **kw):
    c = resolve_config(TrainConfig(method=method, dataset=dataset, **kw))
    c.num_classes = 10
    return vars(c)


@pytest.mark.parametrize("method,dataset,shape", [
    ("simclr_urkle", "digits", (1, 8, 8)), ("simclr", "mnist", (1, 28, 28)), ("rocl", "digits", (1, 8, 8)),
    ("vae_urkle", "mnist", (1, 28, 28)), ("ae_trades", "digits", (1, 8, 8)),
    ("standard", "digits", (1, 8, 8)), ("at", "mnist", (1, 28, 28)), ("trades", "digits", (1, 8, 8)),
])
def test_protocol(method, dataset, shape):
    model = build_model(_cfg(method, dataset)).eval()
    x = torch.rand(3, *shape)
    if model.kind == "supervised":
        assert model.logits(x).shape == (3, 10)
        return
    assert model.kind == "representation"
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (3, model.d_z)
    z = model.sample(mu, logvar)
    if method in ("simclr_urkle", "simclr", "rocl"):
        assert model.project(z).shape[0] == 3
    else:
        r = model.decode(z)
        assert r.shape == (3, *shape)
        if method == "vae_urkle":  # Bernoulli means; the squared-error AE decodes to its linear output
            assert 0 <= r.min() and r.max() <= 1
    if method in ("ae_trades", "simclr", "rocl"):  # the paper's baselines: z = mu, logvar ignored by sampling
        assert model.deterministic and torch.all(logvar == DETERMINISTIC_LOGVAR)
        assert isinstance(model.head, nn.Linear)
        assert model.sample(mu, logvar) is mu
        assert model.sample(mu, torch.zeros_like(logvar)) is mu
    else:
        assert not model.deterministic
        assert not torch.equal(model.sample(mu, logvar), mu)


def test_encoder_override_and_older_configs():
    """--encoder gaussian gives a Gaussian SimCLR (the pre-fix baseline); a config without "encoder" (older
    checkpoints) builds what it was trained with: Gaussian, except the auto-encoder."""
    cfg = _cfg("simclr", "digits", encoder="gaussian")
    assert cfg["encoder"] == "gaussian" and not build_model(cfg).deterministic
    assert resolve_config(TrainConfig(method="rocl", dataset="digits")).encoder == "deterministic"
    assert resolve_config(TrainConfig(method="simclr_urkle", dataset="digits")).encoder == "gaussian"
    old = {k: v for k, v in _cfg("simclr", "digits").items() if k != "encoder"}
    assert not build_model(old).deterministic
    old_ae = {k: v for k, v in _cfg("ae_trades", "digits").items() if k != "encoder"}
    assert build_model(old_ae).deterministic
    with pytest.raises(ValueError, match="--encoder"):
        resolve_config(TrainConfig(method="standard", dataset="digits", encoder="gaussian"))


def test_mnist_classifier_is_the_papers_three_layer_head():
    cfg = _cfg("standard", "mnist")
    model = build_model(cfg)
    assert cfg["classifier"] == "mlp3" and isinstance(model.classifier, nn.Sequential)
    assert sum(isinstance(m, nn.Linear) for m in model.classifier) == 3
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.classifier) == 2
    assert isinstance(build_model(_cfg("at", "digits")).classifier, nn.Linear)


@pytest.mark.parametrize("arch,d_z", [("resnet18", 512), ("resnet50", 2048)])
def test_resnet_cifar_stem(arch, d_z):
    model = build_model(_cfg("simclr_urkle", "cifar10", arch=arch, d_z=None)).eval()
    conv1 = model.backbone.conv1
    assert conv1.kernel_size == (3, 3) and conv1.stride == (1, 1)
    assert isinstance(model.backbone.maxpool, nn.Identity)
    assert model.d_z == d_z
    with torch.no_grad():
        mu, logvar = model.encode(torch.rand(2, 3, 32, 32))
    assert mu.shape == (2, d_z)


def test_imagenet_stem_keeps_maxpool():
    model = build_model(_cfg("simclr", "imagenet", arch="resnet18"))
    assert model.backbone.conv1.kernel_size == (7, 7) and not isinstance(model.backbone.maxpool, nn.Identity)


def test_mnist_encoder_and_decoder_follow_spec():
    model = build_model(_cfg("vae_urkle", "mnist"))
    convs = [m for m in model.backbone.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4 and all(c.kernel_size == (3, 3) for c in convs) and convs[-1].out_channels == 128
    assert any(isinstance(m, nn.AdaptiveAvgPool2d) for m in model.backbone.modules())
    assert model.d_z == 128
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in model.decoder.modules()) == 4


def test_gaussian_head_variance_param():
    h = torch.randn(64, 16) * 10
    soft = GaussianHead(16, 8, "softplus", sigma_min=0.05)
    _, logvar = soft(h)
    assert torch.all(torch.exp(0.5 * logvar) >= 0.05 - 1e-6)
    exp = GaussianHead(16, 8, "exp")
    _, logvar = exp(h)
    assert torch.isfinite(logvar).all()
    with pytest.raises(ValueError, match="variance"):
        GaussianHead(16, 8, "relu")


def test_normalisation_inside_the_model():
    cfg = _cfg("simclr_urkle", "digits")
    model = build_model(cfg).eval()
    x = torch.rand(4, 1, 8, 8)
    h = model.backbone((x - cfg["pixel_mean"][0]) / cfg["pixel_std"][0])
    torch.testing.assert_close(model.encode(x)[0], model.head(h)[0])


def test_unknown_family_method_and_arch():
    with pytest.raises(ValueError, match="unknown model family 'byol'"):
        build_model(dict(_cfg("simclr"), family="byol"))
    with pytest.raises(ValueError, match="unknown method 'byol'"):
        resolve_config(TrainConfig(method="byol"))
    with pytest.raises(ValueError, match="unknown arch"):
        build_model(dict(_cfg("simclr"), arch="vit"))
    with pytest.raises(ValueError, match="needs a decoder"):
        build_model(_cfg("vae_urkle", "cifar10"))


def test_gaussian_head_is_float32_under_bf16_autocast():
    """The KL of sigma-floor posteriors at |mu| ~ 8 stays within float32 tolerance of the autocast-off value
    (bf16 mu would misread it by a factor of several), and so does the method's Urkle KL on a digits model."""
    from urkle_fast.ops import gaussian_kl

    torch.manual_seed(0)
    head = GaussianHead(64, 16, sigma_min=0.01)
    with torch.no_grad():
        head.fc.weight.mul_(20)  # |mu| of several units
        head.fc.bias[16:].fill_(-8.0)  # softplus(-8) ~ 3e-4: sigma at its 0.01 floor
    h = torch.randn(32, 64)
    h_adv = h + 1e-3 * torch.randn_like(h)
    ref = gaussian_kl(*head(h), *head(h_adv), reduction="none")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mu, lv = head(h.bfloat16().float())  # a bf16 backbone hands over exactly these features
        mu_a, lv_a = head(h_adv)
        assert mu.dtype == lv.dtype == torch.float32
        got = gaussian_kl(mu, lv, mu_a, lv_a, reduction="none")
    assert ref.mean() > 1.0  # a KL that bf16 rounding of mu would swamp
    torch.testing.assert_close(gaussian_kl(*head(h.bfloat16().float()), mu_a, lv_a, reduction="none"), got)
    # and bf16-rounded mu (what the head returned before) is far off: the check can fail
    bad = gaussian_kl(mu.bfloat16().float(), lv, mu_a.bfloat16().float(), lv_a, reduction="none")
    assert (bad - ref).abs().mean() > 0.5 * ref.mean()
    model = build_model(_cfg("simclr_urkle")).eval()
    x = torch.rand(4, 1, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mu, lv = model.encode(x)
    assert mu.dtype == lv.dtype == torch.float32
