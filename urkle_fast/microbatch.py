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

``crops`` may be a tensor or ``urkle_fast.data.LazyViews`` (the uint8 batch, augmented chunk by chunk when
asked for ``crops[:, i:j]``): then no float copy of the whole batch ever exists. ``on_chunk(done, total, images)``
is called after each chunk's work (the trainer's progress bar shows it: a step of batch 4096 on the CPU takes
minutes).

``--micro-batch auto`` (``estimate_micro_batch``, ``is_out_of_memory``, ``StepSnapshot``; the policy is in
urkle_fast.train): on the CPU the chunk size is estimated before the first step from the peak resident memory
of small probe steps against the memory available (there an allocation past the machine's memory often ends in
the kernel's OOM killer rather than in an error); on CUDA the whole batch is tried first. A step that runs out
of memory is retried with half the chunk, from the same random state and batch-norm statistics.

What is not the full-batch computation, by design: batch norm sees one chunk at a time (as it sees one
rank at a time under DDP without SyncBatchNorm), and RoCL's attack takes its negatives from the chunk.
tests/test_microbatch.py checks the gradient against the unchunked loss on a model without batch
norm, and the batch-norm buffers against the unchunked step.
"""

from __future__ import annotations

import contextlib
import gc
import resource
from pathlib import Path
from typing import Callable, Iterator, Optional

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
                       micro: int, *, amp: bool = False,
                       on_chunk: Optional[Callable[[int, int, int], None]] = None) -> tuple[Tensor, dict[str, Tensor]]:
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
    tick = on_chunk or (lambda done, total, images: None)
    if method.contrastive:
        return _gradient_cache(model, method, crops, hp, beta, parts, autocast, tick)
    B = crops.shape[1]
    total: Tensor = torch.zeros((), dtype=torch.float32, device=crops.device)
    metrics: dict[str, Tensor] = {}
    for i, sl in enumerate(parts):
        w = (sl.stop - sl.start) / B
        with autocast():
            loss, m = method.loss(model, crops[:, sl], labels[sl], hp, beta)
        (loss * w).backward()
        total = total + loss.detach() * w
        for k, v in m.items():
            metrics[k] = metrics.get(k, 0.0) + v.detach().float() * w
        tick(i + 1, len(parts), sl.stop - sl.start)
    return total, metrics


def _gradient_cache(model, method: Method, crops: Tensor, hp: LossParams, beta: float, parts, autocast, tick):
    """The contrastive path: steps (1)-(4) of the module docstring, from the method's parts only.
    ``tick`` counts 2 x len(parts) chunks: the attack pass, then the backward pass."""
    B, n = crops.shape[1], 2 * len(parts)
    # (1) attacks and (2) projections without autograd
    inputs, states, projections = [], [], []
    for i, sl in enumerate(parts):
        with autocast():
            x, V = method.inputs(model, crops[:, sl], hp)
        inputs.append(x)
        states.append(_RandomState(crops.device))
        with torch.no_grad(), batch_norm_stats_frozen(model), autocast():
            p, _, _ = embed(model, x)
        projections.append(p.view(V, sl.stop - sl.start, -1))
        tick(i + 1, n, 0)  # no image has its gradient yet
    after = _RandomState(crops.device)
    # (3) the loss over every chunk (and every rank) and its gradient with respect to the projections
    P = torch.cat(projections, dim=1).detach().requires_grad_(True)
    con, metrics = method.contrast_loss(P.flatten(0, 1), V, hp, beta)
    (dP,) = torch.autograd.grad(con, P)
    # (4) each chunk again, with autograd, back-propagating <P_c, dL/dP_c> (+ its share of the extra term)
    extra, n_terms = method.extra, (method.extra.count(B) if method.extra else 1)
    extra_total = torch.zeros((), dtype=torch.float32, device=crops.device)
    for i, (sl, x, state) in enumerate(zip(parts, inputs, states)):
        state.restore()
        with autocast():
            p, mu, logvar = embed(model, x)
            surrogate = (p.float() * dP[:, sl].reshape(p.shape)).sum()
            if extra is not None:
                term_sum = extra.fn(mu, logvar, "sum")
                surrogate = surrogate + beta * term_sum / n_terms
                extra_total = extra_total + term_sum.detach() / n_terms
        surrogate.backward()
        inputs[i] = None  # this chunk's attacked views are no longer needed
        tick(len(parts) + i + 1, n, sl.stop - sl.start)
    after.restore()
    con = con.detach()
    if extra is None:
        return con, metrics
    return con + beta * extra_total, {**metrics, extra.name: extra_total}


# ----------------------------------------------------------------------------------------------
# --micro-batch auto


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's refusal (a RuntimeError, e.g. "DefaultCPUAllocator:
    can't allocate memory: you tried to allocate 2470445056 bytes"), or a CPU kernel's own workspace refused
    ("posix_memalign failed:Cannot allocate memory (12)", ENOMEM's text: seen in a convolution under a 100 MB cap)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        t in text for t in ("can't allocate memory", "cannot allocate memory", "not enough memory", "std::bad_alloc"))


class StepSnapshot:
    """What a failed step may have changed: the random generators (z samples, random starts) and the batch-norm
    statistics. A step retried after ``restore()`` computes exactly what the first try would have."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.model, self.rng = model, _RandomState(device)
        self.buffers = [b.detach().clone() for b in model.buffers()]

    @torch.no_grad()
    def restore(self) -> None:
        for b, saved in zip(self.model.buffers(), self.buffers):
            b.copy_(saved)
        self.rng.restore()
        self.model.zero_grad(set_to_none=True)
        gc.collect()
        if self.rng.cuda:
            torch.cuda.empty_cache()  # the failed try's blocks, so that the smaller chunk has them


def _status_kb(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _cgroup_headroom() -> Optional[int]:
    """Bytes left under this process's cgroup-v2 memory limit, if it has one."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None


def memory_headroom() -> Optional[int]:
    """Bytes this process can still allocate on the CPU: the least of MemAvailable, the cgroup's limit and the
    address-space limit (ulimit -v). None: unknown."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except OSError:
        return None
    cg = _cgroup_headroom()
    if cg is not None:
        found.append(cg)
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    vm = _status_kb("VmSize")
    if soft != resource.RLIM_INFINITY and vm is not None:
        found.append(soft - vm * 1024)
    return min(found) if found else None


def _trim_heap() -> None:
    """Return the C heap's free memory to the system (glibc's malloc_trim): memory freed earlier but kept resident
    would otherwise be reused by a probe without raising the resident set, and the probe would read as smaller."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


class PeakResident:
    """The peak resident memory of a block on a Linux CPU, in bytes: the high-water mark VmHWM, reset through
    /proc/self/clear_refs. ``available`` is False elsewhere."""

    def __init__(self):
        self.available = _status_kb("VmHWM") is not None and self.reset()

    @staticmethod
    def reset() -> bool:
        gc.collect()
        _trim_heap()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # "5": reset the peak resident set size to the current one (Linux >= 4.0)
            return True
        except OSError:
            return False

    @staticmethod
    def now() -> int:
        return (_status_kb("VmRSS") or 0) * 1024

    @staticmethod
    def peak() -> int:
        return (_status_kb("VmHWM") or 0) * 1024


def estimate_micro_batch(run_step: Callable[[int], None], batch: int, *, stored_per_image: int = 0,
                         fraction: float = 0.8, probes: tuple[int, int] = (8, 16),
                         share: int = 1) -> tuple[Optional[int], str]:
    """On the CPU: (the largest chunk whose step fits in ``fraction`` of the free memory, or None for the whole
    batch; why). On CUDA the trainer tries the whole batch instead: there an allocation that does not fit is
    always an error (torch.OutOfMemoryError), and probes of other sizes would each cost a torch.compile.

    ``run_step(m)``: one step on the batch's first m images, leaving no state behind. A warm-up probe (one-time
    allocations), then two measured probes (m1 < m2 images) give the peak resident memory as a line in m:
    peak(m) = peak(m1) + slope (m - m1). ``stored_per_image``: bytes held per image of the WHOLE batch whatever
    the chunk (the gradient cache keeps every chunk's attacked views until its backward pass). ``share``: the
    processes on this machine, which split its free memory (torchrun's LOCAL_WORLD_SIZE). MemoryError when not even
    one image per chunk is predicted to fit."""
    meter, headroom = PeakResident(), memory_headroom()
    if headroom is not None:
        headroom //= max(1, share)
    if not meter.available or headroom is None:
        return None, "no memory meter here (not Linux): trying the whole batch, halved on out-of-memory"
    m1, m2 = min(probes[0], batch), min(probes[1], batch)
    if m2 <= m1:
        return None, f"a batch of {batch} images is below the probe size"
    base = meter.now()
    run_step(m1)  # warm-up: kernels' workspaces, allocator arenas
    peaks = []
    for m in (m1, m2):
        meter.reset()
        run_step(m)
        peaks.append(meter.peak())
    slope = max((peaks[1] - peaks[0]) / (m2 - m1), 1.0)
    budget = base + fraction * headroom - batch * stored_per_image

    def predicted(m: int) -> float:
        return peaks[0] + slope * (m - m1)

    gb = lambda b: f"{b / 2**30:.2f} GB"  # noqa: E731
    how = (f"a step's peak memory grows {slope / 2**20:.1f} MB per image of a chunk (measured at {m1} and {m2} "
           f"images), {gb(headroom)} free" + (f" for each of {share} processes" if share > 1 else ""))
    if predicted(batch) <= budget:
        return None, f"it fits: {how}, about {gb(predicted(batch) + batch * stored_per_image - base)} for the batch"
    m = int((budget - peaks[0]) / slope) + m1
    if m < 1:
        raise MemoryError(f"--micro-batch auto: even one image per chunk is predicted not to fit ({how}"
                          + (f"; the attacked views of the whole batch alone take {gb(batch * stored_per_image)}"
                             if stored_per_image else "") + ")")
    if m >= 16:
        m -= m % 16  # a round size: cuDNN and the CPU kernels like multiples of 16
    return min(m, batch - 1), f"{how}; about {gb(predicted(m) + batch * stored_per_image - base)} at this size"
