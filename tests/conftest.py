"""Test configuration shared by every test module.

TRITON_INTERPRET=1 must be set before any module holding @triton.jit is imported, so that the
Triton kernels run on CPU tensors in Triton's interpreter (set too late, Triton finds "0 active drivers").
URKLE_FAST_REQUIRE_BACKENDS=native,triton (set by .ci/run) turns a missing backend into a failure
instead of a skip, so CI cannot go green by skipping the kernels.
"""

import os

import torch

if not torch.cuda.is_available():  # on a GPU the kernels compile for real
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".torchinductor"))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from urkle_fast import _backend  # noqa: E402

DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Tolerances of a backend against the reference computed from the same inputs. Losses are float32 in
# every case (only summation order differs); gradients are rounded once to the input dtype.
TOLERANCES = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
    torch.float64: dict(atol=1e-10, rtol=1e-10),
}


def required_backends() -> set:
    return {b.strip() for b in os.environ.get("URKLE_FAST_REQUIRE_BACKENDS", "").split(",") if b.strip()}


class Backend:
    """A (device, backend) pair under test."""

    def __init__(self, device: str, name: str):
        self.device, self.name = device, name

    def __repr__(self):
        return f"{self.device}-{self.name}"


_PAIRS = [("cpu", "reference"), ("cpu", "native"), ("cpu", "triton"),
          ("cuda", "reference"), ("cuda", "native"), ("cuda", "triton")]


@pytest.fixture(params=[pytest.param(p, id=f"{p[0]}-{p[1]}", marks=[pytest.mark.gpu] if p[0] == "cuda" else [])
                        for p in _PAIRS])
def backend(request):
    """Each (device, backend) pair in turn, the backend forced for the duration of the test.

    A module sets OP = "gaussian_kl" | "pgd" | "nt_xent" to say which kernels it needs.
    """
    device, name = request.param
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    op = getattr(request.module, "OP", None)
    if op is not None and name != "reference":
        reasons = _backend.not_supported_reasons(name, op, device)
        if reasons:
            msg = f"backend {name} unavailable for {op} on {device}: {'; '.join(reasons)}"
            if name in required_backends() and device == "cpu":
                pytest.fail(msg)
            pytest.skip(msg)
    with _backend.use_backend(name):
        yield Backend(device, name)


@pytest.fixture
def one_thread():
    """torch on one CPU thread for the test (the tiny models run fastest so, and CI has 2 cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def data_root() -> Path:
    if not DATA_ROOT.is_dir():
        pytest.skip(f"shared data not found at {DATA_ROOT}")
    return DATA_ROOT


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def nan_filled_empty(monkeypatch):
    """Fresh tensors (torch.empty, and at::empty inside the C++ ops) come filled with NaN for the test: an output
    a kernel should write, or zero, and does not, cannot pass by the allocator handing back zeroed pages."""
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", True)
    # warn_only: the fill is what is wanted, not errors from ops without a deterministic kernel (on CUDA, the
    # float64 reference's cuBLAS matmul would raise without CUBLAS_WORKSPACE_CONFIG)
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(was[0], warn_only=was[1])


class NtXentBackwardCalls:
    """Records the cols_grad argument of every urkle_fast::nt_xent_bwd call that eager autograd makes while active
    (a dispatch mode; a compiled backward does not pass through it: test_compile reads its graph instead). Use:
    ``with NtXentBackwardCalls() as rec: ...``, then ``rec.cols_grad``."""

    def __init__(self):
        self.cols_grad = []

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        calls = self.cols_grad

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func is torch.ops.urkle_fast.nt_xent_bwd.default:
                    calls.append(args[8] if len(args) > 8 else kwargs.get("cols_grad", True))
                return func(*args, **kwargs)

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)
