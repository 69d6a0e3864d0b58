"""Every torch.distributed call of the project, in one module (as lightly's utils/dist.py).

Launch (one process per GPU, NCCL; or CPU processes, gloo):

    torchrun --nproc-per-node 8 -m urkle_fast.train --dataset imagenet --data-root /data/imagenet --batch 4096 \
        --micro-batch 128      # 512 images per GPU in chunks of 128 (urkle_fast.microbatch)
    torchrun --nproc-per-node 2 -m urkle_fast.train --dataset digits --device cpu     # gloo

The process group is started by the command-line entry points (``main()`` of train and eval) with
``init_distributed``; library code only asks ``context()`` where this process sits.

``--batch`` is the GLOBAL batch: each of the W ranks takes a disjoint slice of B / W images of every
global batch (urkle_fast.data.epoch_batches(shard=...)), so a run's data order and its schedule do
not depend on W.

What lives here: the process group (init_distributed, context, shutdown); the differentiable
all-gather that the global NT-Xent (``urkle_fast.ops.nt_xent(..., gather_distributed=True)``) reads
its columns through; the training collectives (the mean of the loss, the gradient all-reduce and
the rank-0 broadcasts of the micro-batched path, rank-0 checkpoints' gathered RNG states); and the
evaluation sharding (whole attack batches per rank, rows gathered back, heads broadcast).
tests/test_distributed.py checks them on real gloo process groups.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor


__all__ = ["DistContext", "init_distributed", "context", "is_distributed", "world_size", "rank",
           "all_gather_with_grad", "all_reduce_mean", "loss_and_stop", "gather_objects", "barrier", "shutdown",
           "all_reduce_gradients", "broadcast_from_rank0", "batch_shard", "gather_rows", "broadcast_module"]


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


def _device_of(device: str) -> tuple[bool, int, torch.device]:
    """(wants CUDA, LOCAL_RANK, this process's device) for ``device`` in auto / cpu / cuda / cuda:N."""
    if device not in ("auto", "cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if str(device).startswith("cuda:") and not str(device)[5:].isdigit():
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    want_cuda = torch.cuda.is_available() if device == "auto" else str(device).startswith("cuda")
    if want_cuda and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but torch.cuda.is_available() is False")
    if str(device).startswith("cuda:") and int(str(device)[5:]) >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    local_rank = _env_int("LOCAL_RANK", 0)
    if not (_env_int("WORLD_SIZE", 1) > 1 or is_distributed()):
        return want_cuda, 0, torch.device(device if str(device).startswith("cuda:") else ("cuda" if want_cuda else "cpu"))
    if not want_cuda:
        return False, local_rank, torch.device("cpu")
    n_gpu = torch.cuda.device_count()
    if local_rank >= n_gpu:
        raise ValueError(f"LOCAL_RANK={local_rank} but only {n_gpu} CUDA devices are visible; start at most "
                         f"{n_gpu} processes per node (torchrun --nproc-per-node {n_gpu})")
    return True, local_rank, torch.device("cuda", local_rank)


def env_world_size() -> int:
    """The number of processes torchrun started (WORLD_SIZE; 1 without torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def wants_cuda(device: str) -> bool:
    """Whether ``device`` (auto / cpu / cuda / cuda:N) puts this process on a GPU."""
    return _device_of(device)[0]


def check_device_flags(device: str, backend: Optional[str] = None) -> None:
    """--device and --dist-backend, before any work (the entry points' validate): the message names the flag."""
    try:
        want_cuda = _device_of(device)[0]
    except ValueError as exc:
        raise ValueError(f"--device {device!r}: {exc}") from None
    if backend is not None and backend not in ("nccl", "gloo"):
        raise ValueError(f"--dist-backend must be nccl or gloo, got {backend!r}")
    if backend == "nccl" and not want_cuda:
        raise ValueError(f"--dist-backend nccl needs CUDA devices, and --device {device!r} gives CPU processes: use "
                         f"--dist-backend gloo")


def init_distributed(device: str = "auto", backend: Optional[str] = None, timeout_s: float = 1800.0) -> DistContext:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Called by the entry points' ``main()``. Without WORLD_SIZE (or with WORLD_SIZE=1) there is
    nothing to join: a single-process context on ``device`` ("auto": CUDA when available). With
    several processes: NCCL on CUDA devices (process i uses cuda:LOCAL_RANK), gloo on the CPU;
    ``backend`` overrides the choice. If a group already exists (e.g. a test created one) it is used
    as it is."""
    if _env_int("WORLD_SIZE", 1) > 1 and not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    want_cuda, _, dev = _device_of(device)
    if backend is not None and backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    if backend == "nccl" and not want_cuda:
        raise ValueError("backend 'nccl' needs CUDA devices; use 'gloo' for CPU processes")
    if _env_int("WORLD_SIZE", 1) > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if want_cuda else "gloo")
        if want_cuda:
            torch.cuda.set_device(dev)
        kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
        if backend == "nccl":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
    return context(device)


def context(device: str = "auto") -> DistContext:
    """Where this process sits, without starting anything: the joined process group (rank, world size,
    cuda:LOCAL_RANK or the CPU), or a single process on ``device``. A torchrun worker whose group was
    never started is an error, not a silent single-process run."""
    want_cuda, local_rank, dev = _device_of(device)
    if dist.is_available() and dist.is_initialized():
        if want_cuda:
            torch.cuda.set_device(dev)
        return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                           device=dev, backend=dist.get_backend())
    if _env_int("WORLD_SIZE", 1) > 1:
        raise RuntimeError(f"WORLD_SIZE={_env_int('WORLD_SIZE', 1)} but no process group was started: call "
                           f"urkle_fast.distributed.init_distributed() first (the command-line entry points do)")
    return DistContext(device=dev)


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


def all_reduce_mean(values: Tensor) -> Tensor:
    """Mean over ranks of a small tensor (a copy; unchanged when not distributed)."""
    if not is_distributed():
        return values
    out = values.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_reduce_min(value: int) -> int:
    """The smallest of every rank's integer (the value itself when not distributed): the ranks agree on a
    micro-batch size that fits on all of them."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t[0])


def ranks_flagging(flag: bool) -> list[int]:
    """The ranks whose ``flag`` is true, on every rank ([0] or [] when not distributed). A check that must stop
    every rank together (not one rank raising while the others wait in the next collective) goes through this."""
    if not is_distributed():
        return [0] if flag else []
    t = torch.zeros(dist.get_world_size(), dtype=torch.int32, device=_comm_device())
    t[dist.get_rank()] = int(bool(flag))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [r for r, v in enumerate(t.tolist()) if v]


def loss_and_stop(loss: Tensor, signalled: bool) -> tuple[float, bool]:
    """The training loop's one collective per step: (the mean loss over ranks, whether ANY rank was
    signalled), so that every rank stops at the same step."""
    shared = all_reduce_mean(torch.stack([loss.detach().float(), loss.new_tensor(float(signalled))]))
    return float(shared[0]), bool(shared[1] > 0)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order, on every rank ([obj] when not distributed)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------------------------
# training: what DistributedDataParallel does, for the micro-batched path that cannot use it


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


def all_reduce_gradients(model: torch.nn.Module) -> None:
    """Average every parameter's gradient over the ranks (one flat all-reduce), as DDP would."""
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
    if is_distributed():
        _coalesced(list(tensors), lambda flat: dist.broadcast(flat, src=0))


# ----------------------------------------------------------------------------------------------
# evaluation sharding (``torchrun ... -m urkle_fast.eval``)
#
# Every per-image computation (encoding the train split, clean and attacked predictions) is split over
# the ranks in whole attack batches: rank r takes batches [r k, (r+1) k) of the single-process batching,
# k = ceil(#batches / W), and passes its first batch index to the attack, whose random start is seeded
# per batch index. So the attacks are those of one process: deterministic paths (z = mu, supervised
# models) give the single-process numbers exactly (tests/test_eval.py checks it on 2 gloo ranks); the
# S-sample path draws its z samples from a per-rank stream and agrees up to that sampling noise.
# Per-image results are gathered to every rank (correctness flags, one byte per image) or to rank 0 only
# (features, which can be GiBs on ImageNet); rank 0 trains the heads and broadcasts them.

# rows gathered per collective: bounds the device memory of a feature gather
GATHER_ROWS = 65536


def batch_shard(n: int, batch_size: int, rank: int, world_size: int) -> tuple[slice, int]:
    """(this rank's rows, index of its first batch) when n rows in batches of batch_size go to ranks."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    nb = -(-n // batch_size)
    k = -(-nb // world_size)
    b0, b1 = min(nb, rank * k), min(nb, (rank + 1) * k)
    return slice(min(n, b0 * batch_size), min(n, b1 * batch_size)), b0


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(local: Tensor, n: int, batch_size: int, *, to_all: bool = True) -> Optional[Tensor]:
    """Concatenate every rank's ``local`` rows (its ``batch_shard`` of n rows) in rank order.

    Returns the [n, ...] tensor on the CPU, on every rank (to_all) or on rank 0 only (None elsewhere)."""
    if not is_distributed():
        return local.cpu()
    r0, W = dist.get_rank(), dist.get_world_size()
    sizes = [batch_shard(n, batch_size, r, W)[0] for r in range(W)]
    sizes = [s.stop - s.start for s in sizes]
    if local.shape[0] != sizes[r0]:
        raise ValueError(f"rank {r0} holds {local.shape[0]} rows, its shard has {sizes[r0]}")
    width = max(sizes)
    dev = _comm_device()
    parts: list[list[Tensor]] = [[] for _ in range(W)]
    for c0 in range(0, width, GATHER_ROWS):
        c1 = min(width, c0 + GATHER_ROWS)
        buf = torch.zeros((c1 - c0,) + tuple(local.shape[1:]), dtype=local.dtype, device=dev)
        mine = local[c0:min(c1, sizes[r0])]
        buf[:len(mine)] = mine.to(dev)
        out = [torch.empty_like(buf) for _ in range(W)]
        dist.all_gather(out, buf)
        if to_all or r0 == 0:
            for r in range(W):
                keep = max(0, min(c1, sizes[r]) - c0)
                parts[r].append(out[r][:keep].cpu())
    if not (to_all or r0 == 0):
        return None
    return torch.cat([t for r in range(W) for t in parts[r]])


def broadcast_module(module: torch.nn.Module) -> torch.nn.Module:
    """Rank 0's weights in ``module`` on every rank (each rank passes a module of the same architecture:
    rank 0 the trained one, the others a fresh one). Tensors travel as tensors: nothing is pickled."""
    if is_distributed():
        broadcast_from_rank0([*module.parameters(), *module.buffers()])
    return module
