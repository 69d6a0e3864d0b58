"""Run ``python -m urkle_fast.train ARGS`` under an address-space cap: ``python tests/memory_cap.py MB [--whole-batch-first]
-- ARGS``. MB is the memory allowed above what the interpreter has mapped once torch and the datasets' libraries are
loaded, so that the cap falls on the training step itself; the allocator's refusals are real.

``--whole-batch-first``: --micro-batch auto skips its estimate and tries the whole batch, so that the step's
allocation fails and the out-of-memory retry (half the chunk) is what is tested."""

import resource
import sys

import sklearn.datasets  # noqa: F401 - the digits loader's libraries, mapped before the cap
import torch  # noqa: F401

import urkle_fast.train as train


def main() -> int:
    args = sys.argv[1:]
    cap_mb, rest = int(args[0]), args[1:]
    if rest and rest[0] == "--whole-batch-first":
        train.estimate_micro_batch = lambda *a, **k: (None, "the estimate is skipped (tests/memory_cap.py)")
        rest = rest[1:]
    argv = rest[1:] if rest and rest[0] == "--" else rest
    vm = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmSize:")) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + cap_mb * 2**20, resource.RLIM_INFINITY))
    return train.main(argv)


if __name__ == "__main__":
    sys.exit(main())
