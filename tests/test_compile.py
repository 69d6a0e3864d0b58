"""torch.compile(fullgraph=True) traces through all three ops (no graph breaks) and gives the same
values and gradients as eager, on every CPU backend."""

import pytest
import torch

from urkle_fast import gaussian_kl, nt_xent, nt_xent_column_detached, pgd_random_start, pgd_step_

OP = "nt_xent"


def _step(mu, logvar, z, x, g, x0, contrast=nt_xent):
    # an Urkle-shaped step: KL between clean and adversarial posteriors, NT-Xent over 4 views (or RoCL's
    # column-detached form, whose backward skips the columns), and a PGD update of the adversary
    kl = gaussian_kl(mu[: mu.shape[0] // 2], logvar[: mu.shape[0] // 2], mu[mu.shape[0] // 2:],
                     logvar[mu.shape[0] // 2:], reduction="mean")
    loss = contrast(z, views=4, temperature=0.5) + 0.5 * kl
    x_adv = x.clone()
    pgd_step_(x_adv, g, x0, alpha=0.01, eps=0.03)
    return loss, x_adv


def _inputs(device):
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(10, 17, generator=g).to(device).requires_grad_(True)
    logvar = (0.3 * torch.randn(10, 17, generator=g)).to(device).requires_grad_(True)
    z = torch.randn(4, 5, 17, generator=g).to(device).requires_grad_(True)
    x0 = torch.rand(5, 3, 6, 6, generator=g).to(device)
    x = x0 + 0.01
    grad = torch.randn(5, 3, 6, 6, generator=g).to(device)
    return mu, logvar, z, x, grad, x0


@pytest.mark.parametrize("contrast", [nt_xent, nt_xent_column_detached], ids=["nt_xent", "column_detached"])
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_step_matches_eager(backend, compiler, contrast):
    if backend.name == "triton" and backend.device == "cpu":
        pytest.skip("Triton under the CPU interpreter is not compiled by inductor; covered on CUDA")
    if compiler == "inductor" and backend.name == "reference":
        pytest.skip("inductor is exercised on the fast backends (the reference is plain torch)")
    torch._dynamo.reset()
    args = _inputs(backend.device)
    loss, x_adv = _step(*args, contrast=contrast)
    grads = torch.autograd.grad(loss, args[:3])
    cargs = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
    cstep = torch.compile(_step, fullgraph=True, backend=compiler)
    closs, cx_adv = cstep(*cargs, contrast=contrast)
    cgrads = torch.autograd.grad(closs, cargs[:3])
    torch.testing.assert_close(closs, loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cx_adv, x_adv, rtol=0, atol=1e-6)
    for a, b in zip(cgrads, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("contrast", [nt_xent, nt_xent_column_detached], ids=["nt_xent", "column_detached"])
def test_compiled_backward_keeps_the_rows_only_kernel(contrast):
    """AOTAutograd's backward graph calls the C++ backward with cols_grad=False for detached columns (the
    rows-only kernel), True otherwise: the graph inductor lowers, recorded before it is compiled (the registered
    op's body is traced through, so the graph holds nt_xent_bwd_native)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from urkle_fast import _backend

    if not _backend.native_ops_present():
        pytest.skip("urkle_fast._C not built")
    backward_graphs = []

    def keep(gm, example_inputs):
        return make_boxed_func(gm)

    def keep_backward(gm, example_inputs):
        backward_graphs.append(gm)
        return make_boxed_func(gm)

    torch._dynamo.reset()
    args = _inputs("cpu")
    backend = aot_autograd(fw_compiler=keep, bw_compiler=keep_backward)
    loss, _ = torch.compile(_step, fullgraph=True, backend=backend)(*args, contrast=contrast)
    torch.autograd.grad(loss, args[:3])
    calls = [n for gm in backward_graphs for n in gm.graph.nodes
             if n.op == "call_function" and n.target is torch.ops.urkle_fast.nt_xent_bwd_native.default]
    assert [n.args[8] if len(n.args) > 8 else n.kwargs.get("cols_grad", True) for n in calls] == [contrast is nt_xent]


def test_random_start_traces_with_explicit_seed():
    x = torch.rand(4, 3, 5, 5)
    f = torch.compile(lambda t: pgd_random_start(t, 0.1, seed=3), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(x), pgd_random_start(x, 0.1, seed=3))
