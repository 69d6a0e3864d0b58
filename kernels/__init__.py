"""Triton kernels of urkle_fast (installed as ``urkle_fast._kernels``).

One module per op (gaussian_kl, pgd, nt_xent): ``@triton.jit`` kernels and plain launchers on tensors.
No autograd and no torch.library here: every launcher takes ``launch=`` (default identity), a callable
applied to each kernel before it is indexed with its grid; the registered ops in ``urkle_fast/ops/``
pass ``torch.library.wrap_triton`` so that torch.compile and make_fx see the kernels.
Calling convention: docs/KERNEL_CONTRACT.md.
"""
