"""Evaluation over torch.distributed ranks (``torchrun ... -m urkle_fast.eval``).

Every per-image computation (encoding the train split, clean and attacked predictions) is split over
the ranks in whole attack batches: rank r takes batches [r k, (r+1) k) of the single-process batching,
k = ceil(#batches / W), and passes its first batch index to the attack, whose random start is seeded per
batch index. So the attacks are those of one process: deterministic paths (z = mu, supervised models)
give the single-process numbers exactly (tests/test_eval.py checks it on 2 gloo ranks); the S-sample
path draws its z samples from a per-rank stream and agrees up to that sampling noise. Per-image results
are gathered to every rank (correctness flags, one byte per image) or to rank 0 only (features, which
can be GiBs on ImageNet); rank 0 trains the heads and broadcasts them.
"""

from __future__ import annotations

import io
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from urkle_fast.distributed import is_distributed

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


def gather_rows(local: torch.Tensor, n: int, batch_size: int, *, to_all: bool = True) -> Optional[torch.Tensor]:
    """Concatenate every rank's ``local`` rows (its ``batch_shard`` of n rows) in rank order.

    Returns the [n, ...] tensor on the CPU, on every rank (to_all) or on rank 0 only (None elsewhere)."""
    if not is_distributed():
        return local.cpu()
    rank, W = dist.get_rank(), dist.get_world_size()
    sizes = [batch_shard(n, batch_size, r, W)[0] for r in range(W)]
    sizes = [s.stop - s.start for s in sizes]
    if local.shape[0] != sizes[rank]:
        raise ValueError(f"rank {rank} holds {local.shape[0]} rows, its shard has {sizes[rank]}")
    width = max(sizes)
    dev = _comm_device()
    parts: list[list[torch.Tensor]] = [[] for _ in range(W)]
    for c0 in range(0, width, GATHER_ROWS):
        c1 = min(width, c0 + GATHER_ROWS)
        buf = torch.zeros((c1 - c0,) + tuple(local.shape[1:]), dtype=local.dtype, device=dev)
        mine = local[c0:min(c1, sizes[rank])]
        buf[:len(mine)] = mine.to(dev)
        out = [torch.empty_like(buf) for _ in range(W)]
        dist.all_gather(out, buf)
        if to_all or rank == 0:
            for r in range(W):
                keep = max(0, min(c1, sizes[r]) - c0)
                parts[r].append(out[r][:keep].cpu())
    if not (to_all or rank == 0):
        return None
    return torch.cat([t for r in range(W) for t in parts[r]])


def broadcast_module(module: Optional[nn.Module]) -> nn.Module:
    """Rank 0's module (weights and all) on every rank; the argument is ignored elsewhere."""
    if not is_distributed():
        return module
    rank = dist.get_rank()
    payload = [None]
    if rank == 0:
        buf = io.BytesIO()
        torch.save(module, buf)
        payload = [buf.getvalue()]
    dist.broadcast_object_list(payload, src=0)
    return torch.load(io.BytesIO(payload[0]), weights_only=False) if rank != 0 else module
