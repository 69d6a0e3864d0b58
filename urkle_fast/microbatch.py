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
  (3) the NT-Xent over all of them (and, under torch.distributed, over every rank's:
  nt_xent(..., gather_distributed=True)), or the method's own ``contrast`` (RoCL), and its gradient
  dL/dP with respect to the projections;
  (4) each chunk forwarded again with autograd and back-propagated with the surrogate <P_c, dL/dP_c>
  (+ the chunk's share of the method's extra term, the Urkle KL for SimCLR+Urkle). Step (4)
  replays the random state of step (2), so both draw the same z samples, and step (2) runs batch
  norm with momentum 0, so the running statistics are updated once per chunk, in step (4). The cost
  is one extra forward pass per step. Only the method's parts are called (``Method.inputs``,
  ``Method.extra``, ``Method.contrast_loss``): no method is named here, and a new contrastive method needs nothing here.

What is not the full-batch computation, by design: batch norm sees one chunk at a time (as it sees one
rank at a time under DDP without SyncBatchNorm), and RoCL's attack takes its negatives from the chunk.
tests/test_microbatch.py checks the gradient against the unchunked loss on a model without batch
norm, and the batch-norm buffers against the unchunked step.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn
from torch import Tensor

from urkle_fast.methods import LossParams, Method, embed


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


def micro_batched_step(model: nn.Module, method: Method, crops: Tensor, labels: Tensor, hp: LossParams, beta: float,
                       micro: int, *, amp: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """Accumulate into ``p.grad`` the gradient of ``method.loss(model, crops, labels, hp, beta)``,
    computed in chunks of ``micro`` images; returns (loss, metrics) as the method would (detached).

    crops: [V, B, C, H, W] (this rank's images under torch.distributed), labels: [B]. The caller
    zeroes the gradients before and steps the optimiser after; under torch.distributed it also
    averages the gradients over ranks (the model must not be wrapped in DDP: the chunks call it
    several times per step)."""
    if not isinstance(method, Method):
        raise TypeError(f"method must be a urkle_fast.methods.Method (get_method(name)), got {method!r}")
    parts = chunks(crops.shape[1], micro)
    autocast = lambda: torch.autocast(crops.device.type, dtype=torch.bfloat16, enabled=amp)  # noqa: E731
    if method.contrastive:
        return _gradient_cache(model, method, crops, hp, beta, parts, autocast)
    B = crops.shape[1]
    total: Tensor = crops.new_zeros((), dtype=torch.float32)
    metrics: dict[str, Tensor] = {}
    for sl in parts:
        w = (sl.stop - sl.start) / B
        with autocast():
            loss, m = method.loss(model, crops[:, sl], labels[sl], hp, beta)
        (loss * w).backward()
        total = total + loss.detach() * w
        for k, v in m.items():
            metrics[k] = metrics.get(k, 0.0) + v.detach().float() * w
    return total, metrics


def _gradient_cache(model, method: Method, crops: Tensor, hp: LossParams, beta: float, parts, autocast):
    """The contrastive path: steps (1)-(4) of the module docstring, from the method's parts only."""
    B = crops.shape[1]
    # (1) attacks and (2) projections without autograd
    inputs, states, projections = [], [], []
    for sl in parts:
        with autocast():
            x, V = method.inputs(model, crops[:, sl], hp)
        inputs.append(x)
        states.append(_RandomState(crops.device))
        with torch.no_grad(), batch_norm_stats_frozen(model), autocast():
            p, _, _ = embed(model, x)
        projections.append(p.view(V, sl.stop - sl.start, -1))
    after = _RandomState(crops.device)
    # (3) the loss over every chunk (and every rank) and its gradient with respect to the projections
    P = torch.cat(projections, dim=1).detach().requires_grad_(True)
    con, metrics = method.contrast_loss(P.flatten(0, 1), V, hp, beta)
    (dP,) = torch.autograd.grad(con, P)
    # (4) each chunk again, with autograd, back-propagating <P_c, dL/dP_c> (+ its share of the extra term)
    extra, n_terms = method.extra, (method.extra.count(B) if method.extra else 1)
    extra_total = crops.new_zeros((), dtype=torch.float32)
    for sl, x, state in zip(parts, inputs, states):
        state.restore()
        with autocast():
            p, mu, logvar = embed(model, x)
            surrogate = (p.float() * dP[:, sl].reshape(p.shape)).sum()
            if extra is not None:
                term_sum = extra.fn(mu, logvar, "sum")
                surrogate = surrogate + beta * term_sum / n_terms
                extra_total = extra_total + term_sum.detach() / n_terms
        surrogate.backward()
    after.restore()
    con = con.detach()
    if extra is None:
        return con, metrics
    return con + beta * extra_total, {**metrics, extra.name: extra_total}
