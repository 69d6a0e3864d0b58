"""Datasets: scikit-learn digits, MNIST, CIFAR-10/100 (torchvision pickles or ImageFolder JPEG trees),
ImageFolder trees (folder / imagenet). Items are (image, label): image a [C, H, W] tensor, uint8 in
[0, 255] or float in [0, 1] (to_float01 maps both to float [0, 1]); label an int.

Small sets live in memory (``InMemoryDataset``: whole batches are index lookups, no workers);
folder sets decode JPEGs in DataLoader workers. Augmentation is not done here: it runs batched, on
the training device, in urkle_fast.data.augment (the seam where a DALI pipeline will plug in).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from urkle_fast.defaults import DATASETS

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


class DataRootError(FileNotFoundError):
    """The data root is missing or not laid out as the dataset expects."""


class BadImageError(ValueError):
    """An image file cannot be decoded (truncated, corrupt); the message names the file."""

    @property
    def summary(self) -> str:
        """The message without the DataLoader worker's traceback that re-raising in the main process adds."""
        lines = [ln for ln in str(self).splitlines() if ln.strip()]
        last = lines[-1] if lines else ""
        return last.split("BadImageError: ", 1)[-1]


@dataclass(frozen=True)
class DatasetInfo:
    in_channels: int
    image_size: int  # side of the training crops
    num_classes: Optional[int]  # None: from the folder tree
    mean: tuple
    std: tuple


INFO = {
    "digits": DatasetInfo(1, 8, 10, (0.305,), (0.400,)),
    "mnist": DatasetInfo(1, 28, 10, (0.1307,), (0.3081,)),
    "cifar10": DatasetInfo(3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetInfo(3, 32, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "folder": DatasetInfo(3, 224, None, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagenet": DatasetInfo(3, 224, None, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def default_root(name: str) -> Optional[Path]:
    """../shared/data-relative defaults where that copy exists; None otherwise."""
    cand = {"mnist": SHARED_DATA, "cifar10": SHARED_DATA / "cifar10-jpeg"}.get(name)
    return cand if cand is not None and cand.exists() else None


class InMemoryDataset(Dataset):
    """images [N, C, H, W] (uint8 or float in [0, 1]), labels [N] int64."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str] = ()):
        assert images.ndim == 4 and len(images) == len(labels)
        self.images, self.labels, self.classes = images, labels.long(), list(classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def to_float01(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def _digits(split: str) -> InMemoryDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # [1797, 1, 8, 8] in [0, 1]
    labels = torch.from_numpy(d.target.astype(np.int64))
    # deterministic split, independent of any training seed: 80% train (1437), 20% test (360)
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    n_train = int(0.8 * len(images))  # 1437
    idx = perm[:n_train] if split == "train" else perm[n_train:]
    return InMemoryDataset(images[idx], labels[idx], [str(i) for i in range(10)])


def _mnist(root: Path, split: str) -> InMemoryDataset:
    import torchvision

    raw = root / "MNIST" / "raw"
    need = "train-images-idx3-ubyte" if split == "train" else "t10k-images-idx3-ubyte"
    if not (raw / need).is_file():
        raise DataRootError(
            f"MNIST not found under data root {str(root)!r}: expected the torchvision layout "
            f"<root>/MNIST/raw/{need} (and the label file); pass --data-root pointing at the folder that contains MNIST/"
        )
    ds = torchvision.datasets.MNIST(str(root), train=(split == "train"), download=False)
    return InMemoryDataset(ds.data.unsqueeze(1).contiguous(), ds.targets, ds.classes)


# what CIFAR's python batches hold besides dicts, lists, strings and numbers: numpy arrays (numpy 1 and 2 names),
# and bytes as a protocol-2 pickle written by Python 3 spells them (_codecs.encode: a pure function)
_CIFAR_GLOBALS = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")
                  } | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


def _load_cifar_batch(path: Path):
    """One CIFAR batch file, unpickled with only numpy's array globals allowed: a file that names any other
    callable (a planted ``os.system``, say) is refused before anything runs. torchvision checks the known md5s
    instead, which a re-packed copy fails."""
    import pickle

    class ArraysOnly(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in _CIFAR_GLOBALS:
                return super().find_class(module, name)
            raise DataRootError(f"{str(path)!r} is not a CIFAR batch: it names {module}.{name}, which unpickling "
                                f"would call; refused (only numpy arrays, lists and dicts are read)")

    with open(path, "rb") as fh:
        return ArraysOnly(fh, encoding="latin1").load()


def _cifar_pickle(name: str, root: Path, split: str) -> InMemoryDataset:
    """torchvision's CIFAR python pickles, read directly (no md5 check, so re-packed copies load; what they may
    contain is restricted instead, ``_load_cifar_batch``)."""
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        label_key, meta, names_key = "labels", "batches.meta", "label_names"
    else:
        files = ["train"] if split == "train" else ["test"]
        label_key, meta, names_key = "fine_labels", "meta", "fine_label_names"
    data, labels = [], []
    for f in files:
        if not (folder / f).is_file():
            raise DataRootError(f"{name}: {str(folder / f)!r} is missing (expected torchvision's {folder.name}/ layout)")
        entry = _load_cifar_batch(folder / f)
        data.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(entry[label_key])
    classes = []
    if (folder / meta).is_file():
        classes = _load_cifar_batch(folder / meta).get(names_key, [])
    return InMemoryDataset(torch.from_numpy(np.concatenate(data)), torch.tensor(labels), classes)


class FolderDataset(Dataset):
    """ImageFolder tree decoded to uint8 [3, S, S]: resize the shorter side to S, centre-crop S."""

    def __init__(self, split_dir: Path, size: int):
        import torchvision
        from torchvision.transforms import v2 as T

        try:
            self.inner = torchvision.datasets.ImageFolder(str(split_dir))
        except (FileNotFoundError, RuntimeError) as exc:
            raise DataRootError(f"{str(split_dir)!r} is not an ImageFolder tree (<split>/<class>/<image>): {exc}") from exc
        self.classes = self.inner.classes
        self.transform = T.Compose([T.Resize(size, antialias=True), T.CenterCrop(size)])
        self.size = size
        self.skip_bad_images = False  # the trainer's --skip-bad-images
        self.skip_log: Optional[str] = None  # where skipped files are listed

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i):
        for j in range(len(self.inner)):  # the next readable image stands in for a bad one (--skip-bad-images)
            path, label = self.inner.samples[(i + j) % len(self.inner)]
            try:
                return self._decode(path), label
            except Exception as exc:  # PIL raises many types for truncated / corrupt files
                if not self.skip_bad_images:
                    raise BadImageError(f"cannot decode image {path!r} ({type(exc).__name__}: {exc}); fix or remove "
                                        f"the file, or pass --skip-bad-images to train past unreadable images") from exc
                print(f"skipping unreadable image {path!r} ({type(exc).__name__}: {exc})", file=sys.stderr)
                if self.skip_log:  # one line per skip, appended from any DataLoader worker; the trainer counts them
                    with open(self.skip_log, "a") as f:
                        f.write(f"{path}\t{type(exc).__name__}: {exc}\n")
        raise BadImageError(f"no readable image in {len(self.inner)} files under {self.inner.root!r}")

    def _decode(self, path: str) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        img = self.inner.loader(path)
        if hasattr(img, "draft"):  # JPEG: decode at a reduced DCT scale that still covers the target size
            img.draft("RGB", (self.size, self.size))
        img = img.convert("RGB")
        x = TF.pil_to_tensor(img)
        if x.shape[-2:] != (self.size, self.size):
            x = self.transform(x)
        return x


def _split_dir(root: Path, split: str) -> Path:
    names = ("train",) if split == "train" else ("val", "test")
    for n in names:
        if (root / n).is_dir():
            return root / n
    if split == "train" and not any((root / n).is_dir() for n in ("val", "test")) and \
            any(p.is_dir() for p in root.iterdir()):
        return root  # a flat ImageFolder <root>/<class>/<image> (e.g. ../shared/data/imagenet-samples): train only
    raise DataRootError(
        f"data root {str(root)!r} has no {' or '.join(names)!s}/ folder: expected an ImageFolder layout "
        f"<root>/train/<class>/<image> and <root>/val/<class>/<image> (or test/)"
    )


def load_dataset(name: str, root: Optional[str | os.PathLike] = None, split: str = "train", *,
                 image_size: Optional[int] = None, crop_room: bool = True) -> Dataset:
    """The train or test split of a dataset (see the module docstring for formats).

    digits: scikit-learn's 8x8 digits, deterministic 80/20 split (1437 train / 360 test), no root.
    mnist: torchvision layout <root>/MNIST/raw. cifar10 / cifar100: torchvision pickles
    (<root>/cifar-10-batches-py, <root>/cifar-100-python) or an ImageFolder tree <root>/train, test.
    folder / imagenet: ImageFolder <root>/train and <root>/val (or test); images decoded at image_size
    (the train split at 8/7 of it when image_size > 64, room for the random crop, unless crop_room=False:
    evaluation encodes the train split at the model's size, as the test split).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name == "digits":
        return _digits(split)
    if root is None:
        root = default_root(name)
        if root is None:
            raise DataRootError(f"dataset {name!r} needs --data-root (no default copy under {str(SHARED_DATA)!r})")
    root = Path(root)
    if not root.is_dir():
        raise DataRootError(f"data root {str(root)!r} for dataset {name!r} does not exist or is not a directory")
    if name == "mnist":
        return _mnist(root, split)
    if name in ("cifar10", "cifar100"):
        pickle_dir = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
        if pickle_dir.is_dir():
            return _cifar_pickle(name, root, split)
        if (root / "train").is_dir():
            return FolderDataset(_split_dir(root, split), image_size or 32)
        raise DataRootError(
            f"{name} not found under data root {str(root)!r}: expected torchvision's {pickle_dir.name}/ folder "
            f"or an ImageFolder tree <root>/train/<class>/*.jpg and <root>/test/<class>/*.jpg"
        )
    size = image_size or INFO[name].image_size
    load_size = size if size <= 64 or not crop_room else int(round(size * 8 / 7))  # 224 -> 256: crop room
    return FolderDataset(_split_dir(root, split), load_size if split == "train" else size)


def num_classes_of(ds: Dataset) -> int:
    return len(getattr(ds, "classes", ())) or int(max(int(ds[i][1]) for i in range(len(ds)))) + 1


def as_tensors(ds: Dataset, limit: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x float [N, C, H, W] in [0, 1], y int64 [N]) for the first `limit` items (evaluation)."""
    n = len(ds) if limit is None else min(limit, len(ds))
    if isinstance(ds, InMemoryDataset):
        return to_float01(ds.images[:n]), ds.labels[:n].clone()
    xs, ys = zip(*(ds[i] for i in range(n)))
    return to_float01(torch.stack(xs)), torch.tensor(ys)


_WORKER_TERM_GRACE_S = 60.0


def _ignore_stop_signals(_worker_id: int) -> None:
    """Ctrl-C or a scheduler's SIGTERM reaches the whole process group: the trainer stops cleanly at the end
    of its step (and checkpoints), so its decoding workers must not die first. They exit with it (the
    trainer shuts its loaders down, epoch_batches' finally); a SIGTERM still ends a worker after a grace
    period, so that nothing can wait on it forever (multiprocessing's exit handler terminates, then joins)."""
    import os
    import signal
    import threading

    def later(_signum, _frame):
        timer = threading.Timer(_WORKER_TERM_GRACE_S, os._exit, args=(0,))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, later)


def epoch_batches(ds: Dataset, batch_size: int, *, seed: int, epoch: int, start_batch: int = 0,
                  num_workers: int = 0, pin_memory: bool = False,
                  shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches (images, labels) of one epoch in a fixed order, a function of (seed, epoch) only, so a
    resumed run skips `start_batch` batches and sees exactly what an uninterrupted run would see.
    The last incomplete batch is dropped (contrastive losses want a fixed batch).

    ``batch_size`` is the global batch; ``shard=(rank, world)`` yields only images
    [rank * b, (rank + 1) * b) of each global batch, b = batch_size / world (which must divide), so
    the ranks of a torch.distributed run read disjoint slices of the same global batches."""
    rank, world = shard
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard!r}")
    if batch_size % world:
        raise ValueError(f"the global batch size {batch_size} must be divisible by the number of ranks {world}")
    b = batch_size // world
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    n_batches = len(ds) // batch_size
    batches = [perm[i * batch_size + rank * b:i * batch_size + (rank + 1) * b] for i in range(start_batch, n_batches)]
    if isinstance(ds, InMemoryDataset):
        for idx in batches:
            yield ds.images[idx], ds.labels[idx]
        return
    # generator: a DataLoader iterator draws its workers' base seed from it, by default from the global stream,
    # one draw per epoch here; a run resumed mid-epoch would make one more and shift every later z sample and
    # random start against the uninterrupted run
    loader = DataLoader(ds, batch_sampler=[b.tolist() for b in batches], num_workers=num_workers,
                        pin_memory=pin_memory, persistent_workers=False,
                        worker_init_fn=_ignore_stop_signals if num_workers else None,
                        generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    it = iter(loader)
    try:
        for images, labels in it:
            yield images, torch.as_tensor(labels)
    finally:  # on an error or when the caller closes us: the workers go now, not whenever the iterator is collected
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def subset_order(n: int, *, by_class: bool) -> torch.Tensor:
    """The order in which ``--train-subset N`` (its first N) and eval's ``--holdout N`` (its last N) read a training
    split of n images: as stored for the in-memory datasets (digits, MNIST and the CIFAR pickles are stored in a
    random order), a fixed seeded permutation for ImageFolder trees (``by_class``: stored class by class, so that
    their first N files would be a few classes only)."""
    if not by_class:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(20220401))


def steps_per_epoch(ds: Dataset, batch_size: int) -> int:
    n = len(ds) // batch_size
    if n == 0:
        raise ValueError(f"batch size {batch_size} is larger than the dataset ({len(ds)} images)")
    return n


Budget = Union[int, str]


def parse_budget(b: Budget) -> Budget:
    if isinstance(b, str) and b != "all":
        if not b.isdigit():
            raise ValueError(f"label budget must be 'all' or a positive integer, got {b!r}")
        b = int(b)
    if isinstance(b, int) and b <= 0:
        raise ValueError(f"label budget must be positive, got {b}")
    return b


def balanced_subset(labels: torch.Tensor, budget: Budget, *, seed: int = 0) -> torch.Tensor:
    """Indices of a class-balanced subset of ``budget`` labels, the same for the same seed.

    Each class gets ``budget // C`` examples; the ``budget % C`` left over go to a seeded random
    choice of classes, one each. ``budget == "all"`` returns every index. Sorted int64 [budget].
    """
    budget = parse_budget(budget)
    labels = torch.as_tensor(labels).long().cpu()
    if budget == "all":
        return torch.arange(len(labels))
    if budget > len(labels):
        raise ValueError(f"label budget {budget} exceeds the {len(labels)} training labels")
    g = torch.Generator().manual_seed(int(seed))
    classes = torch.unique(labels)
    per, rem = divmod(budget, len(classes))
    extra = set(classes[torch.randperm(len(classes), generator=g)[:rem]].tolist())
    out = []
    for c in classes.tolist():
        idx = (labels == c).nonzero(as_tuple=True)[0]
        n = per + (1 if c in extra else 0)
        if n > len(idx):
            raise ValueError(f"label budget {budget}: class {c} has only {len(idx)} examples, needs {n}")
        out.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    return torch.cat(out).sort().values
