"""Backend discovery and dispatch, decided once per (op, device type) and cached.

Three backends exist for every op:

* ``triton``    -- kernels/ (installed as ``urkle_fast._kernels``); CUDA tensors, or CPU tensors
                   when ``TRITON_INTERPRET=1`` is set and the backend is forced.
* ``native``    -- the C++ extension ``urkle_fast._C`` (CPU kernels; CUDA kernels when built with nvcc).
* ``reference`` -- pure PyTorch, the test oracle and the last fallback.

``URKLE_FAST_BACKEND=reference|native|triton`` overrides the choice for every op; ``use_backend()``
overrides it inside a ``with`` block (tests). A backend that cannot take an input is a one-time
warning and a fallback to the reference, never a crash at import.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import warnings
from typing import Iterator, Optional

import torch

BACKENDS = ("triton", "native", "reference")
# the C++ schema whose presence says that urkle_fast._C has a kernel for the op
NATIVE_OP_NAMES = {"gaussian_kl": "gaussian_kl_fwd_native", "pgd": "pgd_step_linf_native_", "nt_xent": "nt_xent_fwd_native"}

_C = None
_C_ERROR: Optional[str] = None
try:  # the compiled extension registers the urkle_fast::*_native ops on import
    _C = importlib.import_module("urkle_fast._C")
except Exception as exc:  # pragma: no cover - depends on the build
    _C = None
    _C_ERROR = f"{type(exc).__name__}: {exc}"


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_module():
    try:
        return importlib.import_module("triton"), None
    except Exception as exc:  # pragma: no cover - triton ships with CUDA torch
        return None, f"{type(exc).__name__}: {exc}"


@functools.lru_cache(maxsize=None)
def kernels_module(op: str):
    """The Triton launcher module for ``op`` (``urkle_fast._kernels.<op>``), or None."""
    triton, _ = _triton_module()
    if triton is None:
        return None
    try:
        return importlib.import_module(f"urkle_fast._kernels.{op}")
    except Exception:
        return None


def native_ops_present() -> bool:
    return _C is not None


def cuda_native_built() -> bool:
    return _C is not None and bool(getattr(_C, "WITH_CUDA", False))


def not_supported_reasons(backend: str, op: str, device_type: str) -> list[str]:
    """Why ``backend`` cannot run ``op`` on ``device_type``; empty when it can."""
    reasons: list[str] = []
    if backend == "reference":
        return reasons
    if device_type == "cuda" and not torch.cuda.is_available():
        reasons.append("no CUDA device is visible (torch.cuda.is_available() is False)")
    if backend == "native":
        if _C is None:
            reasons.append(f"urkle_fast._C failed to import ({_C_ERROR}); rebuild with "
                           "`pip install --no-build-isolation -e .`")
        elif device_type == "cuda" and not cuda_native_built():
            reasons.append("urkle_fast._C was built without CUDA kernels (no nvcc, a CPU build of torch, "
                           "or URKLE_FAST_SKIP_CUDA_BUILD=1)")
        elif device_type not in ("cpu", "cuda"):
            reasons.append(f"no native kernel for device type {device_type!r}")
        elif not torch._C._dispatch_has_kernel_for_dispatch_key(
            f"urkle_fast::{NATIVE_OP_NAMES[op]}", "CUDA" if device_type == "cuda" else "CPU"
        ):
            reasons.append(f"urkle_fast._C has no {device_type.upper()} kernel for {op}")
        return reasons
    if backend == "triton":
        triton, err = _triton_module()
        if triton is None:
            reasons.append(f"triton is not importable ({err})")
            return reasons
        if device_type == "cpu" and not interpreting():
            reasons.append("Triton needs a GPU; on the CPU it runs only under TRITON_INTERPRET=1")
        elif device_type not in ("cpu", "cuda"):
            reasons.append(f"Triton kernels are not written for device type {device_type!r}")
        if kernels_module(op) is None:
            reasons.append(f"urkle_fast._kernels.{op} failed to import")
        return reasons
    raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


_forced: Optional[str] = None
_warned: set = set()


def _env_backend() -> Optional[str]:
    val = os.environ.get("URKLE_FAST_BACKEND", "").strip().lower()
    if not val:
        return None
    if val not in BACKENDS:
        raise ValueError(f"URKLE_FAST_BACKEND: expected one of {BACKENDS}, got {val!r}")
    return val


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force ``name`` for every op inside the block (None restores automatic choice)."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS} or None, got {name!r}")
    prev, _forced = _forced, name
    _select_cached.cache_clear()
    try:
        yield
    finally:
        _forced = prev
        _select_cached.cache_clear()


@functools.lru_cache(maxsize=None)
def _select_cached(op: str, device_type: str, forced: Optional[str], env: Optional[str]) -> str:
    wanted = forced or env
    if wanted is not None:
        order = [wanted]
    elif device_type == "cuda":
        order = ["triton", "native"]
    else:
        order = ["native"]
    for name in order:
        if name == "reference":
            return "reference"
        reasons = not_supported_reasons(name, op, device_type)
        if not reasons:
            return name
        key = (op, device_type, name)
        # also on the CPU with nothing forced: a build without urkle_fast._C would otherwise run every op's
        # slow reference without a word
        if key not in _warned:
            _warned.add(key)
            warnings.warn(
                f"urkle_fast.{op}: backend {name!r} unavailable on {device_type} "
                f"({'; '.join(reasons)}); using the next backend",
                RuntimeWarning,
                stacklevel=3,
            )
    if device_type == "cuda":
        key = (op, device_type, "reference")
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"urkle_fast.{op}: no fast backend for CUDA tensors; using the PyTorch reference",
                          RuntimeWarning, stacklevel=3)
    return "reference"


def select(op: str, device: torch.device) -> str:
    """The backend that runs ``op`` for tensors on ``device``."""
    return _select_cached(op, torch.device(device).type, _forced, _env_backend())


def select_for(op: str, t: torch.Tensor) -> str:
    """The backend for an op whose first tensor argument is ``t``.

    float64 (the gradcheck dtype) runs the reference. Under TRITON_INTERPRET=1, wrap_triton hands back
    the raw kernel, which would run the interpreter on fake tensors; tracing then follows the
    reference, whose outputs have the same metadata.
    """
    if t.dtype == torch.float64:
        return "reference"
    name = select(op, t.device)
    if name == "triton" and interpreting():
        from torch._subclasses.fake_tensor import is_fake

        if is_fake(t):
            return "reference"
    return name


def table() -> list[dict]:
    """Rows of (op, device, backend, present, reason) for ``python -m urkle_fast.info``."""
    rows = []
    for op in ("gaussian_kl", "pgd", "nt_xent"):
        for dev in ("cpu", "cuda"):
            for be in BACKENDS:
                reasons = not_supported_reasons(be, op, dev)
                rows.append(dict(op=op, device=dev, backend=be, present=not reasons, reason="; ".join(reasons)))
    return rows
