"""Evaluation data: each split as labels plus images, in memory or (ImageFolder trees) left on disk.

The evaluator needs random access (class-balanced label subsets, fixed test subsets). Small datasets
(digits, MNIST, CIFAR pickles) are materialised once as tensors. ImageFolder trees (folder / imagenet,
CIFAR-10 as JPEGs) are not: ImageNet's train split is 1.28 M images, 190 GiB as uint8 at 224 pixels.
Their labels come from the file list without decoding; the train split is streamed through the
encoder in DataLoader batches (only the [N, d_z] features are kept), and only the chosen test subset
is decoded, kept as uint8 (4x smaller than float32) and converted per batch on the device.
Everything goes through the trainer's loaders (``urkle_fast.data``), so the head is trained and
tested on the splits the representation was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from urkle_fast.defaults import defaults_for

@dataclass
class Split:
    x: Optional[torch.Tensor]  # [N, C, H, W] float32 in [0, 1] or uint8; None: the images stay on disk
    y: torch.Tensor  # [N] int64
    num_classes: int
    dataset: Optional[Dataset] = None  # the source when x is None: items (uint8 image, label)

    def images(self, idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The images ``idx`` (all if None), [n, C, H, W]: decoded from disk when not in memory."""
        if self.x is not None:
            return self.x if idx is None else self.x[idx]
        rows = range(len(self.y)) if idx is None else idx.tolist()
        return torch.stack([self.dataset[i][0] for i in rows]) if len(rows) else torch.empty(0, dtype=torch.uint8)

    def subset(self, rows) -> "Split":
        """Rows ``rows`` (a slice or an index tensor) as a Split of the same kind."""
        if self.x is not None:
            return Split(self.x[rows], self.y[rows], self.num_classes)
        r = range(len(self.y))[rows] if isinstance(rows, slice) else rows.tolist()
        return Split(None, self.y[rows], self.num_classes, dataset=Subset(self.dataset, r))

    def batches(self, batch_size: int, num_workers: int = 0) -> Iterator[torch.Tensor]:
        """Every image in order, ``batch_size`` at a time (uint8 or float; see urkle_fast.data.to_float01)."""
        if self.x is not None:
            for i in range(0, len(self.x), batch_size):
                yield self.x[i:i + batch_size]
            return
        loader = DataLoader(self.dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        for xb, _ in loader:
            yield xb


def load_split(dataset: str, split: str, data_root: Optional[str] = None,
               image_size: Optional[int] = None) -> Split:
    """``split`` ("train" / "test") of ``dataset`` via urkle_fast.data.load_dataset (digits: its
    deterministic 1437 / 360 split; data_root None: the ../shared/data copy). In-memory datasets come
    as tensors in [0, 1]; ImageFolder trees as labels plus the dataset (images decoded on demand, at
    ``image_size``, centre-cropped, for both splits)."""
    from urkle_fast.data import InMemoryDataset, as_tensors, load_dataset, num_classes_of

    defaults_for(dataset)  # a clear error for an unknown name
    ds = load_dataset(dataset, data_root, split, image_size=image_size, crop_room=False)
    inner = getattr(ds, "inner", None)
    if not isinstance(ds, InMemoryDataset) and inner is not None and hasattr(inner, "targets"):
        return Split(None, torch.as_tensor(inner.targets, dtype=torch.long), num_classes_of(ds), dataset=ds)
    x, y = as_tensors(ds)
    return Split(x.contiguous(), y.long(), num_classes_of(ds))
