"""Run ``python -m urkle_fast.train ARGS`` under an address-space cap: ``python tests/memory_cap.py MB [--whole-batch-first]
-- ARGS``. MB is the memory allowed above what the interpreter has mapped once torch and the datasets' libraries are
loaded, so that the cap falls on the training step itself; the allocator's refusals are real. MB ``none``: no cap,
the same libraries and settings (the uncapped run whose losses a capped run is compared with).

oneDNN is switched off here (torch.backends.mkldnn.enabled = False; convolutions take ATen's own kernels): oneDNN
JIT-compiles a kernel for each new shape, and a refused allocation there is not checked. Under a 290 MB cap its
convolution backward crashed (SIGSEGV in dnnl::impl::cpu::x64::brgemm_kernel_execute, gdb) instead of raising, as the
CI run of stop 22 did. The BLAS libraries map their buffers at their first call, so one small product of each runs
before the cap, not under it (numpy's OpenBLAS otherwise exits the process: "Memory allocation still failed").

``--whole-batch-first``: --micro-batch auto skips its estimate and tries the whole batch, so that the step's
allocation fails and the out-of-memory retry (half the chunk) is what is tested."""

import resource
import sys

import numpy as np
import sklearn.datasets  # noqa: F401 - the digits loader's libraries, mapped before the cap
import torch

import urkle_fast.train as train


def main() -> int:
    args = sys.argv[1:]
    cap, rest = args[0], args[1:]
    if rest and rest[0] == "--whole-batch-first":
        train.estimate_micro_batch = lambda *a, **k: (None, "the estimate is skipped (tests/memory_cap.py)")
        rest = rest[1:]
    argv = rest[1:] if rest and rest[0] == "--" else rest
    torch.backends.mkldnn.enabled = False
    a = torch.ones(256, 256)
    (a @ a).sum()  # MKL's buffers
    np.ones((256, 256)) @ np.ones((256, 256))  # numpy's OpenBLAS buffers
    if cap != "none":
        vm = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmSize:")) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + int(cap) * 2**20, resource.RLIM_INFINITY))
    return train.main(argv)


if __name__ == "__main__":
    sys.exit(main())
