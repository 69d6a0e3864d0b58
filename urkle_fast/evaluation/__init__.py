"""Pieces of ``python -m urkle_fast.eval``: datasets, downstream head, attacks, tables, plots."""

from .attacks import apgd, apgd_ce, apgd_targeted, attack_scores, pgd_linf, robust_accuracy
from .datasets import Split, load_split
from .probe import ProbabilisticClassifier, balanced_subset, bounded_log_probs, make_head, train_head

__all__ = [
    "ProbabilisticClassifier", "Split", "apgd", "apgd_ce", "apgd_targeted", "attack_scores", "balanced_subset",
    "bounded_log_probs",
    "load_split", "make_head", "pgd_linf", "robust_accuracy", "train_head",
]
