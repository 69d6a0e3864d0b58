"""PGD l_inf step (sign-step-and-clip, in place): fused op vs eager reference vs torch.compile(reference).

The step has no backward of its own (the gradient it consumes comes from the model), so the only mode
is the step itself.
"""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, compiled, run_case
from urkle_fast import pgd_step_, pgd_step_reference_

CASES = {
    "cpu": [((256, 3, 32, 32), torch.float32), ((256, 3, 32, 32), torch.bfloat16)],
    "cuda": [((1024, 3, 224, 224), torch.bfloat16), ((4096, 3, 32, 32), torch.bfloat16)],
}[DEVICE]

ALPHA, EPS = 2 / 255, 8 / 255
_compiled = {}


def _reference(x_adv, grad, x_orig):
    return pgd_step_reference_(x_adv, grad, x_orig, alpha=ALPHA, eps=EPS, lo=0.0, hi=1.0, norm="linf")


def _fused(x_adv, grad, x_orig):
    return pgd_step_(x_adv, grad, x_orig, alpha=ALPHA, eps=EPS, lo=0.0, hi=1.0, norm="linf")


def _impl(variant: str):
    if variant == "fused":
        return _fused
    if variant == "eager":
        return _reference
    return _compiled.setdefault("pgd", compiled(_reference))


@pytest.mark.parametrize("shape,dtype", CASES, ids=["x".join(map(str, s)) + f"-{str(t)[6:]}" for s, t in CASES])
def bench_pgd_step_linf(benchmark, variant, shape, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    x_orig = torch.rand(shape, generator=g).to(device=DEVICE, dtype=dtype)
    x_adv = x_orig.clone()
    grad = torch.randn(shape, generator=g).to(device=DEVICE, dtype=dtype)
    fn = _impl(variant)

    def call():  # repeated steps stay in the eps ball: every call does the same work
        return fn(x_adv, grad, x_orig)

    def check():  # one step from the same start, on copies (the op works in place)
        a, b = x_adv.clone(), x_adv.clone()
        fn(a, grad, x_orig)
        _reference(b, grad, x_orig)
        return a - x_orig, b - x_orig  # the perturbations: x itself would hide an error in the step

    numel = x_orig.numel()
    run_case(benchmark, op="pgd_step_linf", mode="step", case=f"{list(shape)} {str(dtype)[6:]}",
             variant=variant, fn=call, dtype=dtype, shape=shape,
             nbytes=4 * numel * x_orig.element_size(), check=check)  # x, grad, x_orig read; x written
