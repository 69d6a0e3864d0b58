"""The three fused ops: reference, registered torch.library op, public function (one file each)."""

from urkle_fast.ops.gaussian_kl import gaussian_kl, gaussian_kl_reference
from urkle_fast.ops.nt_xent import (nt_xent, nt_xent_column_detached, nt_xent_column_detached_reference,
                                   nt_xent_reference)
from urkle_fast.ops.pgd import pgd_random_start, pgd_step_, pgd_step_reference_

__all__ = ["gaussian_kl", "gaussian_kl_reference", "nt_xent", "nt_xent_column_detached",
           "nt_xent_column_detached_reference", "nt_xent_reference", "pgd_random_start", "pgd_step_",
           "pgd_step_reference_"]
