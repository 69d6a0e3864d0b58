"""torch.library.opcheck on every registered op, under every backend: schema, fake (meta) kernel,
autograd registration and AOT dispatch must agree with the real kernels."""

import pytest
import torch

import urkle_fast  # noqa: F401  (importing registers the ops)
from urkle_fast import _backend


def _kl_args(device, dtype=torch.float32, requires_grad=True):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(7, 13, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)
            for _ in range(4)]


def _pgd_args(device):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 2, 5, 5, generator=g).to(device)
    return [x0.clone(), torch.randn(3, 2, 5, 5, generator=g).to(device), x0]


def _z(device, n=12, d=9, requires_grad=True):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(0)).to(device).requires_grad_(requires_grad)


def _cases(device):
    kl = _kl_args(device)
    z = _z(device)
    cols = _z(device, requires_grad=True)
    rows = cols.detach()[4:10].clone().requires_grad_(True)
    lse = torch.ops.urkle_fast.nt_xent_fwd(rows.detach(), cols.detach(), 3, 0.5, 0, 4)[1]
    return {
        "gaussian_kl-none": (torch.ops.urkle_fast.gaussian_kl.default, (*kl, 0)),
        "gaussian_kl-sum": (torch.ops.urkle_fast.gaussian_kl.default, (*kl, 1)),
        "gaussian_kl-mean": (torch.ops.urkle_fast.gaussian_kl.default, (*kl, 2)),
        "gaussian_kl_backward": (torch.ops.urkle_fast.gaussian_kl_backward.default,
                                 (torch.rand(7, device=device), *[t.detach() for t in kl], 0)),
        "pgd_step_linf_": (torch.ops.urkle_fast.pgd_step_linf_.default, (*_pgd_args(device), 0.01, 0.03, 0.0, 1.0)),
        "pgd_step_l2_": (torch.ops.urkle_fast.pgd_step_l2_.default, (*_pgd_args(device), 0.5, 1.0, 0.0, 1.0)),
        "pgd_random_start": (torch.ops.urkle_fast.pgd_random_start.default, (_pgd_args(device)[2], 0.1, 0.0, 1.0, 0, 7)),
        "nt_xent_fwd": (torch.ops.urkle_fast.nt_xent_fwd.default, (z, z, 3, 0.5, 0, 0)),
        "nt_xent_fwd-negatives-offset": (torch.ops.urkle_fast.nt_xent_fwd.default, (rows, cols, 3, 0.5, 1, 4)),
        "nt_xent_bwd": (torch.ops.urkle_fast.nt_xent_bwd.default,
                        (torch.rand(6, device=device), rows.detach(), cols.detach(), lse, 3, 0.5, 0, 4)),
        "nt_xent_bwd-rows-only": (torch.ops.urkle_fast.nt_xent_bwd.default,
                                  (torch.rand(6, device=device), rows.detach(), cols.detach(), lse, 3, 0.5, 0, 4,
                                   False)),
    }


CASE_NAMES = list(_cases("cpu"))
_OP_OF_CASE = {name: ("gaussian_kl" if name.startswith("gaussian") else "pgd" if name.startswith("pgd")
                      else "nt_xent") for name in CASE_NAMES}


@pytest.mark.parametrize("case", CASE_NAMES)
def test_opcheck(backend, case):
    op_name = _OP_OF_CASE[case]
    if backend.name != "reference" and _backend.not_supported_reasons(backend.name, op_name, backend.device):
        pytest.skip(f"{backend.name} unavailable for {op_name}")
    op, args = _cases(backend.device)[case]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", ["gaussian_kl_fwd_native", "gaussian_kl_bwd_native", "pgd_step_linf_native_",
                                  "pgd_step_l2_native_", "nt_xent_fwd_native", "nt_xent_bwd_native",
                                  "nt_xent_bwd_native-rows-only"])
def test_opcheck_native_ops(name):
    if not _backend.native_ops_present():
        pytest.skip("urkle_fast._C not built")
    kl = [t.detach() for t in _kl_args("cpu")]
    z = _z("cpu", requires_grad=False)
    pgd = _pgd_args("cpu")
    lse = torch.ops.urkle_fast.nt_xent_fwd_native(z, z, 3, 0.5, 0, 0)[1]
    args = {
        "gaussian_kl_fwd_native": (*kl, 2),
        "gaussian_kl_bwd_native": (torch.rand(7), *kl, 0),
        "pgd_step_linf_native_": (*pgd, 0.01, 0.03, 0.0, 1.0),
        "pgd_step_l2_native_": (*pgd, 0.5, 1.0, 0.0, 1.0),
        "nt_xent_fwd_native": (z, z, 3, 0.5, 1, 0),
        "nt_xent_bwd_native": (torch.rand(12), z, z, lse, 3, 0.5, 0, 0),
        "nt_xent_bwd_native-rows-only": (torch.rand(12), z, z, lse, 3, 0.5, 0, 0, False),
    }[name]
    # native ops have no autograd of their own (the public ops carry it)
    torch.library.opcheck(getattr(torch.ops.urkle_fast, name.removesuffix("-rows-only")).default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
