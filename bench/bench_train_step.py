"""One SimCLR+Urkle training step (Urkle PGD on both views, one encoder forward over the 4-view batch,
NT-Xent(V=4) + beta * KL, backward, LARS step), three variants on the same model and batch:

* ``fused``    -- the fused ops on their default backend (C++ on the CPU, Triton on CUDA), eager model;
* ``eager``    -- the same step with every op forced to its pure-torch reference;
* ``compiled`` -- the fused ops with the model's submodules torch.compile'd, as the trainer does on CUDA.

CPU: the digits encoder at batch 256 (the default main job's step). CUDA: ResNet-18 with the CIFAR stem,
32-pixel inputs, batch 512, bfloat16 autocast and channels_last, 7 PGD steps (the CIFAR recipe).
``extra_info["img_per_s"]`` is the batch size over the median step time.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import DEVICE, run_case
from urkle_fast import use_backend
from urkle_fast.methods import LossParams, get_method
from urkle_fast.models import build_model
from urkle_fast.optim import make_optimizer
from urkle_fast.train import TrainConfig, compile_model, resolve_config

CASES = {
    "cpu": [dict(dataset="digits", batch_size=256, pgd_steps=5)],
    "cuda": [dict(dataset="cifar10", batch_size=512, pgd_steps=7)],
}[DEVICE]


def _setup(case: dict):
    cfg = resolve_config(TrainConfig(method="simclr_urkle", progress=False, beta_warmup_epochs=0, **case))
    cfg.num_classes = 10
    torch.manual_seed(0)
    model = build_model(vars(cfg)).to(DEVICE)
    g = torch.Generator().manual_seed(0)
    views = torch.rand(2, cfg.batch_size, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g).to(DEVICE)
    if DEVICE == "cuda":
        model = model.to(memory_format=torch.channels_last)
        views = views.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(views.shape)
    return cfg, model, views


@pytest.mark.parametrize("case", CASES, ids=[f"{c['dataset']}-B{c['batch_size']}" for c in CASES])
def bench_train_step(benchmark, variant, case):
    cfg, model, views = _setup(case)
    model = copy.deepcopy(model).train()
    if variant == "compiled":
        compile_model(model, "inductor")
    opt = make_optimizer(cfg, model)
    amp = DEVICE == "cuda"
    method, hp = get_method("simclr_urkle"), LossParams.of(cfg)

    def step():
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=amp):
            loss, _ = method.loss(model, views, None, hp, cfg.beta_robust)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    def call():
        if variant == "eager":
            with use_backend("reference"):
                return step()
        return step()

    run_case(benchmark, op="train_step", mode="simclr_urkle", case=f"{cfg.dataset} {cfg.arch} B={cfg.batch_size} "
             f"pgd={cfg.pgd_steps}", variant=variant, fn=call, dtype=torch.bfloat16 if amp else torch.float32,
             shape=tuple(views.shape))
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.median:
        benchmark.extra_info["img_per_s"] = cfg.batch_size / stats.stats.median
