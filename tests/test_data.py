"""Datasets (real copies under ../shared/data), batched multi-view augmentation, batch order."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from urkle_fast.data import (DataRootError, MultiViewAugment, as_tensors, epoch_batches, load_dataset,
                             num_classes_of)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data not found at {DATA}")


def test_digits_split_is_deterministic_and_disjoint():
    tr, te = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    assert (len(tr), len(te)) == (1437, 360)
    xtr, _ = as_tensors(tr)
    xte, _ = as_tensors(te)
    assert xtr.shape[1:] == (1, 8, 8) and 0 <= xtr.min() and xtr.max() <= 1
    assert torch.equal(as_tensors(load_dataset("digits", split="test"))[0], xte)
    flat_tr = {tuple(r) for r in xtr.flatten(1).tolist()}
    overlap = sum(tuple(r) in flat_tr for r in xte.flatten(1).tolist())
    assert overlap < 10  # a few duplicate images exist in digits itself


@needs_data
def test_mnist_and_cifar10_jpeg():
    m = load_dataset("mnist", DATA, "test")
    x, y = as_tensors(m, limit=32)
    assert x.shape == (32, 1, 28, 28) and y.dtype == torch.int64 and len(m) == 10000
    c = load_dataset("cifar10", DATA / "cifar10-jpeg", "test")
    x, y = as_tensors(c, limit=8)
    assert x.shape == (8, 3, 32, 32) and num_classes_of(c) == 10 and 0 <= x.min() and x.max() <= 1


@needs_data
def test_imagenet_layout_on_tiny_imagenet():
    ds = load_dataset("imagenet", DATA / "tiny-imagenet-100", "test", image_size=64)
    x, y = ds[0]
    assert x.shape == (3, 64, 64) and x.dtype == torch.uint8 and num_classes_of(ds) == 100


def test_epoch_batches_of_an_image_folder_leave_the_global_random_stream_alone():
    # a resumed run restores the global stream at its checkpoint, then starts a partial epoch: if building the
    # loader drew from that stream, every later z sample and random start would differ from the uninterrupted run
    ds = load_dataset("imagenet", DATA / "tiny-imagenet-100", "test", image_size=16)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    for start in (0, 3):
        batches = epoch_batches(ds, 8, seed=1, epoch=2, start_batch=start)
        next(batches)
        batches.close()
    assert torch.equal(torch.get_rng_state(), before)


def test_cifar100_pickle_format(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("test", 10)):
        with open(folder / split, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "fine_labels": list(rng.integers(0, 100, n))}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)
    ds = load_dataset("cifar100", tmp_path, "train")
    x, y = as_tensors(ds)
    assert x.shape == (20, 3, 32, 32) and num_classes_of(ds) == 100


class _Payload:
    """What a planted batch file would hold: unpickling it runs a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_cifar_batch_that_would_run_code_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "ran"
    good = {"data": np.zeros((10, 3072), dtype=np.uint8), "labels": list(range(10))}
    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(good if i != 3 else dict(good, labels=_Payload(marker)), f, protocol=2)
    with pytest.raises(DataRootError, match=r"data_batch_3' is not a CIFAR batch: it names posix.system"):
        load_dataset("cifar10", tmp_path, "train")
    assert not marker.exists()
    with open(folder / "data_batch_3", "wb") as f:  # the same files without the payload load
        pickle.dump(good, f, protocol=2)
    assert as_tensors(load_dataset("cifar10", tmp_path, "train"))[0].shape == (50, 3, 32, 32)


def test_clear_errors_for_bad_roots(tmp_path):
    with pytest.raises(DataRootError, match="does not exist"):
        load_dataset("mnist", tmp_path / "nope")
    with pytest.raises(DataRootError, match="MNIST/raw"):
        load_dataset("mnist", tmp_path)
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(DataRootError, match="ImageFolder tree|cifar-10-batches-py"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(DataRootError, match="train"):
        load_dataset("folder", tmp_path)
    (tmp_path / "train").mkdir()
    with pytest.raises(DataRootError, match="ImageFolder"):
        load_dataset("folder", tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("svhn")


@pytest.mark.parametrize("preset,channels", [("simclr", 3), ("digits", 1), ("light", 3), ("none", 1)])
def test_augment_shapes_range_and_seeding(preset, channels):
    x = torch.rand(6, channels, 16, 16)
    aug = MultiViewAugment(views=2, size=16, preset=preset)
    a = aug(x, torch.Generator().manual_seed(1))
    b = aug(x, torch.Generator().manual_seed(1))
    assert a.shape == (2, 6, channels, 16, 16) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b)
    if preset != "none":
        assert not torch.equal(a[0], a[1])
    else:
        assert torch.equal(a[0], x)


def test_uint8_input_and_resize():
    x = torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8)
    out = MultiViewAugment(views=3, size=32, preset="simclr")(x, torch.Generator().manual_seed(0))
    assert out.shape == (3, 4, 3, 32, 32) and out.dtype == torch.float32


def test_epoch_batches_order_is_a_function_of_seed_and_epoch():
    ds = load_dataset("digits")
    full = [y for _, y in epoch_batches(ds, 100, seed=3, epoch=2)]
    tail = [y for _, y in epoch_batches(ds, 100, seed=3, epoch=2, start_batch=5)]
    assert len(full) == 14 and len(tail) == 9 and all(torch.equal(a, b) for a, b in zip(full[5:], tail))
    other = [y for _, y in epoch_batches(ds, 100, seed=3, epoch=3)]
    assert not torch.equal(full[0], other[0])


def test_flat_imagenet_folder_on_real_full_size_photos(data_root):
    """../shared/data/imagenet-samples is a flat ImageFolder (<wnid>/<image>): it is the train split."""
    root = data_root / "imagenet-samples"
    ds = load_dataset("imagenet", root, "train", image_size=224)
    assert len(ds) == 100 and num_classes_of(ds) == 100
    x, y = ds[7]
    # decoded (at a reduced JPEG scale) and centre-cropped to 256 = 224 * 8 / 7, room for the random crop
    assert x.shape == (3, 256, 256) and x.dtype == torch.uint8 and y == 7
    assert x.float().std() > 10  # a photo, not a blank
    with pytest.raises(DataRootError, match="val or test"):
        load_dataset("imagenet", root, "test")
    with pytest.raises(DataRootError, match="needs --data-root"):
        load_dataset("imagenet")
