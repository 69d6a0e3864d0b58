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


def _setup(method, B=10, seed=0, **extra):
    cfg = resolve_config(TrainConfig(method=method, dataset="digits", eps=0.1, pgd_steps=2, pgd_alpha=0.05,
                                     beta_robust=0.5 if method != "trades" else 6.0, **extra))
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


@pytest.mark.parametrize("micro", [10, 4])
def test_chunks_keep_rocls_official_similarity(micro, monkeypatch):
    """RoCL with --detach-columns (S = P P.detach()^T: the gradient through the rows only, in the loss and the
    attack) through the gradient cache, in one chunk and in chunks of 4, 4 and 2: the whole batch's gradient of
    that loss, which is not the gradient of the plain similarity."""
    monkeypatch.setattr(RepresentationModel, "sample",
                        staticmethod(lambda mu, logvar: mu + torch.exp(0.5 * logvar) * torch.sin(131.0 * mu)))
    if micro < 10:  # chunked attacks draw their random starts in other pieces: a fixed attack then
        def attack(objective, x, hp, model, eot=1):
            return (x + hp.eps * torch.sign(torch.sin(997.0 * x + 0.3))).clamp(0, 1)

        monkeypatch.setattr(methods_mod, "_attack", attack)
    cfg, model, views, y = _setup("rocl", detach_columns=True)
    _without_batch_norm(model)
    torch.manual_seed(3)
    loss_a, _, g_a = _direct(model, "rocl", views, y, cfg)
    torch.manual_seed(3)  # one chunk: the same random starts as the whole batch's attack
    loss_b, _, g_b = _chunked(model, "rocl", views, y, cfg, micro=micro)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=1e-5)
    assert g_a.keys() == g_b.keys() and len(g_a) > 0
    for n in g_a:
        torch.testing.assert_close(g_b[n], g_a[n], atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")
    plain = _setup("rocl")[0]  # the same batch without the detach: another gradient
    torch.manual_seed(3)
    _, _, g_plain = _chunked(model, "rocl", views, y, plain, micro=micro)
    assert any(not torch.allclose(g_plain[n], g_a[n], atol=1e-5, rtol=1e-4) for n in g_a)


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
    for bad in (0, -3, "half", True):
        with pytest.raises(ValueError, match="--micro-batch must be auto or an integer >= 1, got"):
            train(TrainConfig(out_dir=str(tmp_path / "bad"), micro_batch=bad, **TINY))
    assert TrainConfig().micro_batch == "auto"


# ----------------------------------------------------------------------------------------------
# the uint8 batch augmented chunk by chunk, progress inside a step, --micro-batch auto


# sums of MultiViewAugment(3, 16, preset) on the test's batch, computed with the implementation before LazyViews
# (commit 452002a): a change in the order of the random draws changes every run's crops, and shows here
GOLDEN = {"simclr": 15577.291878096352, "digits": 14991.260607068427, "light": 15029.786817422835,
          "none": 15037.816231559962}


@pytest.mark.parametrize("preset", ["simclr", "digits", "light", "none"])
def test_lazy_views_are_the_whole_batch_views(preset):
    """LazyViews draws every image's parameters at once, so any chunking gives exactly the whole batch's views
    (bit for bit), while the batch itself stays uint8."""
    from urkle_fast.data import LazyViews

    x = torch.randint(0, 256, (13, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    aug = MultiViewAugment(3, 16, preset)
    full = aug(x, torch.Generator().manual_seed(5))
    lazy = aug.lazy(x, torch.Generator().manual_seed(5))
    assert isinstance(lazy, LazyViews) and lazy.images.dtype == torch.uint8 and lazy.shape == full.shape
    parts = torch.cat([lazy[:, 0:4], lazy[:, 4:11], lazy[:, 11:13]], dim=1)
    assert parts.dtype == torch.float32 and torch.equal(parts, full)
    lazy.channels_last = True
    assert torch.equal(lazy[:, 2:5], full[:, 2:5]) and lazy[:, 2:5].flatten(0, 1).is_contiguous(
        memory_format=torch.channels_last)
    assert float(full.double().sum()) == pytest.approx(GOLDEN[preset], rel=1e-6)  # the draws of earlier versions
    for bad in (0, slice(0, 4), (slice(None), 3), (slice(None), slice(0, 8, 2))):
        with pytest.raises(TypeError, match=r"LazyViews takes views\[:, i:j\]"):
            lazy[bad]


def test_trainer_batches_stay_uint8(tmp_path):
    """The trainer's torch loader hands the step the decoded uint8 batch (LazyViews), not float views."""
    from urkle_fast.data import LazyViews
    from urkle_fast.data.loader import make_train_loader

    ds = load_dataset("digits", split="train")
    loader = make_train_loader("torch", ds, batch_size=32, views=2, size=8, preset="digits", seed=0,
                               device=torch.device("cpu"), rank=0, world=1, num_workers=0, position=0, lazy=True)
    crops, labels = next(iter(loader))
    assert isinstance(crops, LazyViews) and crops.shape == (2, 32, 1, 8, 8) and labels.shape == (32,)
    eager = make_train_loader("torch", ds, batch_size=32, views=2, size=8, preset="digits", seed=0,
                              device=torch.device("cpu"), rank=0, world=1, num_workers=0, position=0)
    assert torch.equal(next(iter(eager))[0], crops.materialize())


@pytest.mark.parametrize("method", ["simclr_urkle", "at"])
def test_progress_inside_a_micro_batched_step(method):
    """on_chunk is called after every chunk (twice per chunk for the gradient cache: the attack pass, then the
    backward pass), and the images it reports add up to the batch; RunLog shows "chunk i/n" on the bar."""
    from urkle_fast.runlog import RunLog

    cfg, model, views, y = _setup(method)
    calls = []
    microbatch.micro_batched_step(model, get_method(method), views, y, LossParams.of(cfg), cfg.beta_robust, 4,
                                  on_chunk=lambda *a: calls.append(a))
    n = 3  # chunks of 4, 4 and 2
    total = 2 * n if get_method(method).contrastive else n
    assert [c[:2] for c in calls] == [(i, total) for i in range(1, total + 1)] and sum(c[2] for c in calls) == 10
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        log = RunLog(Path(d), main_rank=True, log_every=1, start_step=0, end_step=1, desc="t", progress=True)
        for c in calls:
            log.chunk(*c)
        assert f"chunk {total}/{total}" in log.pbar.postfix and "img/s" in log.pbar.postfix
        log.close()


def _capped(tmp_path, name, cap_mb, *flags, whole_batch_first=False):
    """The trainer on _SCALED + flags, under a real address-space cap of cap_mb (tests/memory_cap.py; None: no
    cap, through the same harness, so that both runs take the same convolution kernels); (exit code, stderr, the loss
    of every step)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / name
    train_argv = [*_SCALED, "--out-dir", str(out), *flags]
    cmd = [sys.executable, str(Path(__file__).with_name("memory_cap.py")), "none" if cap_mb is None else str(cap_mb),
           *(["--whole-batch-first"] if whole_batch_first else []), "--", *train_argv]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = out / "metrics.jsonl"
    losses = [json.loads(ln)["loss"] for ln in metrics.read_text().splitlines()] if metrics.exists() else []
    return p.returncode, p.stderr, losses


# digits upscaled to 32 px: a step of 256 images needs ~1.2 GB, so that a 300 MB cap does not hold it
_SCALED = ["--dataset", "digits", "--image-size", "32", "--batch", "256", "--max-steps", "2", "--threads", "1",
           "--num-workers", "0", "--no-progress", "--log-every", "1"]


def _chosen(err):
    """The chunk the run ended with: its estimate, or the last halving after it (the address-space cap counts virtual
    memory, which can outgrow the resident memory the estimate measures)."""
    import re

    found = re.findall(r"--micro-batch auto: (\d+) images per chunk|step \d+ again with (\d+)", err)
    return int(next(v for v in found[-1] if v)) if found else None


def test_micro_batch_auto_fits_a_memory_cap(tmp_path):
    """Under a real 300 MB address-space cap the whole batch (about 1.2 GB) cannot run: auto estimates a chunk
    that fits from its probe steps, says which, and trains with exactly the losses of that fixed --micro-batch. The
    choice is kept in the checkpoint: the run resumed without the cap keeps those chunks (no new probes), so its
    next step is the fixed run's too."""
    rc, err, losses = _capped(tmp_path, "auto", 300)
    assert rc == 0, err[-2000:]
    m = _chosen(err)
    assert m is not None and 1 <= m < 256 and "peak memory grows" in err, err[-2000:]
    assert "images per chunk (" in err  # the estimate chose a chunk (a halving may follow it)
    from urkle_fast.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "auto" / "checkpoint.pt")["micro_chosen"] == m
    rc, err_fixed, fixed = _capped(tmp_path, "fixed", None, "--micro-batch", str(m), "--max-steps", "3")
    assert rc == 0, err_fixed[-2000:]
    assert len(losses) == 2 and losses == fixed[:2]
    rc, err_resumed, resumed = _capped(tmp_path, "auto", None, "--resume", "--max-steps", "3")
    assert rc == 0 and "measuring" not in err_resumed, err_resumed[-2000:]
    assert resumed == fixed


def test_micro_batch_auto_halves_on_a_real_out_of_memory(tmp_path):
    """With the estimate skipped, the whole batch is tried under the cap: the CPU allocator refuses it (a real
    "can't allocate memory"), the step is retried from the same random state with half the chunk until it fits,
    and the losses are those of that fixed --micro-batch."""
    rc, err, losses = _capped(tmp_path, "halving", 300, whole_batch_first=True)
    assert rc == 0, err[-2000:]
    import re

    halvings = [int(n) for n in re.findall(r"out of memory at (\d+) images per chunk; step 0 again", err)]
    assert halvings and halvings[0] == 256 and halvings == [256 >> i for i in range(len(halvings))], err[-2000:]
    m = halvings[-1] // 2
    rc, err_fixed, fixed = _capped(tmp_path, "fixed", None, "--micro-batch", str(m))
    assert rc == 0, err_fixed[-2000:]
    assert len(losses) == 2 and losses == fixed


def test_micro_batch_auto_halves_on_cudas_out_of_memory_error(tmp_path, monkeypatch, capsys):
    """CUDA's allocator raises torch.OutOfMemoryError, not the CPU's RuntimeError; on CUDA, auto tries the whole
    batch first. Both played on the CPU: the estimate skipped, and a step of more than 64 images per pass raising
    CUDA's error. The step is retried from the same state with 128, then 64 images per chunk, and the run trains
    with the losses of a fixed --micro-batch 64."""
    import json

    import urkle_fast.train as train_mod

    real = train_mod._forward_backward

    def cuda_like(run, crops, labels, hp, beta):
        if (run.micro or crops.shape[1]) > 64:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(run, crops, labels, hp, beta)

    argv = ["--dataset", "digits", "--batch", "256", "--max-steps", "2", "--threads", "1", "--num-workers", "0",
            "--no-progress", "--log-every", "1"]
    monkeypatch.setattr(train_mod, "estimate_micro_batch", lambda *a, **k: (None, "the whole batch first"))
    monkeypatch.setattr(train_mod, "_forward_backward", cuda_like)
    assert train_mod.main(argv + ["--out-dir", str(tmp_path / "auto")]) == 0
    err = capsys.readouterr().err
    assert "out of memory at 256 images per chunk; step 0 again with 128" in err
    assert "out of memory at 128 images per chunk; step 0 again with 64" in err
    monkeypatch.setattr(train_mod, "_forward_backward", real)
    assert train_mod.main(argv + ["--out-dir", str(tmp_path / "fixed"), "--micro-batch", "64"]) == 0
    losses = [[json.loads(ln)["loss"] for ln in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("auto", "fixed")]
    assert len(losses[0]) == 2 and losses[0] == losses[1]


def test_estimate_refuses_when_one_image_cannot_fit():
    """When the whole batch's stored views alone exceed the free memory, no chunk size helps: a MemoryError that says
    so, before any step (the trainer's exit 4)."""
    free = microbatch.memory_headroom()
    with pytest.raises(MemoryError, match="even one image per chunk is predicted not to fit.*the attacked views of the "
                                          "whole batch alone take"):
        microbatch.estimate_micro_batch(lambda m: None, 40, stored_per_image=free // 10)


def test_is_out_of_memory():
    assert microbatch.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert microbatch.is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: "
                                                    "can't allocate memory: you tried to allocate 2470445056 bytes"))
    # a kernel's own workspace (ENOMEM's text), as a convolution raised it under tests/memory_cap.py's 100 MB cap
    assert microbatch.is_out_of_memory(RuntimeError("posix_memalign failed:Cannot allocate memory (12)"))
    assert not microbatch.is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not microbatch.is_out_of_memory(ValueError("can't allocate memory"))


_KNOWN_MEMORY = """
import json, torch
from urkle_fast import microbatch
per_image = 8 * 2**20
def step(m):
    x = torch.empty(m * per_image // 4, dtype=torch.float32)
    x.fill_(1.0)  # touched: resident
    del x
batch = int(2 * microbatch.memory_headroom() / per_image)
m, why = microbatch.estimate_micro_batch(step, batch)
small, why_small = microbatch.estimate_micro_batch(step, 64)
print(json.dumps([m, why, small, why_small]))
"""


def test_estimate_micro_batch_reads_real_memory():
    """The estimator against a step whose memory is known: each image touches 8 MiB, so the measured slope is
    8 MiB per image, and the chunk it picks fills about 80% of the free memory (the batch asks for twice the free
    memory). In a fresh process, as at the start of a training run."""
    import json
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _KNOWN_MEMORY], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    m, why, small, why_small = json.loads(out.stdout.strip().splitlines()[-1])
    per_image = 8 * 2**20
    slope = float(why.split("grows ")[1].split(" MB")[0])
    seen_free = float(why.split("images), ")[1].split(" GB free")[0]) * 2**30  # what the estimator read
    assert slope == pytest.approx(8.0, rel=0.1), why
    assert m is not None and 0.6 * seen_free <= m * per_image <= 0.8 * seen_free, why
    assert small is None and why_small.startswith("it fits"), why_small
