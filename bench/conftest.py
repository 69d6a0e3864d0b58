"""Shared setup of the pytest-benchmark suites (bench_*.py; bench/pytest.ini collects them).

Every suite times three variants of one op on the SAME inputs in the SAME run (Liger-Kernel's
benchmark layout):

* ``fused``    -- the public op (``urkle_fast.gaussian_kl`` / ``pgd_step_`` / ``nt_xent``): the C++ kernels
                  of urkle_fast._C on the CPU, Triton on CUDA;
* ``eager``    -- the pure-torch reference of the same op;
* ``compiled`` -- ``torch.compile`` of that reference.

Run:  pytest bench/ --benchmark-only [--benchmark-json out.json];  python bench/report.py out.json
URKLE_FAST_BENCH_DEVICE=cpu|cuda overrides the device (default: cuda when present);
URKLE_FAST_BENCH_THREADS=n sets torch's CPU thread count (the default is torch's own).

Each benchmark records in ``extra_info``: op, mode, case, variant, device name, dtype, shape, the peak
extra memory of one call (``peak_mem_bytes``, see :func:`peak_memory`) and the achieved GB/s (KL, PGD:
each input read once + each output written once, over the median) or TFLOP/s (NT-Xent: 2 N^2 d forward,
4 N^2 d backward, the matmul FLOPs a materialising implementation needs).
"""

from __future__ import annotations

import os
import platform
from typing import Callable

# the public ops' optional finiteness checks read every element: off, so the kernels are what is timed
os.environ["URKLE_FAST_CHECK_FINITE"] = "0"
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".torchinductor"))

import pytest  # noqa: E402
import torch  # noqa: E402

VARIANTS = ("fused", "eager", "compiled")

torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
if os.environ.get("URKLE_FAST_BENCH_THREADS", "").strip():
    torch.set_num_threads(int(os.environ["URKLE_FAST_BENCH_THREADS"]))


def bench_device() -> str:
    dev = os.environ.get("URKLE_FAST_BENCH_DEVICE", "").strip().lower()
    if dev:
        if dev not in ("cpu", "cuda"):
            raise ValueError(f"URKLE_FAST_BENCH_DEVICE: expected 'cpu' or 'cuda', got {dev!r}")
        return dev
    return "cuda" if torch.cuda.is_available() else "cpu"


DEVICE = bench_device()


def device_name(device: str = DEVICE) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads)"


def sync(device: str = DEVICE) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory(fn: Callable[[], object], device: str = DEVICE) -> int:
    """Peak bytes allocated by one call of ``fn`` beyond what was live before it.

    CUDA: the caching allocator's own counters (``max_memory_allocated`` after a reset, minus the bytes
    allocated before the call). CPU: torch.profiler with ``profile_memory=True`` records every
    allocation and free that goes through c10's CPU allocator (all ATen tensors, including the ones the
    C++ kernels and inductor's generated code allocate); the running sum of those events in time order
    peaks at the answer. Memory that BLAS (MKL) allocates internally is not seen, for every variant
    alike. Tensors the call returns count (they were allocated during it); freed ones count until freed.
    """
    if device == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        sync(device)
        return int(torch.cuda.max_memory_allocated() - before)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return int(peak)


def timed(fn: Callable[[], object], device: str = DEVICE) -> Callable[[], object]:
    """``fn`` followed by a device sync, so a benchmark round covers the whole GPU work."""
    if device != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


# the norm-wise relative error a variant may have against the eager reference on the benchmark's own inputs:
# a guard against timing a wrong result (a wrong kernel is off by O(1)), not a precision test (tests/ does that,
# elementwise, on odd shapes); bf16 / fp16 references round every intermediate
AGREEMENT = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _flat(out) -> torch.Tensor:
    ts = [out] if isinstance(out, torch.Tensor) else list(out)
    return torch.cat([t.detach().double().flatten().cpu() for t in ts])


def relative_error(out, ref) -> float:
    """||out - ref|| / ||ref|| over every tensor of ``out`` and ``ref`` (a tensor or a sequence of them)."""
    a, b = _flat(out), _flat(ref)
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {tuple(a.shape)} against the reference's {tuple(b.shape)}")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_case(benchmark, *, op: str, mode: str, case: str, variant: str, fn: Callable[[], object],
             dtype: torch.dtype, shape, nbytes: int | None = None, flops: float | None = None,
             check: Callable[[], tuple] | None = None) -> None:
    """Check the variant against the eager reference (``check()`` returns (variant's output, reference's
    output) on the same fresh inputs; the eager variant is the reference and is not checked), warm up ``fn``
    (compiles the compiled variant), time it, then measure its peak memory."""
    benchmark.group = f"{op} | {mode} | {case}"
    benchmark.extra_info.update(op=op, mode=mode, case=case, variant=variant, device=DEVICE,
                                device_name=device_name(), dtype=str(dtype).replace("torch.", ""),
                                shape=str(tuple(shape)), torch=torch.__version__)
    try:
        if check is not None and variant != "eager":
            err = relative_error(*check())
            benchmark.extra_info["rel_err_vs_eager"] = err
            assert err <= AGREEMENT[dtype], (f"{variant} {op} {mode} {case}: relative error {err:.3g} against the "
                                             f"eager reference, above {AGREEMENT[dtype]:g}: not timing a wrong result")
        fn()  # warm-up: compiles, fills caches, faults the pages in
        sync()
    except torch.OutOfMemoryError as exc:  # e.g. the materialising reference at N = 65536 on one GPU
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        pytest.skip(f"{variant}: out of memory ({str(exc).splitlines()[0]})")
    benchmark(timed(fn))
    stats = getattr(benchmark, "stats", None)
    median = stats.stats.median if stats is not None else None
    if median:
        if nbytes is not None:
            benchmark.extra_info["gbps"] = nbytes / median / 1e9
        if flops is not None:
            benchmark.extra_info["tflops"] = flops / median / 1e12
    benchmark.extra_info["peak_mem_bytes"] = peak_memory(fn)


@pytest.fixture(params=VARIANTS)
def variant(request) -> str:
    return request.param


def pytest_report_header(config):
    return [f"urkle_fast bench: device {DEVICE} = {device_name()}; torch {torch.__version__}"]
