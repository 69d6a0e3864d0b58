"""The trainer's loaders: one interface over the torch path and NVIDIA DALI.

A training loader is iterable and resumable:

* ``for crops, labels in loader`` yields the rest of the current epoch: crops float32 [V, b, C, S, S]
  in [0, 1] and labels int64 [b] on the training device (b = this rank's share of the global batch);
  with ``lazy=True`` (the torch path; the trainer's choice) crops are ``LazyViews``: the decoded uint8 batch,
  augmented chunk by chunk when the step asks for ``crops[:, i:j]``;
  ``forever(loader)`` chains epochs;
* ``len(loader)``: full batches per epoch (the same on every rank);
* ``state()`` after the batches consumed so far, and ``load_state(state)`` to continue exactly there.

``TorchMultiView`` (below) reads batches in a (seed, epoch)-determined order (epoch_batches; DataLoader
workers decode ImageFolder trees) and augments them on the device with MultiViewAugment, seeded by
(seed, step, rank). ``urkle_fast.data.dali.DaliMultiView`` decodes and augments in a DALI pipeline.
``make_train_loader`` picks one; the training loop never knows which.
"""

from __future__ import annotations

import sys
from typing import Iterator, Optional

import torch
from torch.utils.data import Dataset

from .augment import MultiViewAugment
from .datasets import InMemoryDataset, epoch_batches, steps_per_epoch


class TorchMultiView:
    def __init__(self, ds: Dataset, batch_size: int, *, views: int, size: int, preset: str, seed: int,
                 device: torch.device, shard: tuple[int, int] = (0, 1), num_workers: int = 0, lazy: bool = False):
        self.ds, self.batch_size, self.seed, self.device, self.shard = ds, batch_size, seed, device, shard
        self.num_workers, self.lazy = num_workers, lazy
        self.augment = MultiViewAugment(views=views, size=size, preset=preset)
        self._len = steps_per_epoch(ds, batch_size)
        self.position = 0  # batches consumed since the start of training (= the optimiser step)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = divmod(self.position, self._len)
        rank = self.shard[0]
        for images, labels in epoch_batches(self.ds, self.batch_size, seed=self.seed, epoch=epoch, start_batch=start,
                                            num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
                                            shard=self.shard):
            # one generator per (seed, step, rank): a resumed run draws the crops it would have drawn
            gen = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + self.position + (rank << 40))
            images = images.to(self.device, non_blocking=True)
            crops = self.augment.lazy(images, gen) if self.lazy else self.augment(images, gen)
            self.position += 1  # before the yield: state() taken after this batch's step points past it
            yield crops, labels.to(self.device, non_blocking=True)

    def state(self) -> dict:
        return {"position": self.position}

    def load_state(self, state: dict) -> None:
        self.position = int(state["position"])


def forever(loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Epoch after epoch of ``loader``, from where it stands."""
    while True:
        yield from loader


def folder_root(ds) -> Optional[str]:
    """The ImageFolder tree behind ``ds`` (what DALI can read; through a --train-subset), or None."""
    if isinstance(ds, torch.utils.data.Subset):
        ds = ds.dataset
    inner = getattr(ds, "inner", None)
    return getattr(inner, "root", None) if not isinstance(ds, InMemoryDataset) else None


def resolve_loader(loader: str, ds, *, dataset: str, on_cuda: bool, train_subset: Optional[int], preset: str,
                   skip_bad_images: bool = False) -> str:
    """"torch" or "dali" for this run (clear errors where DALI cannot read the data set). --skip-bad-images
    needs the torch path: DALI decodes the files itself."""
    if loader not in ("auto", "torch", "dali"):
        raise ValueError(f"--loader must be auto, torch or dali, got {loader!r}")
    folder = folder_root(ds) is not None
    if loader == "auto":
        if not (on_cuda and folder and dataset in ("folder", "imagenet") and not train_subset and not skip_bad_images):
            return "torch"
        from .dali import dali_available

        return "dali" if dali_available()[0] else "torch"
    if loader == "dali":
        from .dali import PRESETS as DALI_PRESETS, dali_available

        ok, why = dali_available()
        if not ok:
            raise ValueError(f"--loader dali: {why}")
        if not folder:
            raise ValueError(f"--loader dali reads ImageFolder JPEG trees; dataset {dataset!r} is not one "
                             f"(use --loader torch)")
        if train_subset:
            raise ValueError("--loader dali reads the whole tree; --train-subset / --label-budget need --loader torch")
        if preset not in DALI_PRESETS:
            raise ValueError(f"--loader dali has the augmentation presets {DALI_PRESETS}, not {preset!r}")
    return loader


def make_train_loader(kind: str, ds, *, batch_size: int, views: int, size: int, preset: str, seed: int,
                      device: torch.device, rank: int, world: int, num_workers: int, position: int,
                      states: Optional[list] = None, lazy: bool = False):
    """The loader of this rank at optimiser step ``position``. ``states``: every rank's ``state()`` from the
    checkpoint (DALI resumes from its own; a run restarted on another number of ranks restarts DALI's
    shuffle - the torch path's order does not depend on the number of ranks). ``lazy``: the torch path yields
    ``LazyViews`` (DALI's GPU pipeline yields its float views)."""
    if kind == "torch":
        loader = TorchMultiView(ds, batch_size, views=views, size=size, preset=preset, seed=seed, device=device,
                                shard=(rank, world), num_workers=num_workers, lazy=lazy)
        loader.load_state({"position": position})
        return loader
    from .dali import DaliMultiView

    state = None
    if states is not None and len(states) == world and isinstance(states[rank], str):
        state = states[rank]
    elif states is not None and position > 0 and rank == 0 and any(isinstance(st, str) for st in states):
        print(f"the checkpoint holds {len(states)} DALI loader states for {world} processes: the data "
              f"pipeline restarts its shuffle (model, optimiser and schedule continue exactly)", file=sys.stderr)
    loader = DaliMultiView(folder_root(ds), batch_size // world, views=views, size=size, preset=preset, device=device,
                           shard_id=rank, num_shards=world, seed=seed, num_threads=max(1, num_workers),
                           checkpoint=state)
    if len(loader) == 0:
        raise ValueError(f"batch size {batch_size} is larger than the dataset ({len(ds)} images)")
    return loader
