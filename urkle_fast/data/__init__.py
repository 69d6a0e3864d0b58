"""Datasets and batched multi-view augmentation (see datasets.py and augment.py)."""

from .augment import PRESETS, LazyViews, MultiViewAugment
from .datasets import (DATASETS, INFO, SHARED_DATA, BadImageError, DataRootError, DatasetInfo, FolderDataset,
                       InMemoryDataset, as_tensors, default_root, epoch_batches, load_dataset, num_classes_of, steps_per_epoch,
                       to_float01)

__all__ = ["PRESETS", "LazyViews", "MultiViewAugment", "DATASETS", "INFO", "SHARED_DATA", "BadImageError", "DataRootError",
           "DatasetInfo", "FolderDataset", "InMemoryDataset", "as_tensors", "default_root", "epoch_batches",
           "load_dataset", "num_classes_of", "steps_per_epoch", "to_float01"]
