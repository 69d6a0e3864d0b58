"""``python -m urkle_fast.train``: train one method, or (no arguments) the digits demo.

With no arguments: SimCLR+Urkle and plain SimCLR on scikit-learn's 8x8 digits with the same budget,
then both are evaluated with urkle_fast.eval.evaluate_checkpoints (linear probe + PGD); a few
minutes on 2 CPU cores. With arguments: one run, e.g.

    python -m urkle_fast.train --method simclr_urkle --dataset cifar10 --epochs 2000 --batch-size 1024
    python -m urkle_fast.train --method vae_urkle --dataset mnist --epochs 50 --out-dir runs/mnist-vae
    python -m urkle_fast.train --out-dir runs/x --resume          # continue exactly where it stopped
    python -m urkle_fast.train --out-dir runs/x --resume if-exists  # the same command starts or continues
    python -m urkle_fast.train --demo --seed 1 --out-dir runs/demo1   # the default run, another seed

The loop is flat: batches in a (seed, epoch)-determined order -> batched augmentation on the device
(seeded by (seed, step)) -> the method's loss (urkle_fast.methods; attacks inside) -> LARS step ->
warm-up + cosine schedule. Checkpoints (urkle_fast.checkpoint, atomic) every --ckpt-every steps, at
the end and on SIGTERM / SIGINT; metrics go to <out_dir>/metrics.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from urkle_fast import distributed as udist
from urkle_fast.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, unwrap
from urkle_fast.data import (DATASETS, INFO, DataRootError, InMemoryDataset, MultiViewAugment, epoch_batches,
                             load_dataset, num_classes_of, preset_for, steps_per_epoch)
from urkle_fast.methods import DEFAULT_BETA, METHODS, NUM_VIEWS
from urkle_fast.microbatch import all_reduce_gradients, broadcast_from_rank0, micro_batched_step
from urkle_fast.models import DEFAULT_ARCH, METHOD_FAMILY, build_model

# train eps (l_inf, [0, 1] pixels): SPEC sec 6; digits chosen here (see the README / report)
DEFAULT_EPS = {"digits": 0.15, "mnist": 0.1, "cifar10": 8 / 255, "cifar100": 8 / 255, "folder": 2 / 255,
               "imagenet": 2 / 255}
# SPEC sec 6 (the paper's CIFAR / ImageNet settings); digits, MNIST and plain folders: our choice
DEFAULT_EPOCHS = {"digits": 100, "mnist": 100, "cifar10": 2000, "cifar100": 2000, "folder": 100, "imagenet": 200}
DEFAULT_BATCH = {"digits": 256, "mnist": 256, "cifar10": 1024, "cifar100": 1024, "folder": 256, "imagenet": 4096}
DEFAULT_DZ = {"resnet18": 512, "resnet50": 2048, "mnist_conv": 128, "digits_conv": 64}
# fields that may change when resuming (they do not change what is computed)
RUNTIME_FIELDS = ("out_dir", "resume", "progress", "num_workers", "ckpt_every", "log_every", "tensorboard",
                  "max_steps", "device", "compile", "compile_backend", "threads", "dist_backend")


@dataclass
class TrainConfig:
    method: str = "simclr_urkle"
    dataset: str = "digits"
    data_root: Optional[str] = None
    out_dir: str = "runs/default"
    # model (None: chosen from the dataset)
    arch: Optional[str] = None
    stem: Optional[str] = None  # cifar (3x3 conv, no max-pool) or imagenet
    d_z: Optional[int] = None
    variance: str = "softplus"
    sigma_min: float = 0.01
    proj_hidden: Optional[int] = None
    proj_dim: Optional[int] = None
    # optimisation
    epochs: Optional[int] = None  # None: SPEC sec 6 (2000 CIFAR, 200 ImageNet), 100 elsewhere
    max_steps: Optional[int] = None  # stop after this many steps (the schedule still spans `epochs`)
    batch_size: Optional[int] = None  # the global batch; None: SPEC sec 6 (1024 CIFAR, 4096 ImageNet), 256 elsewhere
    base_lr: float = 0.3  # lr = base_lr * batch_size / 256 (SimCLR's rule)
    optimizer: str = "lars"
    momentum: float = 0.9
    weight_decay: float = 1e-6
    trust_coef: float = 0.001
    warmup_epochs: float = 10.0
    # objectives (None: per method / dataset defaults, resolved before training and saved)
    eps: Optional[float] = None
    pgd_steps: int = 7
    pgd_alpha: Optional[float] = None  # default 2.5 * eps / pgd_steps
    norm: str = "linf"
    beta_robust: Optional[float] = None
    beta_warmup_epochs: Optional[float] = None  # beta_robust ramps linearly from 0; default warmup_epochs
    beta_vae: float = 0.0
    temperature: float = 0.5
    denominator: str = "all"
    eot: int = 1
    augment: Optional[str] = None  # simclr | digits | light | none
    train_subset: Optional[int] = None  # first N training images (quick runs, tests)
    # machinery
    seed: int = 0
    device: str = "auto"
    compile: Optional[bool] = None  # default: on for CUDA
    compile_backend: str = "inductor"
    amp: Optional[bool] = None  # bf16 autocast; default: on for CUDA
    channels_last: Optional[bool] = None  # default: on for CUDA
    # torch.distributed (torchrun): batch_size is the global batch, split evenly over the ranks
    dist_backend: Optional[str] = None  # None: nccl on CUDA, gloo on the CPU
    sync_bn: Optional[bool] = None  # global batch norm across ranks (SimCLR); default: on for multi-GPU CUDA
    # input pipeline: torch (DataLoader workers decode, augmentation on the device) or NVIDIA DALI
    # (decode + augmentation in a DALI pipeline; ImageFolder datasets); auto: DALI for folder / imagenet
    # on CUDA when it is installed
    loader: str = "auto"
    micro_batch: Optional[int] = None  # images per chunk of this rank's batch (urkle_fast.microbatch); None: all
    num_workers: int = 2
    threads: Optional[int] = None  # torch intra-op threads on the CPU (1 is fastest for the tiny digits model)
    ckpt_every: int = 0  # steps; 0 = only at the end (and on SIGTERM / SIGINT)
    log_every: int = 10
    # checkpoint path; "auto": <out_dir>/checkpoint.pt; "if-exists": that one when present, else a fresh
    # start (for jobs that a scheduler or torchrun --max-restarts relaunches with the same command)
    resume: Optional[str] = None
    progress: bool = True
    tensorboard: bool = False
    # filled from the dataset (saved so that load_model needs nothing else)
    in_channels: Optional[int] = None
    image_size: Optional[int] = None
    num_classes: Optional[int] = None
    pixel_mean: Optional[list] = None
    pixel_std: Optional[list] = None


class StepOutOfMemoryError(RuntimeError):
    """A training step ran out of device memory; the message says how to make the step fit."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN / inf; the run stopped before the optimiser step, checkpoints untouched."""


# ----------------------------------------------------------------------------------------------
# LARS and the schedule


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


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
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
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    return factor


# ----------------------------------------------------------------------------------------------
# config resolution


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """Fill every None default from the method and dataset (the saved config is self-contained)."""
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; expected one of {sorted(METHODS)}")
    if cfg.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {cfg.dataset!r}; expected one of {DATASETS}")
    info = INFO[cfg.dataset]
    c = dataclasses.replace(cfg)
    c.arch = c.arch or DEFAULT_ARCH[c.dataset]
    c.epochs = DEFAULT_EPOCHS[c.dataset] if c.epochs is None else c.epochs
    c.batch_size = DEFAULT_BATCH[c.dataset] if c.batch_size is None else c.batch_size
    if c.batch_size < 1 or c.epochs < 1:
        raise ValueError(f"--batch-size and --epochs must be positive, got {c.batch_size} and {c.epochs}")
    c.stem = c.stem or ("cifar" if (c.image_size or info.image_size) <= 64 else "imagenet")
    c.d_z = c.d_z or DEFAULT_DZ.get(c.arch, 128)
    c.proj_hidden = c.proj_hidden or (2048 if c.arch.startswith("resnet") else 256)
    c.proj_dim = c.proj_dim or (128 if c.arch.startswith("resnet") else 64)
    c.eps = DEFAULT_EPS[c.dataset] if c.eps is None else c.eps
    c.pgd_alpha = 2.5 * c.eps / max(1, c.pgd_steps) if c.pgd_alpha is None else c.pgd_alpha
    c.beta_robust = DEFAULT_BETA[c.method] if c.beta_robust is None else c.beta_robust
    c.beta_warmup_epochs = c.warmup_epochs if c.beta_warmup_epochs is None else c.beta_warmup_epochs
    c.augment = c.augment or preset_for(c.dataset, METHOD_FAMILY[c.method])
    c.in_channels = c.in_channels or info.in_channels
    c.image_size = c.image_size or info.image_size
    c.pixel_mean = list(c.pixel_mean or info.mean)
    c.pixel_std = list(c.pixel_std or info.std)
    return c


def resolve_loader(cfg: TrainConfig, ds, on_cuda: bool) -> str:
    """"torch" or "dali" for this run (clear errors where DALI cannot read the data set)."""
    if cfg.loader not in ("auto", "torch", "dali"):
        raise ValueError(f"--loader must be auto, torch or dali, got {cfg.loader!r}")
    folder = hasattr(ds, "inner") and hasattr(ds.inner, "root")  # an ImageFolder tree on disk
    if cfg.loader == "auto":
        if not (on_cuda and folder and cfg.dataset in ("folder", "imagenet") and not cfg.train_subset):
            return "torch"
        from urkle_fast.data.dali import dali_available

        return "dali" if dali_available()[0] else "torch"
    if cfg.loader == "dali":
        from urkle_fast.data.dali import PRESETS as DALI_PRESETS, dali_available

        ok, why = dali_available()
        if not ok:
            raise ValueError(f"--loader dali: {why}")
        if not folder:
            raise ValueError(f"--loader dali reads ImageFolder JPEG trees; dataset {cfg.dataset!r} is not one "
                             f"(use --loader torch)")
        if cfg.train_subset:
            raise ValueError("--loader dali reads the whole tree; --train-subset needs --loader torch")
        if cfg.augment not in DALI_PRESETS:
            raise ValueError(f"--loader dali has the augmentation presets {DALI_PRESETS}, not {cfg.augment!r}")
    return cfg.loader


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def compile_model(model: nn.Module, backend: str) -> None:
    """Compile the submodules in place (nn.Module.compile): the state dict keeps its keys and the
    model keeps its methods (encode / project / decode / logits), each running compiled graphs."""
    for name in ("backbone", "head", "projector", "decoder", "classifier"):
        sub = getattr(model, name, None)
        if isinstance(sub, nn.Module):
            sub.compile(backend=backend, dynamic=False)


# ----------------------------------------------------------------------------------------------
# the loop


class MethodStep(nn.Module):
    """The method's loss as a module's forward, so DistributedDataParallel can wrap it: the methods
    call model.encode / project / ... (and run attacks), which DDP's forward hooks would not see."""

    def __init__(self, model: nn.Module, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, views: torch.Tensor, labels: torch.Tensor, cfg: "TrainConfig"):
        return self.loss_fn(self.model, views, labels, cfg)


class _StopFlag:
    def __init__(self):
        self.signum: Optional[int] = None

    def __call__(self, signum, frame):
        self.signum = signum


def train(cfg: TrainConfig) -> dict:
    """Train one run; returns {"checkpoint", "step", "loss", "interrupted" (signal number or None), "model"}.

    Under torchrun (WORLD_SIZE > 1) every process calls this: DDP over a MethodStep, the global
    NT-Xent (urkle_fast.distributed), rank 0 writes checkpoints and metrics.

    Raises DataRootError, CheckpointError, NonFiniteLossError, ValueError with clear messages."""
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / "checkpoint.pt"
    resume_state = None
    if cfg.resume == "if-exists" and not ckpt_path.exists():
        cfg = dataclasses.replace(cfg, resume=None)
    if cfg.resume:
        path = ckpt_path if cfg.resume in ("auto", "if-exists") else Path(cfg.resume)
        resume_state = load_checkpoint(path)
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        saved = {k: v for k, v in resume_state["config"].items() if k in known}
        # everything that defines the computation comes from the checkpoint
        cfg = TrainConfig(**{**saved, **{k: getattr(cfg, k) for k in RUNTIME_FIELDS}})
    cfg = resolve_config(cfg)
    ctx = udist.init_distributed(cfg.device, cfg.dist_backend)
    device, world, rank, main_rank = ctx.device, ctx.world_size, ctx.rank, ctx.is_main
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} is the global batch and must be divisible by the "
                         f"number of processes ({world})")
    on_cuda = device.type == "cuda"
    amp = on_cuda if cfg.amp is None else cfg.amp
    channels_last = on_cuda if cfg.channels_last is None else cfg.channels_last
    use_compile = on_cuda if cfg.compile is None else cfg.compile
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)

    ds = load_dataset(cfg.dataset, cfg.data_root, "train", image_size=cfg.image_size)
    cfg.loader = resolve_loader(cfg, ds, on_cuda)
    if cfg.train_subset:
        if isinstance(ds, InMemoryDataset):
            ds = InMemoryDataset(ds.images[: cfg.train_subset], ds.labels[: cfg.train_subset], ds.classes)
        else:
            classes = ds.classes
            ds = torch.utils.data.Subset(ds, range(min(cfg.train_subset, len(ds))))
            ds.classes = classes
    if cfg.num_classes is None:
        cfg.num_classes = num_classes_of(ds)
    dali = None
    if cfg.loader == "dali":
        from urkle_fast.data.dali import DaliMultiView

        dali_state = None
        if resume_state is not None:
            states = resume_state.get("dali_ranks") or []
            if len(states) == world:
                dali_state = states[rank]
            elif main_rank:
                print(f"the checkpoint holds {len(states)} DALI loader states for {world} processes: the data "
                      f"pipeline restarts its shuffle (model, optimiser and schedule continue exactly)",
                      file=sys.stderr)
        dali = DaliMultiView(ds.inner.root, cfg.batch_size // world, views=NUM_VIEWS[cfg.method],
                             size=cfg.image_size, preset=cfg.augment, device=device, shard_id=rank,
                             num_shards=world, seed=cfg.seed, num_threads=max(1, cfg.num_workers),
                             checkpoint=dali_state)
        spe = len(dali)
        if spe == 0:
            raise ValueError(f"batch size {cfg.batch_size} is larger than the dataset ({len(ds)} images)")
    else:
        spe = steps_per_epoch(ds, cfg.batch_size)
    total_steps = cfg.epochs * spe
    end_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps

    model = build_model(asdict(cfg))
    sync_bn = (on_cuda and world > 1) if cfg.sync_bn is None else cfg.sync_bn
    if sync_bn and world > 1:
        if not on_cuda:
            raise ValueError("--sync-bn needs CUDA devices (torch's SyncBatchNorm has no CPU kernel); "
                             "use --no-sync-bn for CPU processes")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if world > 1:
        # the same initial weights on every rank (DDP also broadcasts them); from here on each rank
        # draws its own noise (z samples, random starts)
        seed_everything(cfg.seed + 7919 * rank)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(int(cfg.warmup_epochs * spe), total_steps))
    step = 0
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        saved_ranks = resume_state.get("rng_ranks") or [resume_state["rng"]]
        if len(saved_ranks) == world:
            set_rng_state(saved_ranks[rank])
        elif main_rank:
            print(f"resuming a {len(saved_ranks)}-process run with {world} processes: the data order and the "
                  f"schedule continue exactly, the random streams (z samples, random starts) do not",
                  file=sys.stderr)
        step = int(resume_state["step"])
    if use_compile:
        compile_model(model, cfg.compile_backend)
    loss_fn = METHODS[cfg.method]
    step_fn: nn.Module = MethodStep(model, loss_fn)
    local_batch = cfg.batch_size // world
    if cfg.micro_batch is not None and cfg.micro_batch < 1:
        raise ValueError(f"--micro-batch must be a positive number of images, got {cfg.micro_batch}")
    micro = cfg.micro_batch if cfg.micro_batch and cfg.micro_batch < local_batch else None
    if micro and world > 1:
        # chunks call the model several times per step, which DDP's reducer does not allow: the
        # gradients are averaged after the last chunk instead (micro_batched_step's contract)
        broadcast_from_rank0([*model.parameters(), *model.buffers()])
    elif world > 1:
        step_fn = nn.parallel.DistributedDataParallel(step_fn, device_ids=[device.index] if on_cuda else None)
    augment = MultiViewAugment(views=NUM_VIEWS[cfg.method], size=cfg.image_size, preset=cfg.augment)

    def checkpoint(epoch: int, loss: Optional[float]) -> Path:
        # a collective: every rank contributes its random state; rank 0 writes, atomically
        rng_ranks = udist.gather_objects(rng_state())
        dali_ranks = udist.gather_objects(dali.state()) if dali is not None else None
        if main_rank:
            save_checkpoint({
                "config": asdict(cfg), "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "epoch": epoch, "rng": rng_ranks[0],
                "rng_ranks": rng_ranks, "dali_ranks": dali_ranks, "world_size": world, "loss": loss,
                "torch_version": torch.__version__,
            }, ckpt_path)
        udist.barrier()
        return ckpt_path

    if main_rank:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    metrics_path = out_dir / "metrics.jsonl"
    if main_rank and resume_state is not None and metrics_path.exists():
        # drop records logged after the checkpoint we resume from: they are about to be redone
        keep = [ln for ln in metrics_path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        metrics_path.write_text("".join(ln + "\n" for ln in keep))
    metrics_file = open(metrics_path, "a") if main_rank else None
    writer = None
    if cfg.tensorboard and main_rank:
        try:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(out_dir / "tb"))
        except ImportError:
            print("tensorboard is not installed; metrics go to metrics.jsonl only", file=sys.stderr)

    stop = _StopFlag()
    # handlers can only be installed from the main thread; elsewhere a signal keeps its default action
    in_main = threading.current_thread() is threading.main_thread()
    old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)} if in_main else {}
    from tqdm.auto import tqdm

    pbar = tqdm(total=end_step, initial=step, disable=not (cfg.progress and main_rank), unit="step",
                dynamic_ncols=True, desc=f"{cfg.method}/{cfg.dataset}" + (f" x{world}" if world > 1 else ""))
    last_loss: Optional[float] = None
    t_last, n_last = time.perf_counter(), 0
    stopping = False  # every rank agrees on it (all-reduced with the loss each step)
    model.train()
    try:
        while step < end_step and not stopping:
            epoch = step // spe
            batches = dali if dali is not None else epoch_batches(
                ds, cfg.batch_size, seed=cfg.seed, epoch=epoch, start_batch=step % spe, num_workers=cfg.num_workers,
                pin_memory=on_cuda, shard=(rank, world))
            for images, labels in batches:
                if dali is not None:
                    views = images  # decoded and augmented by DALI: [V, b, 3, S, S] in [0, 1] on the device
                else:
                    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step + (rank << 40))
                    views = augment(images.to(device, non_blocking=True), gen)
                if channels_last:
                    views = views.contiguous(memory_format=torch.channels_last) if views.ndim == 4 else \
                        views.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(views.shape)
                labels = labels.to(device, non_blocking=True)
                # the regulariser ramps in: a collapsed encoder (mu barely varying, z all noise) gives
                # NT-Xent no gradient, so a full-strength KL at step 0 can win before features form
                ramp = min(1.0, step / (cfg.beta_warmup_epochs * spe)) if cfg.beta_warmup_epochs > 0 else 1.0
                step_cfg = dataclasses.replace(cfg, beta_robust=cfg.beta_robust * ramp) if ramp < 1.0 else cfg
                try:
                    if micro:
                        optimizer.zero_grad(set_to_none=True)
                        loss, metrics = micro_batched_step(model, cfg.method, views, labels, step_cfg, micro, amp=amp)
                    else:
                        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                            loss, metrics = step_fn(views, labels, step_cfg)
                except torch.OutOfMemoryError as exc:
                    n_views = views.shape[0] * (2 if cfg.method == "simclr_urkle" else 1)
                    raise StepOutOfMemoryError(
                        f"out of memory in the step at {local_batch if not micro else micro} images x {n_views} "
                        f"views per process ({cfg.arch}, {cfg.image_size} px): pass --micro-batch M with M < "
                        f"{micro or local_batch} (the gradient stays that of the whole batch), or start more "
                        f"processes (torchrun --nproc-per-node). {str(exc).splitlines()[0]}") from exc
                # one small all-reduce per step: the mean loss over ranks and whether any rank was signalled
                shared = udist.all_reduce_mean(torch.stack([loss.detach().float(),
                                                            loss.new_tensor(float(stop.signum is not None))]))
                global_loss, stopping = shared[0], bool(shared[1] > 0)
                if not torch.isfinite(global_loss):
                    raise NonFiniteLossError(
                        f"loss is {global_loss.item()} at step {step} (epoch {epoch}) of {cfg.method} on {cfg.dataset}; "
                        f"stopped before the optimiser step. The last good checkpoint is left as it was: "
                        f"{ckpt_path if ckpt_path.exists() else 'none was written yet'}. Lower --base-lr or "
                        f"--beta-robust, or raise --sigma-min"
                    )
                if micro:
                    all_reduce_gradients(model)
                    broadcast_from_rank0(model.buffers())
                else:
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                n_last += cfg.batch_size
                last_loss = float(global_loss)
                if step % cfg.log_every == 0 or step == end_step:
                    names = sorted(metrics)
                    values = udist.all_reduce_mean(torch.stack([metrics[k].detach().float() for k in names])) \
                        if names else []
                    dt = time.perf_counter() - t_last
                    rec = {"step": step, "epoch": epoch, "loss": last_loss, "lr": scheduler.get_last_lr()[0],
                           "img_per_s": n_last / max(dt, 1e-9), **{k: float(v) for k, v in zip(names, values)}}
                    t_last, n_last = time.perf_counter(), 0
                if main_rank and (step % cfg.log_every == 0 or step == end_step):
                    metrics_file.write(json.dumps(rec) + "\n")
                    metrics_file.flush()
                    if writer is not None:
                        for k, v in rec.items():
                            if k not in ("step", "epoch"):
                                writer.add_scalar(k, v, step)
                    pbar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{rec['img_per_s']:.0f}")
                pbar.update(1)
                if cfg.ckpt_every and step % cfg.ckpt_every == 0:
                    checkpoint(epoch, last_loss)
                if world == 1 and stop.signum is not None:
                    stopping = True  # a single process need not wait for the next all-reduce
                if step >= end_step or stopping:
                    break
        path = checkpoint(step // spe, last_loss)
        if main_rank and metrics_file is not None:
            metrics_file.flush()
            _plot_curves({cfg.method: str(metrics_path)}, str(out_dir / "curves.png"),
                         f"{cfg.method} on {cfg.dataset}, batch {cfg.batch_size}" + (f", {world} processes" if world > 1 else ""))
        interrupted = (stop.signum or signal.SIGTERM) if stopping else None
        if interrupted is not None and main_rank:
            print(f"\nreceived {signal.Signals(interrupted).name}: saved {path} at step {step}; "
                  f"continue with --out-dir {out_dir} --resume", file=sys.stderr)
        return {"checkpoint": str(path), "step": step, "loss": last_loss, "interrupted": interrupted,
                "model": unwrap(model)}
    finally:
        pbar.close()
        if metrics_file is not None:
            metrics_file.close()
        if writer is not None:
            writer.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)


def _plot_curves(runs: dict, path: str, title: str) -> Optional[str]:
    """Training curves PNG (urkle_fast.evaluation.plots); skipped with a note when nothing is logged yet
    or matplotlib is missing - a plot never fails a run."""
    try:
        from urkle_fast.evaluation.plots import plot_training_curves

        return plot_training_curves(runs, path, title)
    except (ImportError, ValueError, FileNotFoundError) as exc:
        print(f"training curves not plotted: {exc}", file=sys.stderr)
        return None


# ----------------------------------------------------------------------------------------------
# the digits demo (no arguments)

# Tuned on digits (2 seeds): beta_robust 0.01 with a 5-epoch ramp; 1.0 or 0.1 without the ramp
# collapse the encoder in ~10 steps (KL -> 0, NT-Xent stuck at log(4B - 1)). LARS with trust 0.02 and
# base lr 1.0 because the default trust 0.001 barely moves so small a model in 150 steps.
DEMO = dict(dataset="digits", epochs=30, batch_size=256, base_lr=1.0, trust_coef=0.02, warmup_epochs=3,
            eps=0.15, pgd_steps=5, beta_warmup_epochs=5, log_every=5, threads=1)
DEMO_EPS = [0.05, 0.1, 0.2]


def run_demo(out_dir: str = "runs/digits-demo", seed: int = 0, progress: bool = True) -> dict:
    """SimCLR+Urkle vs SimCLR on digits with the same budget, then evaluate both."""
    t0 = time.perf_counter()
    ckpts = {}
    for method in ("simclr_urkle", "simclr"):
        cfg = TrainConfig(method=method, out_dir=str(Path(out_dir) / method), seed=seed, progress=progress, **DEMO)
        ckpts[method] = train(cfg)["checkpoint"]
    print(f"training took {time.perf_counter() - t0:.1f} s")
    curves = _plot_curves({m: str(Path(out_dir) / m / "metrics.jsonl") for m in ckpts},
                          str(Path(out_dir) / "eval" / "training_curves.png"), "digits demo, same budget")
    if curves:
        print(f"training curves: {curves}")
    from urkle_fast.eval import evaluate_checkpoints

    # Square (gradient-free, 1000 queries) next to PGD and APGD: the table's "worst" column is the number to quote
    result = evaluate_checkpoints(ckpts, dataset="digits", eps_list=DEMO_EPS, out_dir=str(Path(out_dir) / "eval"),
                                  square_queries=1000)
    print(f"demo took {time.perf_counter() - t0:.1f} s")
    return result


# ----------------------------------------------------------------------------------------------
# command line


HELP = {
    "data_root": "dataset folder (mnist / cifar10 default to the ../shared/data copies)",
    "out_dir": "checkpoint.pt, metrics.jsonl and config.json go here",
    "arch": "None: digits_conv / mnist_conv / resnet18 (cifar10) / resnet50",
    "d_z": "None: 64 digits, 128 mnist, 512 resnet18, 2048 resnet50",
    "max_steps": "stop after this many steps; the schedule still spans --epochs",
    "base_lr": "lr = base_lr * batch_size / 256",
    "eps": "train eps in [0,1] pixels; None: 0.15 digits, 0.1 mnist, 8/255 cifar, 2/255 folder/imagenet",
    "pgd_alpha": "None: 2.5 * eps / pgd_steps",
    "beta_robust": "None: 0.01 simclr_urkle, 1 vae_urkle / ae_trades, 6 trades",
    "beta_warmup_epochs": "None: --warmup-epochs",
    "augment": "None: simclr for RGB contrastive, digits for grey contrastive, light / none otherwise",
    "train_subset": "use the first N training images",
    "threads": "torch CPU threads (None: torch's default)",
    "ckpt_every": "steps between checkpoints; 0: only at the end and on SIGTERM / SIGINT",
    "eot": "z samples averaged per RoCL attack step",
    "batch_size": "the global batch (split evenly over torchrun's processes); lr = base_lr * batch_size / 256; "
                  "None: 1024 cifar, 4096 imagenet, 256 otherwise",
    "epochs": "None: 2000 cifar, 200 imagenet, 100 otherwise (SPEC sec 6)",
    "dist_backend": "torch.distributed backend under torchrun; None: nccl on CUDA, gloo on the CPU",
    "loader": "torch: DataLoader + augmentation on the device; dali: NVIDIA DALI decodes and augments "
              "(ImageFolder trees); auto: dali for folder / imagenet on CUDA when installed",
    "micro_batch": "split this process's share of the batch into chunks of this many images (exact gradient "
                   "of the whole batch; contrastive methods use a gradient cache); None: one chunk",
    "sync_bn": "global batch norm over all processes (SimCLR); default: on for multi-process CUDA runs",
}


def parse_args(argv: Optional[list[str]] = None) -> TrainConfig:
    p = argparse.ArgumentParser(prog="python -m urkle_fast.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    choices = {"method": sorted(METHODS), "dataset": list(DATASETS), "optimizer": ["lars", "sgd", "adamw"],
               "norm": ["linf", "l2"], "denominator": ["all", "negatives"], "variance": ["softplus", "exp"],
               "arch": ["resnet18", "resnet50", "mnist_conv", "digits_conv"], "stem": ["cifar", "imagenet"],
               "dist_backend": ["nccl", "gloo"], "loader": ["auto", "torch", "dali"],
               "augment": ["simclr", "digits", "light", "none"]}
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("in_channels", "num_classes", "pixel_mean", "pixel_std"):
            continue
        flag = "--" + f.name.replace("_", "-")
        # the design card's spelling: python -m urkle_fast.train --dataset imagenet --batch 4096
        aliases = ["--batch"] if f.name == "batch_size" else []
        if f.name == "resume":
            p.add_argument(flag, nargs="?", const="auto", default=None,
                           help="resume from PATH, or from <out_dir>/checkpoint.pt when given without a path; "
                                "'if-exists': from that file when present, else start (for relaunched jobs)")
        elif f.type in ("bool", "Optional[bool]"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                           help=HELP.get(f.name, "") + "default: %(default)s" + " (None: on for CUDA)" * (f.default is None))
        else:
            typ = {"int": int, "Optional[int]": int, "float": float, "Optional[float]": float}.get(f.type, str)
            p.add_argument(flag, *aliases, type=typ, default=f.default, choices=choices.get(f.name),
                           help=HELP.get(f.name, "default: %(default)s"))
    ns = p.parse_args(argv)
    return TrainConfig(**vars(ns))


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if not argv or "--demo" in argv:
            # the default run; --demo accepts --seed, --out-dir and --no-progress
            rest = [a for a in argv if a != "--demo"]
            cfg = parse_args(rest)
            run_demo(out_dir=cfg.out_dir if "--out-dir" in rest else "runs/digits-demo", seed=cfg.seed,
                     progress=cfg.progress)
            return 0
        result = train(parse_args(argv))
    except (DataRootError, CheckpointError, NonFiniteLossError, StepOutOfMemoryError, ValueError) as exc:
        print(f"error: {exc}" if udist.rank() == 0 else f"error (rank {udist.rank()}): {exc}", file=sys.stderr)
        return {NonFiniteLossError: 3, StepOutOfMemoryError: 4}.get(type(exc), 2)
    finally:
        udist.shutdown()
    if result["interrupted"] is not None:
        return 128 + int(result["interrupted"])
    if os.environ.get("RANK", "0") == "0":  # the process group is gone by now
        print(f"done: {result['step']} steps, last loss {result['loss']:.4f}, checkpoint {result['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
