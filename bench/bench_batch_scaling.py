"""The batch-4096 path on the CPU: one SimCLR+Urkle training step at global batch 256, 1024 and 4096 with a fixed
micro-batch, through the trainer itself (its loader hands the step the uint8 batch, augmented chunk by chunk; the
gradient cache of urkle_fast.microbatch), against the cost model of the same encoder measured in isolation.

    URKLE_FAST_BENCH_SCALING=1 pytest bench/bench_batch_scaling.py --benchmark-only   # ~20 min on one core; CPU

Two cases (issue 11 item 3):

* ``cifar10-w16-32px``: CIFAR-10 (../shared/data/cifar10-jpeg), ResNet-18 at a quarter width (resnet18_w16, the
  CIFAR stem), 32 pixels, the training attack's 7 PGD steps, chunks of 256;
* ``imagenet-r18-64px``: the ``--dataset imagenet`` path on ../shared/data/tiny-imagenet-100, ResNet-18 (the ImageNet
  stem, as at 224 pixels), 64 pixels, 2 PGD steps (7 would take an hour per batch 4096 on one core), chunks of 256.

Per (case, batch), ``extra_info``: seconds for the step, images/s, peak resident memory of the process during
the step (VmHWM, reset just before the batch is read), and the cost model's prediction,

    (B / m) x (pgd_steps x t_attack + t_train),

t_attack: one forward and input-backward of the 2 views of m images (one PGD step on both views), t_train: one
forward and backward (parameters) of the 4-view batch of m images, both timed on the same encoder alone; the
ratio measured / predicted shows what the step costs beyond them (the gradient cache's extra forward of the 4
views, augmentation, the KL and NT-Xent, the optimiser-free rest). Peak memory should stay flat in B (within
1.5x from 256 to 4096) and the time per image constant (within 1.2x). The table goes to
bench/results/batch_scaling.md (URKLE_FAST_BENCH_OUT: another folder).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import pytest
import torch

from conftest import DEVICE, device_name
from urkle_fast.methods import LossParams, embed
from urkle_fast.microbatch import PeakResident
from urkle_fast.train import TrainConfig, forward_backward, setup

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MICRO = 256
BATCHES = (256, 1024, 4096)
CASES = {
    "cifar10-w16-32px": dict(dataset="cifar10", data_root=str(DATA / "cifar10-jpeg"), arch="resnet18_w16",
                             image_size=32, pgd_steps=7),
    "imagenet-r18-64px": dict(dataset="imagenet", data_root=str(DATA / "tiny-imagenet-100"), arch="resnet18",
                              stem="imagenet", image_size=64, pgd_steps=2),
}
ROWS: list[dict] = []

pytestmark = [
    pytest.mark.skipif(DEVICE != "cpu", reason="the CPU scaling study (GPU steps: bench_train_step.py)"),
    pytest.mark.skipif(os.environ.get("URKLE_FAST_BENCH_SCALING") != "1",
                       reason="about 20 minutes: URKLE_FAST_BENCH_SCALING=1 runs it"),
]


def _median_seconds(fn, repeats: int = 3) -> float:
    fn()  # warm-up: kernels' workspaces, allocator
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _cost_model(model, shape, m: int) -> tuple[float, float]:
    """(t_attack, t_train) of the encoder alone on m images: one PGD step's forward + input-backward of the 2 views,
    and the forward + backward of the 4-view batch."""
    C, S = shape[2], shape[3]
    g = torch.Generator().manual_seed(0)
    x2 = torch.rand(2 * m, C, S, S, generator=g)
    x4 = torch.rand(4 * m, C, S, S, generator=g)

    def attack():
        x = x2.clone().requires_grad_(True)
        _, mu, logvar = embed(model, x)
        torch.autograd.grad(mu.square().sum() + logvar.sum(), x)

    def train():
        model.zero_grad(set_to_none=True)
        p, _, _ = embed(model, x4)
        p.square().sum().backward()

    return _median_seconds(attack), _median_seconds(train)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("case", list(CASES))
def bench_batch_scaling(benchmark, case, batch, tmp_path):
    spec = CASES[case]
    if not Path(spec["data_root"]).is_dir():
        pytest.skip(f"{spec['data_root']} is not here (../shared/data)")
    cfg = TrainConfig(method="simclr_urkle", batch_size=batch, micro_batch=MICRO, max_steps=1, epochs=1,
                      warmup_epochs=0, beta_warmup_epochs=0, progress=False, num_workers=2, seed=0,
                      out_dir=str(tmp_path / "run"), **spec)
    run = setup(cfg)
    run.micro = MICRO  # the gradient cache at every batch, 256 included (the trainer runs 256 in one pass)
    hp = LossParams.of(run.cfg)
    meter = PeakResident()
    batches = iter(run.loader)
    state = {}

    def step():
        meter.reset()
        before = meter.now()
        crops, labels = next(batches)  # the uint8 batch (LazyViews): decoded by the loader's workers
        forward_backward(run, crops, labels, hp, run.cfg.beta_robust)
        state.update(peak=meter.peak(), before=before, shape=tuple(crops.shape[1:]))

    t0 = time.perf_counter()
    benchmark.pedantic(step, rounds=1, iterations=1, warmup_rounds=0)
    seconds = time.perf_counter() - t0
    run.log.close()
    C, S = state["shape"][1], state["shape"][2]
    t_attack, t_train = _cost_model(run.model, (None, None, C, S), MICRO)
    predicted = batch / MICRO * (run.cfg.pgd_steps * t_attack + t_train)
    row = dict(case=case, batch=batch, micro=MICRO, pgd_steps=run.cfg.pgd_steps, arch=run.cfg.arch,
               image_size=run.cfg.image_size, seconds=seconds, img_per_s=batch / seconds,
               peak_rss_gb=state["peak"] / 2**30, rss_before_gb=state["before"] / 2**30, t_attack=t_attack,
               t_train=t_train, predicted_s=predicted, ratio=seconds / predicted, device=device_name(),
               threads=torch.get_num_threads())
    benchmark.extra_info.update(row)
    ROWS.append(row)
    _write_table()


def _write_table() -> None:
    out = Path(os.environ.get("URKLE_FAST_BENCH_OUT") or Path(__file__).with_name("results")) / "batch_scaling.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"SimCLR+Urkle step on {ROWS[0]['device']}, chunks of {MICRO} images (bench/bench_batch_scaling.py)", "",
             "| case | batch | PGD steps | s / step | img/s | s / img vs batch 256 | peak RSS GB | vs batch 256 "
             "| cost model s | measured / model |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    first = {}
    for r in ROWS:
        base = first.setdefault(r["case"], r)
        per_img = (r["seconds"] / r["batch"]) / (base["seconds"] / base["batch"])
        lines.append(f"| {r['case']} | {r['batch']} | {r['pgd_steps']} | {r['seconds']:.1f} | {r['img_per_s']:.1f} | "
                     f"{per_img:.2f} | {r['peak_rss_gb']:.2f} | {r['peak_rss_gb'] / base['peak_rss_gb']:.2f} | "
                     f"{r['predicted_s']:.1f} | {r['ratio']:.2f} |")
    out.write_text("\n".join(lines) + "\n")
