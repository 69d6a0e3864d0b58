"""torch.distributed for the trainer: process groups from torchrun, the global NT-Xent, and helpers.

Launch (one process per GPU, NCCL; or CPU processes, gloo):

    torchrun --nproc-per-node 8 -m urkle_fast.train --dataset imagenet --data-root /data/imagenet --batch 4096 \
        --micro-batch 128      # 512 images per GPU in chunks of 128 (urkle_fast.microbatch)
    torchrun --nproc-per-node 2 -m urkle_fast.train --dataset digits --device cpu     # gloo

``--batch`` is the GLOBAL batch: each of the W ranks takes a disjoint slice of B / W images of every
global batch (urkle_fast.data.epoch_batches(shard=...)), so a run's data order and its schedule do
not depend on W.

The contrastive loss is global, as in SimCLR: ``nt_xent_global`` all-gathers the embeddings of every
rank (the columns of the similarity matrix) and computes the loss of this rank's rows against all
N = V * B columns with the fused op's row offset (docs/KERNEL_CONTRACT.md), one call per view
block, since a rank's rows are V separate runs of the view-major global order. The gather's
backward sums the column gradients of every rank (reduce-scatter on NCCL, all-reduce + slice on
gloo, which has no reduce-scatter). Each rank's loss is scaled to the mean over ITS rows; DDP then
averages the parameter gradients over ranks, which gives exactly the gradient of the global mean.
tests/test_distributed.py checks that against the single-process loss on real gloo process groups.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from urkle_fast.ops._checks import check_finite
from urkle_fast.ops.nt_xent import DENOMINATORS, check_nt_xent_args

__all__ = ["DistContext", "init_distributed", "is_distributed", "world_size", "rank", "all_gather_with_grad",
           "nt_xent_global", "all_reduce_mean", "gather_objects", "barrier", "shutdown"]


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: rank among world_size, its local rank and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None  # None: no process group (a single process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def init_distributed(device: str = "auto", backend: Optional[str] = None, timeout_s: float = 1800.0) -> DistContext:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Without WORLD_SIZE (or with WORLD_SIZE=1) there is nothing to join: a single-process context on
    ``device`` ("auto": CUDA when available). With several processes: NCCL on CUDA devices (process
    i uses cuda:LOCAL_RANK), gloo on the CPU; ``backend`` overrides the choice. If a group already
    exists (e.g. a test created one) it is used as it is."""
    world = _env_int("WORLD_SIZE", 1)
    if device not in ("auto", "cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    want_cuda = torch.cuda.is_available() if device == "auto" else str(device).startswith("cuda")
    if want_cuda and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but torch.cuda.is_available() is False")
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        dev = torch.device(device if str(device).startswith("cuda:") else ("cuda" if want_cuda else "cpu"))
        return DistContext(device=dev)
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    local_rank = _env_int("LOCAL_RANK", 0)
    if want_cuda:
        n_gpu = torch.cuda.device_count()
        if local_rank >= n_gpu:
            raise ValueError(f"LOCAL_RANK={local_rank} but only {n_gpu} CUDA devices are visible; start at most "
                             f"{n_gpu} processes per node (torchrun --nproc-per-node {n_gpu})")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if backend is None:
        backend = "nccl" if want_cuda else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    if backend == "nccl" and not want_cuda:
        raise ValueError("backend 'nccl' needs CUDA devices; use 'gloo' for CPU processes")
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
        if backend == "nccl":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
    else:
        backend = dist.get_backend()
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev,
                       backend=backend)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# torch 2.14 renamed the tensor collectives (*_single) and deprecated the old names; 2.11 has only those
_ALL_GATHER = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)


class _AllGather(torch.autograd.Function):
    """[n, ...] on each rank -> [W * n, ...] in rank order; backward: this rank's slice of the SUM of
    every rank's gradient (each rank's loss reads every rank's rows)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        W = dist.get_world_size()
        x = x.contiguous()
        out = x.new_empty((W * x.shape[0],) + tuple(x.shape[1:]))
        _ALL_GATHER(out, x)
        ctx.n, ctx.r = x.shape[0], dist.get_rank()
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            out = grad.new_empty((ctx.n,) + tuple(grad.shape[1:]))
            _REDUCE_SCATTER(out, grad, op=dist.ReduceOp.SUM)
            return out
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # gloo: no reduce-scatter
        return grad[ctx.r * ctx.n:(ctx.r + 1) * ctx.n]


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` of every rank along dim 0 (rank order), differentiably. Identity when not
    distributed. Every rank must pass the same shape."""
    if not is_distributed():
        return x
    return _AllGather.apply(x)


def nt_xent_global(z: Tensor, *, views: int, temperature: float = 0.5, denominator: str = "all") -> Tensor:
    """NT-Xent over the views of the GLOBAL batch: this rank's rows against every rank's columns.

    ``z``: this rank's [V, b, d] (or view-major [V*b, d]) embeddings; every rank passes the same b.
    Returns this rank's mean over its V*b rows of ``1/(V-1) sum_p [log D_i - s_ip]``, so the mean of
    the returned values over ranks is urkle_fast.nt_xent of the concatenated global batch, and DDP's
    gradient averaging gives its exact gradient. Single process: equal to urkle_fast.nt_xent."""
    from urkle_fast.ops.nt_xent import nt_xent

    if not is_distributed():
        return nt_xent(z, views=views, temperature=temperature, denominator=denominator)
    N_local, b, d = check_nt_xent_args("nt_xent_global", z, views, temperature, denominator)
    check_finite("nt_xent_global", {"z": z})
    W, r = dist.get_world_size(), dist.get_rank()
    z3 = z.reshape(views, b, d)
    # [W * V * b, d] in rank order -> the global view-major order [V, W * b, d]
    cols = all_gather_with_grad(z3.reshape(N_local, d)).view(W, views, b, d).transpose(0, 1).reshape(W * N_local, d)
    B = W * b
    den = DENOMINATORS[denominator]
    total = z.new_zeros((), dtype=torch.float32)
    for v in range(views):
        loss_rows, _ = torch.ops.urkle_fast.nt_xent_fwd(z3[v], cols, views, float(temperature), den, v * B + r * b)
        total = total + loss_rows.sum()
    return total / (N_local * (views - 1))


def all_reduce_mean(values: Tensor) -> Tensor:
    """Mean over ranks of a small tensor (a copy; unchanged when not distributed)."""
    if not is_distributed():
        return values
    out = values.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order, on every rank ([obj] when not distributed)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
