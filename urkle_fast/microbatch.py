"""Micro-batched training steps: a batch larger than device memory, with the gradient of the whole batch.

SimCLR+Urkle at batch 4096 on ImageNet forwards 4 x 4096 images of 224 pixels per step. Split over W
GPUs that is still 16384 / W images per GPU through a ResNet-50, more activations than a GPU holds.
``micro_batched_step`` computes the step in chunks of ``micro`` images and still returns the exact
gradient of the full-batch loss (up to float rounding):

* Per-sample methods (standard, at, trades, vae_urkle, ae_trades): their losses are means over the
  batch, so each chunk's loss is weighted by its share of the batch and back-propagated at once
  (gradient accumulation).
* Contrastive methods (simclr_urkle, simclr, rocl): NT-Xent couples every row with every other, so
  plain accumulation would shrink the negatives to one chunk. Instead (Gao et al. 2021, "gradient
  cache"): (1) the attack for each chunk; (2) the projections of every chunk without autograd;
  (3) the NT-Xent over all of them (and, under torch.distributed, over every rank's, through
  urkle_fast.distributed.nt_xent_global) and its gradient dL/dP with respect to the projections;
  (4) each chunk forwarded again with autograd and back-propagated with the surrogate <P_c, dL/dP_c>
  (+ the chunk's share of the Urkle KL). Step (4) replays the random state of step (2), so both
  draw the same z samples, and step (2) runs batch norm with momentum 0, so the running statistics
  are updated once per chunk, in step (4). The cost is one extra forward pass per step.

What is not the full-batch computation, by design: batch norm sees one chunk at a time (as it sees one
rank at a time under DDP without SyncBatchNorm), and RoCL's attack takes its negatives from the chunk.
tests/test_microbatch.py checks the gradient against the unchunked loss on a model without batch
norm, and the batch-norm buffers against the unchunked step.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn as nn
from torch import Tensor

from urkle_fast.distributed import nt_xent_global
from urkle_fast.methods import METHODS, contrastive_inputs
from urkle_fast.ops.gaussian_kl import gaussian_kl

CONTRASTIVE = ("simclr_urkle", "simclr", "rocl")


def chunks(n: int, micro: int) -> list[slice]:
    """[0, n) in consecutive slices of `micro` (the last may be shorter)."""
    if isinstance(micro, bool) or not isinstance(micro, int) or micro < 1:
        raise ValueError(f"micro_batch must be a positive int, got {micro!r}")
    return [slice(i, min(i + micro, n)) for i in range(0, n, micro)]


@contextlib.contextmanager
def batch_norm_stats_frozen(model: nn.Module) -> Iterator[None]:
    """Batch norm in train mode (batch statistics) that leaves its running statistics unchanged."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in norms]
    try:
        for m in norms:
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


class _RandomState:
    """Snapshot / replay of the CPU and current-CUDA-device generators (z samples use them)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(device) if self.cuda else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu_state)
        if self.cuda:
            torch.cuda.set_rng_state(self.cuda_state, self.device)


def _embed(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    mu, logvar = model.encode(x)
    return model.project(model.sample(mu, logvar)), mu, logvar


def micro_batched_step(model: nn.Module, method: str, views: Tensor, labels: Tensor, cfg: Any, micro: int, *,
                       amp: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """Accumulate into ``p.grad`` the gradient of ``METHODS[method](model, views, labels, cfg)``, computed
    in chunks of ``micro`` images; returns (loss, metrics) as the method would (detached).

    views: [V, B, C, H, W] (this rank's images under torch.distributed), labels: [B]. The caller
    zeroes the gradients before and steps the optimiser after; under torch.distributed it also
    averages the gradients over ranks (the model must not be wrapped in DDP: the chunks call it
    several times per step)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(METHODS)}")
    B = views.shape[1]
    parts = chunks(B, micro)
    dev_type = views.device.type
    autocast = lambda: torch.autocast(dev_type, dtype=torch.bfloat16, enabled=amp)  # noqa: E731
    if method not in CONTRASTIVE:
        total: Tensor = views.new_zeros((), dtype=torch.float32)
        metrics: dict[str, Tensor] = {}
        for sl in parts:
            w = (sl.stop - sl.start) / B
            with autocast():
                loss, m = METHODS[method](model, views[:, sl], labels[sl], cfg)
            (loss * w).backward()
            total = total + loss.detach() * w
            for k, v in m.items():
                metrics[k] = metrics.get(k, 0.0) + v.detach().float() * w
        return total, metrics

    # (1) attacks and (2) projections without autograd
    inputs, states, projections = [], [], []
    for sl in parts:
        with autocast():
            x, V = contrastive_inputs(method, model, views[:, sl], cfg)
        inputs.append(x)
        states.append(_RandomState(views.device))
        with torch.no_grad(), batch_norm_stats_frozen(model), autocast():
            p, _, _ = _embed(model, x)
        projections.append(p.view(V, sl.stop - sl.start, -1))
    after = _RandomState(views.device)
    # (3) the loss over every chunk (and every rank) and its gradient with respect to the projections
    P = torch.cat(projections, dim=1).detach().requires_grad_(True)
    con = nt_xent_global(P, views=V, temperature=cfg.temperature, denominator=cfg.denominator)
    (dP,) = torch.autograd.grad(con, P)
    # (4) each chunk again, with autograd, back-propagating <P_c, dL/dP_c> (+ its share of the KL)
    beta = float(getattr(cfg, "beta_robust", 0.0))
    kl_total = views.new_zeros((), dtype=torch.float32)
    for sl, x, state in zip(parts, inputs, states):
        state.restore()
        with autocast():
            p, mu, logvar = _embed(model, x)
            surrogate = (p.float() * dP[:, sl].reshape(p.shape)).sum()
            if method == "simclr_urkle":
                n = x.shape[0] // 2  # clean rows, then their adversaries
                kl_sum = gaussian_kl(mu[:n], logvar[:n], mu[n:], logvar[n:], reduction="sum")
                surrogate = surrogate + beta * kl_sum / (2 * B)
                kl_total = kl_total + kl_sum.detach() / (2 * B)
        surrogate.backward()
    after.restore()
    con = con.detach()
    if method == "simclr_urkle":
        return con + beta * kl_total, {"nt_xent": con, "urkle_kl": kl_total}
    return con, {"nt_xent": con}


@torch.no_grad()
def _coalesced(tensors, collective) -> None:
    """Run ``collective`` once per (dtype, device) on the flattened tensors and copy the result back:
    one collective instead of one per tensor (a ResNet-50 has ~160 buffers)."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    groups: dict = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        flat = _flatten_dense_tensors(group)
        collective(flat)
        for t, new in zip(group, _unflatten_dense_tensors(flat, group)):
            t.copy_(new)


def all_reduce_gradients(model: nn.Module) -> None:
    """Average every parameter's gradient over the ranks (one flat all-reduce), as DDP would."""
    import torch.distributed as dist

    from urkle_fast.distributed import is_distributed

    if not is_distributed():
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:  # every rank must contribute the same tensors
            p.grad = torch.zeros_like(p)
    W = dist.get_world_size()
    _coalesced([p.grad for p in params], lambda flat: (dist.all_reduce(flat), flat.div_(W)))


def broadcast_from_rank0(tensors) -> None:
    """Rank 0's values of ``tensors`` (parameters, batch-norm statistics) on every rank, as DDP's
    construction and its broadcast_buffers do."""
    import torch.distributed as dist

    from urkle_fast.distributed import is_distributed

    if is_distributed():
        _coalesced(list(tensors), lambda flat: dist.broadcast(flat, src=0))
