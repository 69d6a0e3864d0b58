"""Micro-batched steps (urkle_fast.microbatch): the gradient of the whole batch from chunks.

Exactness is checked against the unchunked method loss (urkle_fast.methods) on the digits models:
with one chunk, bit-for-bit the same computation (real batch norm, real random starts and z
samples); with several chunks, on models whose batch norm is removed (chunked batch norm differs from
full-batch batch norm by design) and with a deterministic attack and z noise (a chunked attack draws
its random start in other pieces)."""

import pytest
import torch
import torch.nn as nn

from urkle_fast import methods as methods_mod
from urkle_fast.methods import METHODS as REGISTRY, LossParams, get_method
from urkle_fast import microbatch
from urkle_fast.data import MultiViewAugment, as_tensors, load_dataset
from urkle_fast.models import RepresentationModel, build_model
from urkle_fast.train import TrainConfig, resolve_config, train

# every contrastive method of the registry (the gradient cache) and the per-sample families
CONTRASTIVE = sorted(m.name for m in REGISTRY.values() if m.contrastive)
METHODS = CONTRASTIVE + ["at", "vae_urkle", "trades"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _setup(method, B=10, seed=0):
    cfg = resolve_config(TrainConfig(method=method, dataset="digits", eps=0.1, pgd_steps=2, pgd_alpha=0.05,
                                     beta_robust=0.5 if method != "trades" else 6.0))
    cfg.num_classes = 10
    torch.manual_seed(seed)
    model = build_model(vars(cfg)).train()
    x, y = as_tensors(load_dataset("digits", split="train"), limit=B)
    views = MultiViewAugment(get_method(method).crops_per_image, 8, cfg.augment)(x, torch.Generator().manual_seed(seed))
    return cfg, model, views, y


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _direct(model, method, views, y, cfg):
    model.zero_grad(set_to_none=True)
    loss, metrics = get_method(method).loss(model, views, y, LossParams.of(cfg), cfg.beta_robust)
    loss.backward()
    return loss.detach(), metrics, _grads(model)


def _chunked(model, method, views, y, cfg, micro):
    model.zero_grad(set_to_none=True)
    loss, metrics = microbatch.micro_batched_step(model, get_method(method), views, y, LossParams.of(cfg),
                                                  cfg.beta_robust, micro)
    return loss, metrics, _grads(model)


@pytest.mark.parametrize("method", METHODS)
def test_one_chunk_is_the_method_itself(method):
    """micro >= B: same loss, gradients and batch-norm buffers as the method (same random draws),
    so step (2) left the running statistics alone and step (4) replayed step (2)'s z samples."""
    cfg, model, views, y = _setup(method)
    clone = build_model(vars(cfg)).train()
    clone.load_state_dict(model.state_dict())
    torch.manual_seed(5)
    loss_a, met_a, g_a = _direct(model, method, views, y, cfg)
    torch.manual_seed(5)
    loss_b, met_b, g_b = _chunked(clone, method, views, y, cfg, micro=views.shape[1])
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=1e-6)
    assert met_a.keys() == met_b.keys()
    assert g_a.keys() == g_b.keys() and len(g_a) > 0
    for n in g_a:
        torch.testing.assert_close(g_b[n], g_a[n], atol=1e-6, rtol=1e-5, msg=lambda m: f"{n}: {m}")
    for (n, a), (_, b) in zip(model.named_buffers(), clone.named_buffers()):
        torch.testing.assert_close(b, a, atol=1e-7, rtol=1e-6, msg=lambda m: f"buffer {n}: {m}")


def _without_batch_norm(model: nn.Module) -> nn.Module:
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, nn.Identity())
        else:
            _without_batch_norm(child)
    return model


@pytest.mark.parametrize("method", METHODS)
def test_chunks_give_the_gradient_of_the_whole_batch(method, monkeypatch):
    cfg, model, views, y = _setup(method, B=10)
    _without_batch_norm(model)

    def attack(objective, x, hp, model, eot=1):  # deterministic and elementwise: chunking cannot change it
        return (x + hp.eps * torch.sign(torch.sin(997.0 * x + 0.3))).clamp(0, 1)

    monkeypatch.setattr(methods_mod, "_attack", attack)
    monkeypatch.setattr(RepresentationModel, "sample",
                        staticmethod(lambda mu, logvar: mu + torch.exp(0.5 * logvar) * torch.sin(131.0 * mu)))
    loss_a, met_a, g_a = _direct(model, method, views, y, cfg)
    loss_b, met_b, g_b = _chunked(model, method, views, y, cfg, micro=4)  # chunks of 4, 4 and 2
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=1e-5)
    for k in met_a:
        torch.testing.assert_close(torch.as_tensor(met_b[k]).float(), met_a[k].float(), atol=1e-5, rtol=1e-5)
    assert g_a.keys() == g_b.keys() and len(g_a) > 0
    for n in g_a:
        torch.testing.assert_close(g_b[n], g_a[n], atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")
    # and a chunk-local NT-Xent (plain accumulation) would NOT give that gradient: the test can fail
    if get_method(method).contrastive:
        model.zero_grad(set_to_none=True)
        for sl in microbatch.chunks(10, 4):
            loss, _ = get_method(method).loss(model, views[:, sl], y[sl], LossParams.of(cfg), cfg.beta_robust)
            (loss * (sl.stop - sl.start) / 10).backward()
        wrong = _grads(model)
        assert any(not torch.allclose(wrong[n], g_a[n], atol=1e-5, rtol=1e-4) for n in g_a)


def test_chunks_argument_errors():
    assert microbatch.chunks(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="micro_batch must be a positive int"):
            microbatch.chunks(10, bad)
    cfg, model, views, y = _setup("simclr")
    with pytest.raises(TypeError, match="must be a urkle_fast.methods.Method"):
        microbatch.micro_batched_step(model, "simclr", views, y, LossParams.of(cfg), 0.0, 4)


TINY = dict(dataset="digits", train_subset=96, batch_size=32, epochs=1, pgd_steps=2, warmup_epochs=1,
            progress=False, log_every=1, threads=1)


def test_trainer_micro_batch(tmp_path):
    """--micro-batch in the trainer: runs, logs finite losses; a micro batch >= the batch is a no-op."""
    full = train(TrainConfig(out_dir=str(tmp_path / "full"), **TINY))
    same = train(TrainConfig(out_dir=str(tmp_path / "same"), micro_batch=32, **TINY))
    a, b = full["model"].state_dict(), same["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    chunked = train(TrainConfig(out_dir=str(tmp_path / "chunked"), micro_batch=12, **TINY))
    assert chunked["step"] == 3 and torch.isfinite(torch.tensor(chunked["loss"]))
    c = chunked["model"].state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)  # batch norm saw chunks of 12 + 12 + 8
    with pytest.raises(ValueError, match="--micro-batch must be an integer >= 1, got 0"):
        train(TrainConfig(out_dir=str(tmp_path / "bad"), micro_batch=0, **TINY))
