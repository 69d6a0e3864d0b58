"""Gaussian KL: fused op vs eager reference vs torch.compile(reference), forward and forward+backward."""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, compiled, run_case
from urkle_fast import gaussian_kl, gaussian_kl_reference

# (B, D, dtype) per device: the CPU size of the 2x target, the GPU sizes of a ResNet-50-sized batch
CASES = {
    "cpu": [(4096, 512, torch.float32), (4096, 512, torch.bfloat16)],
    "cuda": [(16384, 2048, torch.float32), (16384, 2048, torch.bfloat16)],
}[DEVICE]

_compiled = {}


def _impl(variant: str):
    if variant == "fused":
        return gaussian_kl
    if variant == "eager":
        return gaussian_kl_reference
    return _compiled.setdefault("kl", compiled(gaussian_kl_reference))


def _inputs(B, D, dtype, requires_grad):
    g = torch.Generator(device="cpu").manual_seed(0)
    scales = (1.0, 0.5, 1.0, 0.5)
    return [(torch.randn(B, D, generator=g) * s).to(device=DEVICE, dtype=dtype).requires_grad_(requires_grad)
            for s in scales]


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("B,D,dtype", CASES, ids=[f"B{b}-D{d}-{str(t)[6:]}" for b, d, t in CASES])
def bench_gaussian_kl(benchmark, variant, mode, B, D, dtype):
    ins = _inputs(B, D, dtype, requires_grad=(mode == "fwd_bwd"))
    es = ins[0].element_size()

    def make(f):
        if mode == "fwd":
            def call():
                with torch.no_grad():
                    return f(*ins)
        else:
            def call():
                return torch.autograd.grad(f(*ins), ins)
        return call

    if mode == "fwd":
        nbytes = 4 * B * D * es + 4  # four inputs read, a float32 scalar written
    else:
        nbytes = (4 * B * D * es + 4) + (4 * B * D * es + 4 + 4 * B * D * es)  # + backward: 4 in, 4 grads out
    call = make(_impl(variant))
    run_case(benchmark, op="gaussian_kl", mode=mode, case=f"B={B} D={D} {str(dtype)[6:]}", variant=variant,
             fn=call, dtype=dtype, shape=(B, D), nbytes=nbytes, check=lambda: (call(), make(_impl("eager"))()))
