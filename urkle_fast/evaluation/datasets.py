"""Evaluation data: every split as in-memory tensors x in [0, 1] (NCHW float32) and y (int64).

The evaluator needs random access (class-balanced label subsets, fixed test subsets), so the
splits are materialised once as tensors, through the trainer's loaders (``urkle_fast.data``) so
that the head is trained and tested on the same splits the representation was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

DATASETS = ("digits", "mnist", "cifar10", "cifar100", "folder", "imagenet")

# Test epsilons of SPEC sec. 6 (pixel units in [0, 1]). digits (8x8, no paper number): 0.1 and 0.2 (choice).
DEFAULT_EPS = {
    "digits": [0.1, 0.2],
    "mnist": [0.1],
    "cifar10": [8 / 255, 16 / 255],
    "cifar100": [8 / 255, 16 / 255],
    "folder": [2 / 255],
    "imagenet": [2 / 255],
}
# Sweeps for the accuracy-vs-epsilon plot; they end where an undefended model must be at ~0.
DEFAULT_SWEEP = {
    "digits": [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75],
    "mnist": [0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75],
    "cifar10": [0.0, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 32 / 255, 64 / 255],
    "cifar100": [0.0, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 32 / 255, 64 / 255],
    "folder": [0.0, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 32 / 255, 64 / 255],
    "imagenet": [0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 32 / 255],
}
# Downstream head of SPEC sec. 7: three FC layers with BN + ReLU on MNIST, a linear layer elsewhere.
DEFAULT_HEAD = {"digits": "linear", "mnist": "mlp3", "cifar10": "linear", "cifar100": "linear", "folder": "linear",
                "imagenet": "linear"}


@dataclass
class Split:
    x: torch.Tensor  # [N, C, H, W] float32 in [0, 1]
    y: torch.Tensor  # [N] int64
    num_classes: int


def check_dataset(dataset: str) -> str:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    return dataset


def load_split(dataset: str, split: str, data_root: Optional[str] = None,
               image_size: Optional[int] = None) -> Split:
    """``split`` ("train" / "test") of ``dataset`` as tensors in [0, 1], via urkle_fast.data.load_dataset
    (digits: its deterministic 1437 / 360 split; data_root None: the ../shared/data copy)."""
    from urkle_fast.data import as_tensors, load_dataset, num_classes_of

    check_dataset(dataset)
    ds = load_dataset(dataset, data_root, split, image_size=image_size)
    x, y = as_tensors(ds)
    return Split(x.contiguous(), y.long(), num_classes_of(ds))
