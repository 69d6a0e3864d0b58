"""``python -m urkle_fast.train``: train one method, or (no arguments) the digits demo.

With no arguments: the default job, SimCLR+Urkle against plain SimCLR on scikit-learn's 8x8 digits
(urkle_fast.demo). With arguments: one run, e.g.

    python -m urkle_fast.train --method simclr_urkle --dataset cifar10 --epochs 2000 --batch-size 1024
    python -m urkle_fast.train --method vae_urkle --dataset mnist --epochs 50 --out-dir runs/mnist-vae
    python -m urkle_fast.train --out-dir runs/x --resume          # continue exactly where it stopped
    python -m urkle_fast.train --out-dir runs/x --resume if-exists  # the same command starts or continues
    python -m urkle_fast.train --demo --seed 1 --out-dir runs/demo1   # the default job, another seed

``setup`` builds a ``Run`` (data, model, optimiser, loader, log; or all of it from a checkpoint), and
``train`` is the loop, in the paper's order: crops -> the robustness weight's ramp -> the method's loss
(urkle_fast.methods; the attacks run inside it) and its gradient -> one all-reduce -> finiteness ->
LARS step and schedule -> log -> checkpoint. Checkpoints (urkle_fast.checkpoint, atomic) every
--ckpt-every steps, at the end and on SIGTERM / SIGINT; metrics go to <out_dir>/metrics.jsonl.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.nn as nn

from urkle_fast import distributed as udist
from urkle_fast.checkpoint import (CheckpointError, checkpoint_bytes, claim_folder, keep_previous, load_checkpoint,
                                   load_model, non_finite_entries, previous_path, release_folder,
                                   remove_stale_temp_files, save_checkpoint, unwrap, write_text_atomic)
from urkle_fast.cli import config_from, flag as _flag, given_fields, opt, parser_for
from urkle_fast.data import INFO, BadImageError, DataRootError, InMemoryDataset, LazyViews, load_dataset, num_classes_of
from urkle_fast.data.loader import TorchMultiView, forever, make_train_loader, resolve_loader
from urkle_fast.data.datasets import balanced_subset, subset_order
from urkle_fast.defaults import DATASETS, defaults_for, help_for
from urkle_fast.methods import METHODS, LossParams, Method, get_method
from urkle_fast.microbatch import StepSnapshot, estimate_micro_batch, is_out_of_memory, micro_batched_step
from urkle_fast.models import ARCH_D_Z, build_model
from urkle_fast.ops._checks import NonFiniteInputError
from urkle_fast.optim import beta_ramp, make_optimizer, warmup_cosine
from urkle_fast.runlog import RunLog

_ON_CUDA = " (None: on for CUDA)"


def _micro_batch_arg(value: str):
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a number of images, got {value!r}") from None


@dataclass
class TrainConfig:
    method: str = opt("simclr_urkle", "the method (urkle_fast.methods)", choices=sorted(METHODS))
    dataset: str = opt("digits", "the dataset; its defaults: urkle_fast.defaults", choices=list(DATASETS))
    data_root: Optional[str] = opt(None, "dataset folder (mnist / cifar10 default to the ../shared/data copies)")
    out_dir: str = opt("runs/default", "checkpoint.pt, metrics.jsonl, config.json and curves.png go here")
    # model (None: chosen from the dataset)
    arch: Optional[str] = opt(None, "backbone; None: " + help_for("arch"), choices=sorted(ARCH_D_Z))
    stem: Optional[str] = opt(None, "ResNet stem: cifar (3x3 conv, no max-pool) or imagenet; None: cifar up to 64 px",
                              choices=["cifar", "imagenet"])
    d_z: Optional[int] = opt(None, "width of z; None: " + ", ".join(f"{a} {d}" for a, d in ARCH_D_Z.items()))
    encoder: Optional[str] = opt(None, "p(z|x): gaussian (a learned sigma) or deterministic (z = mu, a linear last "
                                 "layer); None: the method's (" + ", ".join(f"{m.name} {m.encoder}" for m in METHODS.values()
                                                                    if m.family != "supervised") + ")",
                                 choices=["gaussian", "deterministic"])
    variance: str = opt("softplus", "sigma = softplus(.) + sigma_min, or exp(logvar / 2)", choices=["softplus", "exp"])
    sigma_min: float = opt(0.01, "floor of the Gaussian head's sigma")
    proj_hidden: Optional[int] = opt(None, "projector hidden width; None: 2048 for ResNets, 256 otherwise")
    proj_dim: Optional[int] = opt(None, "projector output width; None: 128 for ResNets, 64 otherwise")
    # optimisation
    epochs: Optional[int] = opt(None, "None: " + help_for("epochs"))
    max_steps: Optional[int] = opt(None, "stop after this many steps; the schedule still spans --epochs")
    batch_size: Optional[int] = opt(None, "the global batch (split evenly over torchrun's processes); None: "
                                    + help_for("batch"), aliases=["--batch"])
    base_lr: float = opt(0.3, "lr = base_lr * batch_size / 256 (SimCLR's rule)")
    optimizer: str = opt("lars", "optimiser (urkle_fast.optim)", choices=["lars", "sgd", "adamw"])
    momentum: float = opt(0.9, "momentum of LARS / SGD")
    weight_decay: float = opt(1e-6, "weight decay (not on biases and norm parameters)")
    trust_coef: float = opt(0.001, "LARS trust coefficient")
    warmup_epochs: float = opt(10.0, "linear lr warm-up, then cosine to 0")
    # objectives (None: per method / dataset defaults, resolved before training and saved)
    eps: Optional[float] = opt(None, "train eps in [0,1] pixels; None: " + help_for("train_eps"))
    pgd_steps: int = opt(7, "PGD steps of the training attacks")
    pgd_alpha: Optional[float] = opt(None, "PGD step; None: 2.5 * eps / pgd_steps (rocl: 1.5617 * eps / pgd_steps, "
                                     "its official 0.007 at 8/255 in 7 steps)")
    norm: str = opt("linf", "ball of the training attacks", choices=["linf", "l2"])
    beta_robust: Optional[float] = opt(None, "weight of the robustness term; None: the method's default ("
                                       + ", ".join(f"{m.name} {m.default_beta:g}" for m in METHODS.values()) + ")")
    beta_warmup_epochs: Optional[float] = opt(None, "beta_robust ramps linearly from 0 over these epochs; None: "
                                              "--warmup-epochs for " + ", ".join(m.name for m in METHODS.values()
                                                                               if m.ramp) + ", 0 (no ramp) for the others")
    beta_vae: float = opt(0.0, "weight of the prior KL in vae_urkle (0 in the paper's MNIST table)")
    temperature: float = opt(0.5, "NT-Xent temperature")
    denominator: str = opt("all", "NT-Xent denominator: all (SimCLR) or negatives (paper Eq. 9)",
                           choices=["all", "negatives"])
    eot: int = opt(1, "z samples averaged per RoCL attack step (with --encoder gaussian)")
    detach_columns: bool = opt(False, "NT-Xent with RoCL's official similarity P P.detach()^T (gradient through the "
                               "rows only), in the loss and RoCL's attack")
    augment: Optional[str] = opt(None, "augmentation preset; None: the method's (simclr / digits for contrastive "
                                 "methods, light / none otherwise)", choices=["simclr", "digits", "light", "none"])
    train_subset: Optional[int] = opt(None, "train on N images: the first N (ImageFolder trees, stored class by "
                                      "class: the first N of a fixed shuffle; urkle_fast.data.datasets.subset_order)")
    label_budget: Optional[int] = opt(None, "supervised methods: train on a class-balanced seeded subset of N labelled "
                                      "images (the paper's 5000 / 1000 columns; the same subset as eval's heads with "
                                      "its default --seed 0)")
    # machinery
    seed: int = opt(0, "seed of the data order, augmentation, initialisation and attacks")
    device: str = opt("auto", "auto (CUDA when available), cpu, cuda or cuda:N")
    compile: Optional[bool] = opt(None, "torch.compile the model's submodules" + _ON_CUDA)
    compile_backend: str = opt("inductor", "torch.compile backend")
    amp: Optional[bool] = opt(None, "bf16 autocast" + _ON_CUDA)
    channels_last: Optional[bool] = opt(None, "channels-last memory format" + _ON_CUDA)
    dist_backend: Optional[str] = opt(None, "torch.distributed backend under torchrun; None: nccl on CUDA, gloo on "
                                      "the CPU", choices=["nccl", "gloo"])
    sync_bn: Optional[bool] = opt(None, "global batch norm over all processes (SimCLR); None: on for multi-process "
                                  "CUDA runs")
    loader: str = opt("auto", "torch: DataLoader + augmentation on the device; dali: NVIDIA DALI decodes and "
                      "augments (ImageFolder trees); auto: dali for folder / imagenet on CUDA when installed",
                      choices=["auto", "torch", "dali"])
    micro_batch: Any = opt("auto", "split this process's share of the batch into chunks of this many images (the exact "
                           "gradient of the whole batch; contrastive methods use a gradient cache); auto: the whole "
                           "share if it fits, else the largest chunk that does (estimated from the memory of small "
                           "probe steps on the CPU, halved on out-of-memory); the choice is printed",
                           type=_micro_batch_arg, metavar="{auto,M}")
    num_workers: int = opt(2, "DataLoader workers (or DALI threads) decoding images")
    threads: Optional[int] = opt(None, "torch CPU threads (None: torch's default; 1 is fastest for digits)")
    ckpt_every: int = opt(0, "steps between checkpoints; 0: only at the end and on SIGTERM / SIGINT")
    log_every: int = opt(10, "steps between metrics records")
    resume: Optional[str] = opt(None, "resume from PATH, or from <out_dir>/checkpoint.pt when given without a path; "
                                "'if-exists': from that file when present, else start (for relaunched jobs)",
                                nargs="?", const="auto")
    overwrite: bool = opt(False, "start afresh in an --out-dir that holds another run (its checkpoint and metrics are "
                          "deleted); without it such a start is refused")
    skip_bad_images: bool = opt(False, "an unreadable image file is logged and replaced by the next readable one "
                                "(default: stop with an error naming the file)")
    dist_timeout: float = opt(300.0, "seconds a collective waits for a lost torchrun peer before failing")
    diverge_factor: float = opt(1e6, "a loss this many times the first loss of the process counts as divergence "
                                "(exit 3, like NaN / inf: weights can explode while the loss stays finite); 0: off")
    progress: bool = opt(True, "progress bar")
    tensorboard: bool = opt(False, "also log to <out_dir>/tb")
    # filled in by resolve_config (saved, so that load_model needs nothing else)
    family: Optional[str] = opt(None, cli=False)
    in_channels: Optional[int] = opt(None, cli=False)
    image_size: Optional[int] = opt(None, "training crop size; None: the dataset's (8 digits, 28 mnist, 32 cifar, "
                                    "224 folder / imagenet)")
    num_classes: Optional[int] = opt(None, cli=False)
    classifier: Optional[str] = opt(None, cli=False)  # a supervised model's last layers: the dataset's head kind
    decoder_output: Optional[str] = opt(None, cli=False)  # sigmoid (VAE, Bernoulli) or linear (AE, squared error)
    objective_version: Optional[int] = opt(None, cli=False)  # OBJECTIVE_VERSION at the run's start
    subset_order: Optional[str] = opt(None, cli=False)  # --train-subset of an ImageFolder tree: "shuffled" (subset_order)
    # or "first" (runs before it: the first N files, a few classes)
    pixel_mean: Optional[list] = opt(None, cli=False)
    pixel_std: Optional[list] = opt(None, cli=False)


# On --resume the checkpoint's config defines the run. These fields always come from the command line: they
# change how the run executes, not what it computes.
RUNTIME_FIELDS = ("out_dir", "resume", "overwrite", "progress", "num_workers", "ckpt_every", "log_every", "tensorboard",
                  "max_steps", "device", "compile", "compile_backend", "threads", "dist_backend", "dist_timeout",
                  "diverge_factor")
# These come from the command line when given there, else from the checkpoint: where the data is and how it is
# read or chunked, and the base lr (lowering it is how a diverged run is continued). Every other flag given
# with --resume must agree with the checkpoint, or the resume is refused with the flags named.
APPLIED_ON_RESUME = ("data_root", "loader", "micro_batch", "skip_bad_images", "base_lr")
FILLED_FIELDS = ("family", "in_channels", "num_classes", "pixel_mean", "pixel_std", "classifier", "decoder_output",
                 "objective_version", "subset_order")
# Version 2 (issue 10): SimCLR and RoCL deterministic, RoCL's official loss and step, TRADES in two passes, AE+TRADES
# with the squared error, the ramp off for the baselines. A run of these methods started under version 1 computes
# another objective: resuming it under version 2 would mix the two, so it is refused.
OBJECTIVE_VERSION = 2
CHANGED_IN_V2 = ("simclr", "rocl", "trades", "ae_trades")  # resolve_config's


class StepOutOfMemoryError(RuntimeError):
    """A training step ran out of device memory; the message says how to make the step fit."""


class NonFiniteLossError(RuntimeError):
    """The loss, an op's input or the parameters became NaN / inf; the run stopped and the last good
    checkpoint is left as it was."""


SECOND_SIGNAL_AFTER_S = 2.0  # a second SIGTERM / SIGINT this long after the first stops inside the step


class StoppedNow(BaseException):
    """A second SIGTERM / SIGINT: stop inside the step, keep the last checkpoint (a BaseException, so that the
    loop's error handler does not save the half-done step)."""


class RunFinished(Exception):
    """--resume on a run that has reached its last step: nothing to do (the checkpoint is not touched)."""


def validate(cfg: TrainConfig) -> None:
    """Every flag's range, before any work; the message names the flag."""
    def need(ok: bool, name: str, what: str) -> None:
        if not ok:
            raise ValueError(f"{_flag(name)} must be {what}, got {getattr(cfg, name)!r}")

    finite = lambda v: isinstance(v, (int, float)) and math.isfinite(v)  # noqa: E731
    if cfg.eps is not None and cfg.norm == "linf":
        need(finite(cfg.eps) and 0 <= cfg.eps <= 1, "eps", "a number in [0, 1] (pixels in [0, 1])")
    elif cfg.eps is not None:
        need(finite(cfg.eps) and cfg.eps >= 0, "eps", "a number >= 0")
    if cfg.skip_bad_images and cfg.loader == "dali":
        raise ValueError("--skip-bad-images works with --loader torch (DALI decodes the files itself); drop one")
    for name in ("base_lr", "temperature", "sigma_min"):
        need(finite(getattr(cfg, name)) and getattr(cfg, name) > 0, name, "a positive number")
    for name in ("momentum", "weight_decay", "trust_coef", "warmup_epochs", "beta_vae"):
        need(finite(getattr(cfg, name)) and getattr(cfg, name) >= 0, name, "a number >= 0")
    for name in ("pgd_alpha", "beta_robust", "beta_warmup_epochs"):
        if getattr(cfg, name) is not None:
            need(finite(getattr(cfg, name)) and getattr(cfg, name) >= 0, name, "a number >= 0")
    for name in ("log_every", "eot"):
        need(getattr(cfg, name) >= 1, name, "an integer >= 1")
    for name in ("ckpt_every", "pgd_steps", "num_workers"):
        need(getattr(cfg, name) >= 0, name, "an integer >= 0")
    if cfg.micro_batch not in (None, "auto"):
        need(isinstance(cfg.micro_batch, int) and not isinstance(cfg.micro_batch, bool) and cfg.micro_batch >= 1,
             "micro_batch", "auto or an integer >= 1")
    for name in ("threads", "train_subset", "label_budget", "max_steps", "epochs", "batch_size", "d_z", "image_size",
                 "proj_hidden", "proj_dim"):
        if getattr(cfg, name) is not None:
            need(getattr(cfg, name) >= 1, name, "an integer >= 1")
    need(finite(cfg.dist_timeout) and cfg.dist_timeout > 0, "dist_timeout", "a positive number of seconds")
    udist.check_device_flags(cfg.device, cfg.dist_backend)
    if cfg.compile_backend not in torch.compiler.list_backends(exclude_tags=()):
        raise ValueError(f"--compile-backend must be one of torch.compile's backends "
                         f"({', '.join(['aot_eager', 'eager', *torch.compiler.list_backends()])}, ...), got "
                         f"{cfg.compile_backend!r}")
    if cfg.sync_bn and udist.env_world_size() > 1 and not udist.wants_cuda(cfg.device):
        raise ValueError("--sync-bn needs CUDA devices (torch's SyncBatchNorm has no CPU kernel); use --no-sync-bn "
                         "for CPU processes")
    need(finite(cfg.diverge_factor) and cfg.diverge_factor >= 0, "diverge_factor", "a number >= 0")
    if cfg.resume not in (None, "auto", "if-exists") and not Path(cfg.resume).is_file():
        raise ValueError(f"--resume {cfg.resume!r}: no such checkpoint file")
    out = Path(cfg.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):  # a name of its own: every torchrun rank checks at once
            pass
    except OSError as exc:
        raise ValueError(f"--out-dir {cfg.out_dir!r} is not a writable folder ({exc})") from None


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """Fill every None default from the method and the dataset (the saved config is self-contained)."""
    method, table, info = get_method(cfg.method), defaults_for(cfg.dataset), INFO[cfg.dataset]
    c = dataclasses.replace(cfg)
    c.family = method.family
    if c.label_budget is not None and c.family != "supervised":
        raise ValueError(f"--label-budget {c.label_budget}: {c.method} trains without labels; the label budget of its "
                         f"downstream head is eval's --label-budgets")
    if c.encoder is not None and c.family == "supervised":
        raise ValueError(f"--encoder {c.encoder}: {c.method} is a classifier, it has no p(z|x)")
    if c.encoder == "gaussian" and c.family == "ae":
        raise ValueError("--encoder gaussian: ae_trades is the deterministic auto-encoder (vae_urkle is the Gaussian one)")
    if c.encoder == "deterministic" and method.urkle:
        raise ValueError(f"--encoder deterministic: {c.method}'s Urkle KL needs a Gaussian p(z|x) (with a constant "
                         f"sigma of e^-10 the KL is ~e^20 |delta mu|^2 and training diverges)")
    if c.label_budget is not None and c.train_subset is not None:
        raise ValueError("--label-budget draws its class-balanced subset from the whole training set (the one "
                         "eval's heads see); drop --train-subset")
    c.encoder = None if c.family == "supervised" else (c.encoder or method.encoder)
    c.classifier = c.classifier or (table.head if c.family == "supervised" else None)
    c.decoder_output = c.decoder_output or {"vae": "sigmoid", "ae": "linear"}.get(c.family)
    c.objective_version = c.objective_version or OBJECTIVE_VERSION
    c.subset_order = c.subset_order or "shuffled"
    c.arch = c.arch or table.arch
    c.epochs = table.epochs if c.epochs is None else c.epochs
    c.batch_size = table.batch if c.batch_size is None else c.batch_size
    if c.batch_size < 1 or c.epochs < 1:
        raise ValueError(f"--batch-size and --epochs must be positive, got {c.batch_size} and {c.epochs}")
    c.stem = c.stem or ("cifar" if (c.image_size or info.image_size) <= 64 else "imagenet")
    c.d_z = c.d_z or ARCH_D_Z.get(c.arch, 128)
    c.proj_hidden = c.proj_hidden or (2048 if c.arch.startswith("resnet") else 256)
    c.proj_dim = c.proj_dim or (128 if c.arch.startswith("resnet") else 64)
    c.eps = table.train_eps if c.eps is None else c.eps
    c.pgd_alpha = method.alpha_rule * c.eps / max(1, c.pgd_steps) if c.pgd_alpha is None else c.pgd_alpha
    c.beta_robust = method.default_beta if c.beta_robust is None else c.beta_robust
    if c.beta_warmup_epochs is None:  # the ramp is an Urkle choice; the baselines run as their papers do
        c.beta_warmup_epochs = c.warmup_epochs if method.ramp else 0.0
    c.in_channels = c.in_channels or info.in_channels
    c.augment = c.augment or method.preset(c.in_channels)
    c.image_size = c.image_size or info.image_size
    c.pixel_mean = list(c.pixel_mean or info.mean)
    c.pixel_std = list(c.pixel_std or info.std)
    return c


# ----------------------------------------------------------------------------------------------
# the run: everything the loop touches


@dataclass
class Run:
    cfg: TrainConfig
    ctx: udist.DistContext
    method: Method
    model: nn.Module  # the model itself (not the DDP wrapper): state dicts, zero_grad, train()
    step_module: nn.Module  # the method's loss as a module; DDP-wrapped under torchrun without micro-batches
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: Any  # urkle_fast.data.loader interface
    log: RunLog
    spe: int  # optimiser steps per epoch
    end_step: int
    step: int = 0
    amp: bool = False
    channels_last: bool = False
    micro: Any = None  # images per chunk; None: the whole batch in one pass; "auto": not decided yet
    auto_micro: bool = False  # --micro-batch auto: a step that runs out of memory is retried with half the chunk
    saved_step: int = 0  # the step of the checkpoint on disk
    pending: Optional[tuple] = None  # (step, bytes) of a deferred checkpoint (see save)
    lock: Any = None  # rank 0: the open lock file of --out-dir (checkpoint.claim_folder)
    n_train: Optional[int] = None  # images in the training set (a resume must see the same number)

    @property
    def ckpt_path(self) -> Path:
        return Path(self.cfg.out_dir) / "checkpoint.pt"


class MethodStep(nn.Module):
    """The method's loss as a module's forward, so DistributedDataParallel can wrap it: the methods
    call model.encode / project / ... (and run attacks), which DDP's forward hooks would not see."""

    def __init__(self, model: nn.Module, method: Method):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, crops: torch.Tensor, labels: torch.Tensor, hp: LossParams, beta: float):
        return self.method.loss(self.model, crops, labels, hp, beta)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every generator's state as tensors and tuples (what a weights_only checkpoint can hold)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                      int(has_gauss), float(gauss)), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this process's device only: a resume on a machine with another number of visible GPUs must work
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # older checkpoints: every visible device's state
            cuda = cuda[torch.cuda.current_device()] if torch.cuda.current_device() < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def compile_model(model: nn.Module, backend: str) -> None:
    """Compile the submodules in place (nn.Module.compile): the state dict keeps its keys and the
    model keeps its methods (encode / project / decode / logits), each running compiled graphs."""
    for name in ("backbone", "head", "projector", "decoder", "classifier"):
        sub = getattr(model, name, None)
        if isinstance(sub, nn.Module):
            sub.compile(backend=backend, dynamic=False)


def _given(cfg: TrainConfig) -> set[str]:
    """The fields set on the command line (parse_args records them), else those that differ from the defaults."""
    given = getattr(cfg, "_given", None)
    if given is not None:
        return set(given)
    defaults = TrainConfig()
    return {f.name for f in dataclasses.fields(TrainConfig) if getattr(cfg, f.name) != getattr(defaults, f.name)}


def _load_resume(cfg: TrainConfig) -> tuple[TrainConfig, Optional[dict]]:
    """(the config to run, the checkpoint to continue from or None), refusing what would lose or mix runs."""
    out = Path(cfg.out_dir)
    ckpt_path, metrics = out / "checkpoint.pt", out / "metrics.jsonl"
    if cfg.resume == "if-exists" and not ckpt_path.exists():
        cfg = dataclasses.replace(cfg, resume=None, overwrite=True)  # a requeued job killed before its first save
    if not cfg.resume:
        held = [p.name for p in (ckpt_path, metrics) if p.exists() and p.stat().st_size > 0]
        if held and not cfg.overwrite:
            raise ValueError(f"--out-dir {str(out)!r} already holds a run ({', '.join(held)}): continue it with "
                             f"--resume (or --resume if-exists), start it afresh with --overwrite, or choose another "
                             f"--out-dir")
        return cfg, None
    source = ckpt_path if cfg.resume in ("auto", "if-exists") else Path(cfg.resume)
    if source.resolve() != ckpt_path.resolve() and not cfg.overwrite:
        held = [p.name for p in (ckpt_path, metrics) if p.exists() and p.stat().st_size > 0]
        if held:
            raise ValueError(f"--resume {str(source)!r} would continue into --out-dir {str(out)!r}, which holds another "
                             f"run ({', '.join(held)}): choose another --out-dir, or --overwrite it")
    state = load_checkpoint(source)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = {k: v for k, v in state["config"].items() if k in known}
    _fill_older(saved)
    given = _given(cfg) - set(RUNTIME_FIELDS) - set(FILLED_FIELDS)
    differ = {k: (saved.get(k), getattr(cfg, k)) for k in sorted(given) if getattr(cfg, k) != saved.get(k)}
    refused = {k: v for k, v in differ.items() if k not in APPLIED_ON_RESUME}
    if refused:
        shown = ", ".join(f"{_flag(k)} {new!r} (checkpoint: {old!r})" for k, (old, new) in refused.items())
        raise ValueError(f"--resume continues the checkpoint's run, and these flags would change what it computes: "
                         f"{shown}. Drop them, or start a new run (another --out-dir, or --overwrite)")
    applied = {k: v for k, v in differ.items() if k in APPLIED_ON_RESUME}
    for k, (old, new) in applied.items():
        print(f"resume: applying {_flag(k)} {new!r} (checkpoint: {old!r})", file=sys.stderr)
    merged = {**saved, **{k: getattr(cfg, k) for k in RUNTIME_FIELDS}, **{k: new for k, (_, new) in applied.items()}}
    return TrainConfig(**merged), state


def _fill_older(saved: dict) -> None:
    """Configs of checkpoints written before a field existed: the value those runs used."""
    family = saved.get("family") or get_method(saved.get("method")).family
    if family != "supervised":
        saved.setdefault("encoder", "deterministic" if family == "ae" else "gaussian")
        if family in ("vae", "ae"):
            saved.setdefault("decoder_output", "sigmoid")  # the auto-encoder was trained with BCE then
    else:
        saved.setdefault("classifier", "linear")
    saved.setdefault("beta_warmup_epochs", saved.get("warmup_epochs"))
    saved.setdefault("objective_version", 1)
    saved.setdefault("subset_order", "first")  # --train-subset read an ImageFolder tree's first N files then


def _labels_of(ds) -> torch.Tensor:
    """Every label of a training set without decoding its images."""
    if isinstance(ds, torch.utils.data.Subset):
        return _labels_of(ds.dataset)[torch.as_tensor(ds.indices, dtype=torch.long)]
    for owner in (ds, getattr(ds, "inner", None)):
        for attr in ("labels", "targets"):
            if getattr(owner, attr, None) is not None:
                return torch.as_tensor(getattr(owner, attr)).long()
    return torch.tensor([int(ds[i][1]) for i in range(len(ds))])


def _train_dataset(cfg: TrainConfig):
    ds = load_dataset(cfg.dataset, cfg.data_root, "train", image_size=cfg.image_size)
    if hasattr(ds, "skip_bad_images"):
        ds.skip_bad_images = cfg.skip_bad_images
        ds.skip_log = str(Path(cfg.out_dir) / "skipped_images.tsv")
    if cfg.train_subset:
        if isinstance(ds, InMemoryDataset):
            ds = InMemoryDataset(ds.images[: cfg.train_subset], ds.labels[: cfg.train_subset], ds.classes)
        else:  # an ImageFolder tree is stored class by class: its first N files would be a few classes
            classes = ds.classes
            order = subset_order(len(ds), by_class=cfg.subset_order != "first")  # "first": a run resumed as it began
            ds = torch.utils.data.Subset(ds, order[: cfg.train_subset].tolist())
            ds.classes = classes
    if cfg.label_budget:  # seed 0, as eval's heads: a model of the 1000-label column saw those 1000 images only
        try:
            idx = balanced_subset(_labels_of(ds), cfg.label_budget, seed=0)
        except ValueError as exc:
            raise ValueError(f"--label-budget {cfg.label_budget}: {exc}") from None
        if isinstance(ds, InMemoryDataset):
            ds = InMemoryDataset(ds.images[idx], ds.labels[idx], ds.classes)
        else:
            classes = ds.classes
            ds = torch.utils.data.Subset(ds, idx.tolist())
            ds.classes = classes
    return ds


def _model(cfg: TrainConfig, ctx: udist.DistContext, sync_bn: bool) -> nn.Module:
    model = build_model(asdict(cfg))
    if sync_bn and ctx.world_size > 1:
        if ctx.device.type != "cuda":
            raise ValueError("--sync-bn needs CUDA devices (torch's SyncBatchNorm has no CPU kernel); "
                             "use --no-sync-bn for CPU processes")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(ctx.device)


def setup(cfg: TrainConfig) -> Run:
    """Data, model, optimiser, schedule, loader and log of a run, restored from its checkpoint when
    resuming. Under torchrun the process group must exist already (main() starts it). Rank 0 holds the
    --out-dir's lock from here until train() ends (``run.lock``); when it is held, every rank is refused at once."""
    validate(cfg)
    lock = refused = None
    if udist.rank() == 0:
        try:
            lock = claim_folder(cfg.out_dir)  # before anything there is read or written
        except Exception as exc:  # in use, or the lock file cannot be opened / locked (permissions, a filesystem)
            refused = str(exc) if isinstance(exc, ValueError) else \
                f"--out-dir {str(cfg.out_dir)!r}: cannot lock it ({type(exc).__name__}: {exc})"
    # every rank learns rank 0's answer and stops with its message: torchrun's agent would end them once rank 0
    # exits, but a launcher that starts each process itself (srun) would leave them waiting --dist-timeout in the
    # first collective that rank 0 never joins
    refused = udist.gather_objects(refused)[0]
    if refused:
        raise ValueError(refused)
    try:
        run = _setup(cfg)
    except BaseException:
        release_folder(lock)
        raise
    run.lock = lock
    return run


def _setup(cfg: TrainConfig) -> Run:
    cfg, resume = _load_resume(cfg)
    cfg = resolve_config(cfg)
    ctx, method = udist.context(cfg.device), get_method(cfg.method)
    world, rank, on_cuda = ctx.world_size, ctx.rank, ctx.device.type == "cuda"
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} is the global batch and must be divisible by the "
                         f"number of processes ({world})")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    ds = _train_dataset(cfg)
    if resume is not None and resume.get("n_train") not in (None, len(ds)):  # (checkpoints before it: unchecked)
        raise ValueError(f"--resume: the training set now has {len(ds)} images (--data-root {cfg.data_root!r}), the "
                         f"checkpoint's run had {resume['n_train']}: its steps per epoch, schedule and data order would "
                         f"change. Resume with the same data, or start a new run (another --out-dir, or --overwrite)")
    if len(ds) < cfg.batch_size:  # no whole batch: no step (the loaders drop the last partial batch)
        which = (f" (--label-budget {cfg.label_budget})" if cfg.label_budget else
                 f" (--train-subset {cfg.train_subset})" if cfg.train_subset else f" ({cfg.dataset})")
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the training set{which}: {len(ds)} images")
    cfg.loader = resolve_loader(cfg.loader, ds, dataset=cfg.dataset, on_cuda=on_cuda,
                                train_subset=cfg.train_subset or cfg.label_budget,  # DALI would read every file
                                preset=cfg.augment, skip_bad_images=cfg.skip_bad_images)
    cfg.num_classes = cfg.num_classes or num_classes_of(ds)
    step = int(resume["step"]) if resume is not None else 0
    loader = make_train_loader(cfg.loader, ds, batch_size=cfg.batch_size, views=method.crops_per_image,
                               size=cfg.image_size, preset=cfg.augment, seed=cfg.seed, device=ctx.device, rank=rank,
                               world=world, num_workers=cfg.num_workers, position=step,
                               states=resume.get("loader_ranks") if resume is not None else None, lazy=True)
    spe = len(loader)
    total_steps = cfg.epochs * spe
    end_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    if resume is not None and step >= end_step:
        more = (f"pass --max-steps up to {total_steps} to continue" if end_step < total_steps
                else "its schedule has ended")
        raise RunFinished(f"nothing to do: {cfg.out_dir}/checkpoint.pt is at step {step} of {end_step} ({more})")
    if resume is not None and cfg.objective_version < OBJECTIVE_VERSION and cfg.method in CHANGED_IN_V2:
        raise ValueError(f"--resume: {cfg.out_dir} holds a {cfg.method} run of objective version {cfg.objective_version}; "
                         f"this version ({OBJECTIVE_VERSION}) trains {cfg.method} differently (docs/MATH.md sec 5), so "
                         f"continuing it would mix two objectives. Evaluate it as it is, or start a new run (another "
                         f"--out-dir, or --overwrite)")
    model = _model(cfg, ctx, (on_cuda and world > 1) if cfg.sync_bn is None else cfg.sync_bn)
    if world > 1:  # the same initial weights on every rank; from here on each rank draws its own noise
        seed_everything(cfg.seed + 7919 * rank)
    channels_last = on_cuda if cfg.channels_last is None else cfg.channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(int(cfg.warmup_epochs * spe), total_steps))
    if resume is not None:
        _restore(resume, model, optimizer, scheduler, ctx, cfg)
    if on_cuda if cfg.compile is None else cfg.compile:
        compile_model(model, cfg.compile_backend)
    local_batch = cfg.batch_size // world
    # None: the whole share in one pass; "auto": decided at the first step (fit_micro_batch)
    micro = cfg.micro_batch if cfg.micro_batch == "auto" or (cfg.micro_batch or local_batch) < local_batch else None
    if micro == "auto" and resume is not None and resume.get("world_size") == world and \
            resume.get("micro_chosen", "auto") != "auto":  # the chunks the run chose: batch norm sees the same ones
        micro = resume["micro_chosen"] if (resume["micro_chosen"] or local_batch) < local_batch else None
    step_module: nn.Module = MethodStep(model, method)
    if micro and world > 1:
        # chunks call the model several times per step, which DDP's reducer does not allow: the
        # gradients are averaged after the last chunk instead (urkle_fast.microbatch's contract)
        udist.broadcast_from_rank0([*model.parameters(), *model.buffers()])
    elif world > 1:
        step_module = nn.parallel.DistributedDataParallel(step_module, device_ids=[ctx.device.index] if on_cuda else None)
    out_dir = Path(cfg.out_dir)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        foreign = resume is not None and cfg.resume not in ("auto", "if-exists") and \
            Path(cfg.resume).resolve() != (out_dir / "checkpoint.pt").resolve()
        if resume is None or foreign:  # a fresh start (--overwrite, a requeued job that never saved) or another
            # run's checkpoint continued here (refused by _load_resume unless the folder was empty or --overwrite)
            for name in ("checkpoint.pt", "checkpoint.prev.pt", "metrics.jsonl", "curves.png", "skipped_images.tsv"):
                (out_dir / name).unlink(missing_ok=True)
        remove_stale_temp_files(out_dir)  # left by writes that a kill -9 interrupted
        write_text_atomic(out_dir / "config.json", json.dumps(asdict(cfg), indent=2))
    log = RunLog(out_dir, main_rank=ctx.is_main, log_every=cfg.log_every, start_step=step, end_step=end_step,
                 desc=f"{cfg.method}/{cfg.dataset}" + (f" x{world}" if world > 1 else ""), progress=cfg.progress,
                 tensorboard=cfg.tensorboard, resumed=resume is not None)
    return Run(cfg, ctx, method, model, step_module, optimizer, scheduler, loader, log, spe, end_step, step,
               amp=on_cuda if cfg.amp is None else cfg.amp, channels_last=channels_last, micro=micro,
               auto_micro=cfg.micro_batch == "auto", saved_step=step, n_train=len(ds))


def _restore(state: dict, model, optimizer, scheduler, ctx: udist.DistContext, cfg: TrainConfig) -> None:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    lr = cfg.base_lr * cfg.batch_size / 256
    if scheduler.base_lrs and lr != scheduler.base_lrs[0]:  # --base-lr given with --resume: the schedule continues
        scheduler.base_lrs = [lr] * len(optimizer.param_groups)
        for g in optimizer.param_groups:
            g["initial_lr"], g["lr"] = lr, lr * scheduler.lr_lambdas[0](scheduler.last_epoch)
    saved_ranks = state.get("rng_ranks") or [state["rng"]]
    if len(saved_ranks) == ctx.world_size:
        set_rng_state(saved_ranks[ctx.rank])
    elif ctx.is_main:
        print(f"resuming a {len(saved_ranks)}-process run with {ctx.world_size} processes: the data order and the "
              f"schedule continue exactly, the random streams (z samples, random starts) do not", file=sys.stderr)


def save(run: Run, loss: Optional[float], *, deferred: bool = False) -> Path:
    """A collective: every rank contributes its random and loader state; rank 0 writes, atomically.

    A model holding NaN / inf is never written (NonFiniteLossError). ``deferred``: the periodic checkpoints.
    Their weights have not yet been through a forward pass, and a diverging run can produce huge but finite
    weights that only the next step turns into NaN. So the snapshot is taken now and written by
    ``write_pending`` once the next step's loss is finite; a run that diverges keeps its last good checkpoint."""
    bad = non_finite_entries(unwrap(run.model).state_dict())
    if udist.all_reduce_mean(torch.tensor([float(bool(bad))], device=run.ctx.device))[0] > 0:
        raise NonFiniteLossError(
            f"the model holds NaN / inf at step {run.step} ({', '.join(bad[:3]) or 'on another rank'}); the checkpoint "
            f"was not written, the last good one is {run.ckpt_path if run.ckpt_path.exists() else 'none yet'} (step "
            f"{run.saved_step}). Resume it with a lower --base-lr, or lower --beta-robust / raise --sigma-min")
    rng_ranks = udist.gather_objects(rng_state())
    loader_ranks = udist.gather_objects(run.loader.state())
    run.pending = None
    if run.ctx.is_main:
        snapshot = checkpoint_bytes({
            "config": asdict(run.cfg), "model": unwrap(run.model).state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "step": run.step, "epoch": run.step // run.spe,
            "rng": rng_ranks[0], "rng_ranks": rng_ranks, "loader_ranks": loader_ranks, "world_size": run.ctx.world_size,
            "loss": loss, "torch_version": str(torch.__version__),
            "micro_chosen": run.micro,  # --micro-batch auto's choice (None: the whole batch; "auto": not made yet)
            "n_train": run.n_train,
        })
        if deferred:
            run.pending = (run.step, snapshot)
        else:
            if run.step > run.saved_step:
                # these weights have not been through a forward pass yet; the one on disk has (a periodic checkpoint
                # is written only after its next step's loss came out finite, a resumed one by this run's first step)
                _keep_previous(run)
            save_checkpoint(snapshot, run.ckpt_path)
    if not deferred:
        udist.barrier()
        run.saved_step = run.step
    return run.ckpt_path


def _keep_previous(run: Run) -> None:
    """checkpoint.prev.pt before an unchecked save replaces checkpoint.pt; a failure here (a full disk) must not
    stop the save itself, so it is a warning."""
    try:
        keep_previous(run.ckpt_path)
    except OSError as exc:
        print(f"warning: could not keep {run.ckpt_path} as {previous_path(run.ckpt_path)} before replacing it "
              f"({exc}); saving anyway", file=sys.stderr)


def write_pending(run: Run, *, checked: bool = True) -> None:
    """The deferred checkpoint (rank 0 writes). ``checked``: a finite loss has been computed from its weights, so
    the backup of an earlier unchecked save (checkpoint.prev.pt) is no longer needed and goes; otherwise (the
    error-time save) the checkpoint it replaces is kept as that backup."""
    if run.pending is not None:
        step, snapshot = run.pending
        if not checked:
            _keep_previous(run)
        save_checkpoint(snapshot, run.ckpt_path)
        if checked:
            previous_path(run.ckpt_path).unlink(missing_ok=True)
        run.saved_step, run.pending = step, None


# ----------------------------------------------------------------------------------------------
# the loop


def forward_backward(run: Run, crops, labels: torch.Tensor, hp: LossParams, beta: float) -> tuple[torch.Tensor, dict]:
    """The method's loss on this rank's batch and, in every p.grad, the gradient of the GLOBAL batch's
    loss: DDP's all-reduce, or chunk by chunk (urkle_fast.microbatch) then one flat all-reduce. ``crops``: a
    tensor or LazyViews (augmented chunk by chunk). With --micro-batch auto the chunk size is decided at the first
    step (kept in the checkpoint), and a step that runs out of memory in one process is retried with half the chunk."""
    while True:
        snapshot = StepSnapshot(run.model, run.ctx.device) if run.auto_micro and run.ctx.world_size == 1 else None
        try:
            if run.micro == "auto":
                _fit_micro_batch(run, crops, labels, hp, beta)
            return _forward_backward(run, crops, labels, hp, beta)
        except NonFiniteInputError as exc:
            raise NonFiniteLossError(
                f"non-finite values inside step {run.step} of {run.cfg.method} ({exc}): the model diverged. The last "
                f"good checkpoint is left as it was: {run.ckpt_path if run.ckpt_path.exists() else 'none was written yet'}"
                f". Resume it with a lower --base-lr, or lower --beta-robust / raise --sigma-min") from exc
        except (torch.OutOfMemoryError, RuntimeError, MemoryError) as exc:
            if not (is_out_of_memory(exc) or isinstance(exc, MemoryError)):
                raise
            n = run.micro if isinstance(run.micro, int) else crops.shape[1]
            if snapshot is None or n <= 1 or run.micro == "auto" or isinstance(exc, MemoryError):
                why = ("pass --micro-batch M with M < {n} (the gradient stays that of the whole batch), or start more "
                       "processes (torchrun --nproc-per-node)" if not run.auto_micro else
                       "under torchrun the processes cannot retry one step together: pass --micro-batch M with M < {n}"
                       if snapshot is None else "even the smallest chunk does not fit: start more processes, or "
                       "lower --image-size / --pgd-steps").format(n=n)
                raise StepOutOfMemoryError(
                    f"out of memory in the step at {n} images x {run.method.forward_rows} encoder rows each per process "
                    f"({run.cfg.arch}, {run.cfg.image_size} px): {why}. {str(exc).splitlines()[0]}") from exc
        # here, outside the handler, the failed try's frames (activations, views) are released
        snapshot.restore()
        run.micro = n // 2
        _say(run, f"--micro-batch auto: out of memory at {n} images per chunk; step {run.step} again with {run.micro}")


def _forward_backward(run: Run, crops, labels: torch.Tensor, hp: LossParams, beta: float):
    if isinstance(crops, LazyViews):
        crops.channels_last = run.channels_last
        if not run.micro:
            crops = crops.materialize()
    elif run.channels_last:
        crops = crops.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(crops.shape)
    run.model.zero_grad(set_to_none=True)
    if run.micro:
        loss, metrics = micro_batched_step(run.model, run.method, crops, labels, hp, beta, run.micro, amp=run.amp,
                                           on_chunk=run.log.chunk)
        udist.all_reduce_gradients(run.model)
        udist.broadcast_from_rank0(run.model.buffers())  # rank 0's batch-norm statistics, as DDP does
        return loss, metrics
    with torch.autocast(crops.device.type, dtype=torch.bfloat16, enabled=run.amp):
        loss, metrics = run.step_module(crops, labels, hp, beta)
    loss.backward()
    return loss.detach(), metrics


def _fit_micro_batch(run: Run, crops, labels: torch.Tensor, hp: LossParams, beta: float) -> None:
    """--micro-batch auto, before the first step: on the CPU the largest chunk that fits, estimated from small probe
    steps (urkle_fast.microbatch.estimate_micro_batch; the local processes share the machine's free memory and the
    ranks take the smallest chunk); on CUDA the whole batch first (an allocation that does not fit raises there).
    Then the run keeps it (saved in its checkpoints), halving only on out-of-memory. Raises MemoryError when even
    one image per chunk is predicted not to fit."""
    local = crops.shape[1]
    run.micro, why = None, ("CUDA: the whole batch first, halved on out-of-memory" if run.ctx.world_size == 1 else
                            "CUDA: the whole batch first (under torchrun a step out of memory stops the run, exit 4)")
    if run.ctx.device.type == "cpu":
        def probe(m: int) -> None:
            snapshot = StepSnapshot(run.model, run.ctx.device)
            views = crops[:, :m] if isinstance(crops, LazyViews) else crops[:, :m].contiguous()
            try:
                micro_batched_step(run.model, run.method, views, labels[:m], hp, beta, m, amp=run.amp)
            finally:
                snapshot.restore()

        _say(run, f"--micro-batch auto: measuring the memory of a step at a few images ({local} per process)")
        stored = (run.method.forward_rows * math.prod(crops.shape[2:]) * 4) if run.method.contrastive else 0
        udist.barrier()  # every local process reads the free memory before any of them probes
        share = int(os.environ.get("LOCAL_WORLD_SIZE", run.ctx.world_size))
        try:
            m, why = estimate_micro_batch(probe, local, stored_per_image=stored, share=share)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc):
                raise
            raise MemoryError(f"--micro-batch auto: a probe step of a few images ran out of memory "
                              f"({str(exc).splitlines()[0]})") from None
        run.micro = udist.all_reduce_min(m or local)
        run.micro = None if run.micro >= local else run.micro
    if run.micro is None and run.ctx.world_size > 1:  # the whole share in one pass: DDP reduces the gradients
        run.step_module = nn.parallel.DistributedDataParallel(
            run.step_module, device_ids=[run.ctx.device.index] if run.ctx.device.type == "cuda" else None)
    chosen = f"the whole batch ({local} images per process)" if run.micro is None else \
        f"{run.micro} images per chunk ({math.ceil(local / run.micro)} chunks of the {local} per process)"
    _say(run, f"--micro-batch auto: {chosen}; {why}")


def _say(run: Run, text: str) -> None:
    if run.ctx.is_main:
        run.log.write(text)


def _exploded(loss: float, first: float, factor: float) -> bool:
    return factor > 0 and math.isfinite(first) and abs(loss) > factor * max(abs(first), 1e-3)


def _finished(cfg: TrainConfig, note: str) -> dict:
    """train()'s result for a run that is already complete; the checkpoint is read, not written."""
    path = Path(cfg.out_dir) / "checkpoint.pt" if cfg.resume in ("auto", "if-exists") else Path(cfg.resume)
    state = load_checkpoint(path)
    if udist.rank() == 0:
        print(note, file=sys.stderr)
    return {"checkpoint": str(path), "step": int(state["step"]), "loss": state.get("loss"), "interrupted": None,
            "model": load_model(path)[0], "finished": True}


@dataclasses.dataclass
class _StepStart:
    """What a step changes before its optimiser step, as it was when the step began (after its batch was fetched):
    an error inside the step rolls these back, so that the error-time checkpoint is the last completed step."""
    step: int
    rng: dict
    buffers: dict  # batch-norm running statistics and counters (the step's forward updates them)
    updating: bool = False  # the optimiser step has begun: the weights may be half updated

    @classmethod
    def of(cls, run: Run) -> Optional["_StepStart"]:
        if run.ctx.world_size > 1:  # error-time saves are single-process (_save_on_error)
            return None
        return cls(run.step, rng_state(), {k: b.detach().clone() for k, b in unwrap(run.model).named_buffers()})

    @torch.no_grad()
    def restore(self, run: Run) -> None:
        set_rng_state(self.rng)
        for k, b in unwrap(run.model).named_buffers():
            b.copy_(self.buffers[k])


def _save_on_error(run: Run, loss: Optional[float], start: Optional[_StepStart] = None) -> None:
    """An unexpected error in the loop: keep the last completed step. A periodic snapshot taken at this very
    step is the consistent one, written by a single process. Under torchrun nothing is written: the error may
    be a peer that stopped on NaN / inf in this very step (its checks are its own), so the snapshot's weights may
    be the diverged ones; the last checkpoint written stays. Otherwise, one process only (a collective save cannot
    run when one rank has failed): an error inside a step (``start``) first rolls back what that step had touched
    (random states, batch-norm statistics; the weights and the optimiser change only in its optimiser step, and an
    error there keeps the last checkpoint), so the resumed run redoes it exactly. The torch loader resumes at the
    step's batch by itself; DALI's position cannot be rewound past a fetched batch, so there the last checkpoint
    written stays."""
    if run.ctx.world_size > 1:
        return
    if run.pending is not None and run.pending[0] == run.step and run.ctx.is_main:
        try:
            write_pending(run, checked=False)
            print(f"error at step {run.step}: saved the checkpoint of that step to {run.ckpt_path}; fix the cause "
                  f"and continue with --resume", file=sys.stderr)
        except Exception as exc:
            print(f"error at step {run.step}; its checkpoint could not be saved either ({exc})", file=sys.stderr)
        return
    if run.step <= run.saved_step:
        return
    if start is not None and start.step == run.step:  # the error came inside this step
        why = ("in the optimiser step: the weights may be half updated" if start.updating else
               "DALI's loader cannot be rewound to that step's batch" if not isinstance(run.loader, TorchMultiView)
               else None)
        if why:
            kept = run.ckpt_path if run.ckpt_path.exists() else "none was written yet"
            print(f"error in step {run.step}, {why}, so the last checkpoint stays ({kept}, step {run.saved_step}); "
                  f"fix the cause and continue with --resume", file=sys.stderr)
            return
        start.restore(run)
    try:
        path = save(run, loss)
        print(f"error at step {run.step}: saved the last completed step to {path}; fix the cause and continue "
              f"with --resume", file=sys.stderr)
    except Exception as exc:  # the original error is the one to report
        print(f"error at step {run.step}; the last completed step could not be saved either ({exc})", file=sys.stderr)


@contextlib.contextmanager
def stop_signals() -> Iterator[dict]:
    """{"signum": None | the SIGTERM / SIGINT received}; handlers only from the main thread (elsewhere a
    signal keeps its default action). The first signal stops the run after the step in progress (checkpointed);
    a second one stops it at once (StoppedNow), since a micro-batched step of batch 4096 on a CPU can take hours."""
    got: dict = {"signum": None}
    in_main = threading.current_thread() is threading.main_thread()

    def handler(signum, frame):
        if got["signum"] is not None:
            # torchrun forwards the signal it gets to its workers and Slurm signals every process of a job step, so
            # one preemption can arrive twice within milliseconds: only a later one means "now"
            if time.monotonic() - got["at"] >= SECOND_SIGNAL_AFTER_S:
                raise StoppedNow(signal.Signals(signum).name)
            return
        got.update(signum=signum, at=time.monotonic())
        if udist.rank() == 0:
            print(f"\nreceived {signal.Signals(signum).name}: stopping after the step in progress, which is then "
                  f"checkpointed; send it again (after {SECOND_SIGNAL_AFTER_S:g} s) to stop now (that step is lost)",
                  file=sys.stderr)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)} if in_main else {}
    try:
        yield got
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def train(cfg: TrainConfig) -> dict:
    """Train one run; returns {"checkpoint", "step", "loss", "interrupted" (signal number or None), "model", "micro"
    (the images per chunk: None for the whole batch)}.

    Under torchrun every process calls this (after urkle_fast.distributed.init_distributed): DDP over a
    MethodStep, the global NT-Xent, rank 0 writes checkpoints and metrics. Raises DataRootError,
    CheckpointError, NonFiniteLossError, StepOutOfMemoryError, ValueError with clear messages."""
    try:
        run = setup(cfg)
    except RunFinished as done:
        return _finished(cfg, str(done))
    cfg, hp = run.cfg, LossParams.of(run.cfg)
    last_loss = first_loss = start = None
    first_step = run.step  # a resumed run's first step is the one that checks the weights it resumed from
    stopping = False  # every rank agrees on it (all-reduced with the loss each step)
    run.model.train()
    batches = forever(run.loader) if run.step < run.end_step else iter(())
    with stop_signals() as signalled:
        try:
            for crops, labels in batches:
                start = _StepStart.of(run)
                epoch = run.step // run.spe
                # the robustness term ramps in (urkle_fast.optim.beta_ramp)
                beta = cfg.beta_robust * beta_ramp(run.step, cfg.beta_warmup_epochs * run.spe)
                # the loss (attacks inside) and the gradient of the global batch
                loss, metrics = forward_backward(run, crops, labels, hp, beta)
                # one small all-reduce: the mean loss over ranks and whether any rank was signalled
                last_loss, stopping = udist.loss_and_stop(loss, signalled["signum"] is not None)
                first_loss = last_loss if first_loss is None else first_loss
                if not math.isfinite(last_loss) or _exploded(last_loss, first_loss, cfg.diverge_factor):
                    raise NonFiniteLossError(
                        f"loss is {last_loss:.4g} at step {run.step} (epoch {epoch}) of {cfg.method} on {cfg.dataset}"
                        f" (the first step's: {first_loss:.4g}); "
                        f"stopped before the optimiser step. The last good checkpoint is left as it was: "
                        f"{run.ckpt_path if run.ckpt_path.exists() else 'none was written yet'}"
                        + (f"; this run resumed from it, and if it was a final or stop-time save (weights not yet "
                           f"through a forward pass) the one before it is kept: continue from that one in a new "
                           f"folder with --resume {previous_path(run.ckpt_path)} --out-dir <new folder>"
                           if cfg.resume and run.step == first_step and previous_path(run.ckpt_path).exists()
                           else "")
                        + ". Lower --base-lr or --beta-robust, or raise --sigma-min")
                write_pending(run)  # the weights of the last periodic checkpoint gave a finite loss
                if start is not None:
                    start.updating = True
                run.optimizer.step()
                run.scheduler.step()
                run.step += 1
                run.log.step(run.step, epoch, last_loss, run.scheduler.get_last_lr()[0], metrics, cfg.batch_size)
                if cfg.ckpt_every and run.step % cfg.ckpt_every == 0:
                    save(run, last_loss, deferred=True)
                stopping = stopping or (run.ctx.world_size == 1 and signalled["signum"] is not None)
                if run.step >= run.end_step or stopping:
                    break
            path = save(run, last_loss)
        except NonFiniteLossError:
            raise  # the model may be bad: the last good checkpoint stays
        except Exception:
            _save_on_error(run, last_loss, start)
            raise
        finally:
            getattr(batches, "close", lambda: None)()  # the loader's decoding workers end here, error or not
            run.log.close(f"{cfg.method} on {cfg.dataset}, batch {cfg.batch_size}"
                          + (f", {run.ctx.world_size} processes" if run.ctx.world_size > 1 else ""), label=cfg.method)
            release_folder(run.lock)
    skipped = Path(cfg.out_dir) / "skipped_images.tsv"
    if run.ctx.is_main and skipped.exists():
        n = len({ln.split("\t")[0] for ln in skipped.read_text().splitlines() if ln.strip()})
        print(f"--skip-bad-images: {n} unreadable image file(s) skipped, listed in {skipped}", file=sys.stderr)
    interrupted = (signalled["signum"] or signal.SIGTERM) if stopping else None
    if interrupted is not None and run.ctx.is_main:
        print(f"\nreceived {signal.Signals(interrupted).name}: saved {path} at step {run.step}; "
              f"continue with --out-dir {cfg.out_dir} --resume", file=sys.stderr)
    return {"checkpoint": str(path), "step": run.step, "loss": last_loss, "interrupted": interrupted,
            "model": unwrap(run.model), "micro": run.micro}


# ----------------------------------------------------------------------------------------------
# command line


def parse_args(argv: Optional[list[str]] = None) -> TrainConfig:
    """The config of the flags; ``cfg._given`` records which fields the command line set (--resume checks them)."""
    p = parser_for(TrainConfig, "python -m urkle_fast.train", __doc__.split("\n\n")[0])
    cfg = config_from(TrainConfig, p.parse_args(argv))
    cfg._given = given_fields(p, argv)
    return cfg


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = None
    try:
        if not argv or "--demo" in argv:
            from urkle_fast.demo import main as demo_main  # the default job (it evaluates, so it imports eval)

            return demo_main([a for a in argv if a != "--demo"])
        cfg = parse_args(argv)
        validate(cfg)  # before the process group: its flags are named too
        udist.init_distributed(cfg.device, cfg.dist_backend, timeout_s=cfg.dist_timeout)
        result = train(cfg)
    except (DataRootError, CheckpointError, NonFiniteLossError, StepOutOfMemoryError, ValueError) as exc:
        msg = exc.summary if isinstance(exc, BadImageError) else str(exc)
        print(f"error: {msg}" if udist.rank() == 0 else f"error (rank {udist.rank()}): {msg}", file=sys.stderr)
        return {NonFiniteLossError: 3, StepOutOfMemoryError: 4}.get(type(exc), 2)
    except StoppedNow as exc:
        out = Path(cfg.out_dir) / "checkpoint.pt" if cfg is not None else None  # None: the demo's two runs
        last = ("the run's last checkpoint stays as it was" if out is None else
                f"the last checkpoint is {out}" if out.exists() else "no checkpoint was saved yet")
        print(f"\nreceived {exc} again: stopped inside the step; {last}", file=sys.stderr)
        return 128 + int(getattr(signal, str(exc)))
    finally:
        udist.shutdown()
    if result["interrupted"] is not None:
        return 128 + int(result["interrupted"])
    if os.environ.get("RANK", "0") == "0" and not result.get("finished"):  # the process group is gone by now
        print(f"done: {result['step']} steps, last loss {result['loss']:.4f}, checkpoint {result['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
