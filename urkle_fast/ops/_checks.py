"""Argument checks shared by the public ops. Every message names the argument, what was expected
and what came, so a user sees at once which tensor is wrong."""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_finite_enabled(device: torch.device | None = None) -> bool:
    """Finiteness checks read every element and, on a GPU, synchronise the host with the device.

    URKLE_FAST_CHECK_FINITE: "1" on everywhere, "0" off everywhere, unset ("auto") on for CPU tensors and
    off for CUDA ones, so the PGD loop on a GPU never waits on the host. Never inside a torch.compile
    trace (the checks are data-dependent).
    """
    if torch.compiler.is_compiling():
        return False
    val = os.environ.get("URKLE_FAST_CHECK_FINITE", "auto").strip().lower()
    if val in ("0", "false", "no", "off"):
        return False
    if val in ("1", "true", "yes", "on"):
        return True
    return device is None or torch.device(device).type == "cpu"


def check_tensor(fn: str, name: str, t, *, ndim: int | Sequence[int] | None = None,
                 dtypes: Iterable[torch.dtype] = FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    dtypes = tuple(dtypes)
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{fn}: {name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(f"{n}-D" for n in allowed)
            raise ValueError(f"{fn}: {name} must be {want}, got {t.dim()}-D with shape {tuple(t.shape)}")


def check_same(fn: str, ref_name: str, ref: torch.Tensor, others: dict, *, shape: bool = True) -> None:
    for name, t in others.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if shape and t.shape != ref.shape:
            raise ValueError(f"{fn}: {name} must have the shape of {ref_name} {tuple(ref.shape)}, "
                             f"got {tuple(t.shape)}")
        if t.dtype != ref.dtype:
            raise TypeError(f"{fn}: {name} must have the dtype of {ref_name} "
                            f"({str(ref.dtype).replace('torch.', '')}), got {str(t.dtype).replace('torch.', '')}")
        if t.device != ref.device:
            raise ValueError(f"{fn}: {name} must be on the device of {ref_name} ({ref.device}), got {t.device}")


class NonFiniteInputError(ValueError):
    """An op was given NaN / inf values (a diverging model, usually): the trainer turns it into its
    non-finite stop (exit 3) instead of a bad-input error."""


def check_finite(fn: str, tensors: dict) -> None:
    if not tensors or not check_finite_enabled(next(iter(tensors.values())).device):
        return
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteInputError(f"{fn}: {name} must be finite, got {bad} non-finite value(s) (NaN or inf) "
                             f"of {t.numel()}")


def check_number(fn: str, name: str, value, *, minimum=None, strict=False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{fn}: {name} must be finite, got {value}")
    if minimum is not None:
        if strict and not value > minimum:
            raise ValueError(f"{fn}: {name} must be > {minimum}, got {value}")
        if not strict and not value >= minimum:
            raise ValueError(f"{fn}: {name} must be >= {minimum}, got {value}")
    return value


def check_choice(fn: str, name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{fn}: {name} must be one of {tuple(choices)}, got {value!r}")
    return value
