"""urkle_fast: fused kernels and a compiled trainer for Urkle (task-agnostic robust representations).

    from urkle_fast import gaussian_kl, pgd_step_, pgd_random_start, nt_xent, GaussianKL, NTXent
    nt_xent(z, views=4, gather_distributed=True)   # over every rank's batch under torch.distributed
"""

__version__ = "0.1.0"

from urkle_fast._backend import use_backend  # noqa: E402
from urkle_fast.distributed import all_gather_with_grad  # noqa: E402
from urkle_fast.nn import GaussianKL, NTXent  # noqa: E402
from urkle_fast.ops import (  # noqa: E402
    gaussian_kl,
    gaussian_kl_reference,
    nt_xent,
    nt_xent_column_detached,
    nt_xent_column_detached_reference,
    nt_xent_reference,
    pgd_random_start,
    pgd_step_,
    pgd_step_reference_,
)

__all__ = ["GaussianKL", "NTXent", "all_gather_with_grad", "gaussian_kl", "gaussian_kl_reference", "nt_xent",
           "nt_xent_column_detached", "nt_xent_column_detached_reference", "nt_xent_reference",
           "pgd_random_start", "pgd_step_", "pgd_step_reference_", "use_backend", "__version__"]
