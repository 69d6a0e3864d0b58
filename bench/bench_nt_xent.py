"""Multi-view NT-Xent: fused op (no N x N logits) vs eager reference vs torch.compile(reference); the same for
RoCL's official similarity S = P P.detach()^T (``--detach-columns``)."""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, compiled, run_case
from urkle_fast import nt_xent, nt_xent_reference
from urkle_fast.ops.nt_xent import nt_xent_column_detached, nt_xent_column_detached_reference

# (V, B, d, dtype): N = V * B rows
CASES = {
    "cpu": [(4, 1024, 128, torch.float32)],
    "cuda": [(4, 4096, 128, torch.bfloat16), (4, 16384, 128, torch.bfloat16)],
}[DEVICE]

TAU = 0.5
_compiled = {}


def _impl(variant: str, detach_columns: bool = False):
    fused, reference = ((nt_xent_column_detached, nt_xent_column_detached_reference) if detach_columns
                        else (nt_xent, nt_xent_reference))
    if variant == "fused":
        return fused
    if variant == "eager":
        return reference
    return _compiled.setdefault(detach_columns, compiled(reference))


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("V,B,d,dtype", CASES, ids=[f"V{v}-B{b}-d{d}-{str(t)[6:]}" for v, b, d, t in CASES])
def bench_nt_xent(benchmark, variant, mode, V, B, d, dtype):
    N = V * B
    g = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn(N, d, generator=g).to(device=DEVICE, dtype=dtype).requires_grad_(mode == "fwd_bwd")
    def make(f):
        if mode == "fwd":
            def call():
                with torch.no_grad():
                    return f(z, views=V, temperature=TAU)
        else:
            def call():
                return torch.autograd.grad(f(z, views=V, temperature=TAU), z)
        return call

    flops = 2.0 * N * N * d if mode == "fwd" else 6.0 * N * N * d
    call = make(_impl(variant))
    run_case(benchmark, op="nt_xent", mode=mode, case=f"V={V} B={B} d={d} {str(dtype)[6:]}", variant=variant,
             fn=call, dtype=dtype, shape=(N, d), flops=flops, check=lambda: (call(), make(_impl("eager"))()))


@pytest.mark.parametrize("V,B,d,dtype", CASES, ids=[f"V{v}-B{b}-d{d}-{str(t)[6:]}" for v, b, d, t in CASES])
def bench_nt_xent_column_detached(benchmark, variant, V, B, d, dtype):
    """Forward + backward only: the forward is ``nt_xent``'s; the fused backward runs the kernels' rows pass
    alone (cols_grad=False). FLOPs counted: 2 N^2 d forward + 2 N^2 d backward (the rows' share), what a
    materialising implementation needs."""
    N = V * B
    g = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn(N, d, generator=g).to(device=DEVICE, dtype=dtype).requires_grad_(True)
    def make(f):
        return lambda: torch.autograd.grad(f(z, views=V, temperature=TAU), z)

    call = make(_impl(variant, detach_columns=True))
    run_case(benchmark, op="nt_xent_column_detached", mode="fwd_bwd", case=f"V={V} B={B} d={d} {str(dtype)[6:]}",
             variant=variant, fn=call, dtype=dtype, shape=(N, d), flops=4.0 * N * N * d,
             check=lambda: (call(), make(_impl("eager", detach_columns=True))()))
