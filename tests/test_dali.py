"""urkle_fast.data.dali: the DALI multi-view loader, on the real JPEG trees under ../shared/data (CPU pipelines)."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("nvidia.dali")

from PIL import Image  # noqa: E402
from torchvision.datasets import ImageFolder  # noqa: E402
from torchvision.transforms.functional import pil_to_tensor  # noqa: E402

from urkle_fast.data.dali import DaliMultiView, dali_available  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY = DATA / "tiny-imagenet-100" / "train"
SAMPLES = DATA / "imagenet-samples"
pytestmark = pytest.mark.skipif(not TINY.is_dir() or not SAMPLES.is_dir(), reason=f"shared data not found at {DATA}")

# class folder names whose sorted order (ImageFolder's) differs from creation order and from numeric order
SMALL_NAMES = ("c9", "B", "c10", "a")
PER_CLASS = 10


def _mode(path):
    with Image.open(path) as im:
        return im.mode


def _rgb01(path):
    with Image.open(path) as im:
        return pil_to_tensor(im.convert("RGB")).float() / 255


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    """4 classes x 10 real tiny-imagenet JPEGs (symlinks; the last class 11: 41 images, so that batches of 8
    leave a partial last batch), with a greyscale (mode L) file where a class has one."""
    root = tmp_path_factory.mktemp("small_imagefolder")
    sources = sorted(p for p in TINY.iterdir() if p.is_dir())[:4]
    n_gray = 0
    for name, src in zip(SMALL_NAMES, sources):
        files = sorted(src.iterdir())
        gray = [f for f in files if _mode(f) == "L"][:1]
        n = PER_CLASS + (name == SMALL_NAMES[-1])
        picked = gray + [f for f in files if f not in gray][:n - len(gray)]
        n_gray += len(gray)
        (root / name).mkdir()
        for f in picked:
            os.symlink(f, root / name / f.name)
    assert n_gray >= 1, "expected a greyscale JPEG among the first 4 tiny-imagenet classes"
    return root


def _decoded(root):
    """ImageFolder(root) and all its images decoded by PIL as float [N, 3, H, W] in [0, 1]."""
    ds = ImageFolder(str(root))
    imgs = torch.stack([_rgb01(p) for p, _ in ds.samples])
    return ds, imgs


def _match(x, imgs):
    """Index of the decoded file each image in x [B, 3, H, W] is (mean abs difference; must be unambiguous)."""
    d = (x[:, None] - imgs[None]).abs().flatten(2).mean(-1)  # [B, N]
    two = d.topk(2, dim=1, largest=False).values
    assert (two[:, 0] < 0.01).all(), f"an output image matches no source file: {two[:, 0].max():.4f}"
    assert (two[:, 1] > 0.03).all(), "ambiguous match"
    return d.argmin(1)


def test_dali_available():
    ok, why = dali_available()
    assert ok and why == ""


def test_shapes_range_and_labels_on_tiny_imagenet():
    loader = DaliMultiView(TINY, 16, views=3, size=32, preset="simclr", seed=1)
    ref = ImageFolder(str(TINY))
    assert loader.classes == ref.classes and loader.num_classes == 100 and loader.num_images == len(ref)
    assert len(loader) == len(ref) // 16
    it = iter(loader)
    for _ in range(2):
        views, labels = next(it)
        assert views.shape == (3, 16, 3, 32, 32) and views.dtype == torch.float32 and views.device.type == "cpu"
        assert views.min() >= 0 and views.max() <= 1 and views.std() > 0.05
        assert labels.shape == (16,) and labels.dtype == torch.int64
        assert labels.min() >= 0 and labels.max() < 100


def test_labels_are_imagefolder_indices_of_the_files_on_tiny_imagenet():
    # "none" at the native 64x64 returns the decoded image itself: find it among the files of the class
    # folder that ImageFolder's index names
    loader = DaliMultiView(TINY, 12, views=1, size=64, preset="none", seed=3)
    classes = ImageFolder(str(TINY)).classes
    views, labels = next(iter(loader))
    cache = {}
    for x, y in zip(views[0], labels.tolist()):
        if y not in cache:
            cache[y] = torch.stack([_rgb01(f) for f in sorted((TINY / classes[y]).iterdir())])
        d = (cache[y] - x).abs().flatten(1).mean(1)
        assert d.min() < 0.01, f"sample labelled {y} ({classes[y]}) is none of that class folder's images"


def test_labels_and_greyscale_on_small_root(small_root):
    ds, imgs = _decoded(small_root)
    assert ds.class_to_idx == {"B": 0, "a": 1, "c10": 2, "c9": 3}
    targets = torch.tensor(ds.targets)
    gray_files = [i for i, (p, _) in enumerate(ds.samples) if _mode(p) == "L"]
    assert len(ds) == 41
    loader = DaliMultiView(small_root, 41, views=1, size=64, preset="none")
    assert loader.classes == ds.classes and len(loader) == 1
    seen = []
    for views, labels in loader:
        idx = _match(views[0], imgs)
        assert torch.equal(labels, targets[idx])
        for j, i in enumerate(idx.tolist()):
            if i in gray_files:  # mode L decoded to 3 equal channels
                assert views.shape[2] == 3 and torch.equal(views[0, j, 0], views[0, j, 1])
                assert torch.equal(views[0, j, 1], views[0, j, 2])
        seen += idx.tolist()
    assert sorted(seen) == list(range(len(ds)))  # one batch of all 41 images: every file exactly once
    assert gray_files and set(gray_files) <= set(seen)


def test_views_differ_and_none_gives_identical_views():
    views, _ = next(iter(DaliMultiView(TINY, 16, views=2, size=32, preset="simclr", seed=5)))
    per_sample = (views[0] - views[1]).abs().flatten(1).amax(1)
    assert (per_sample > 0.05).all()
    gray = (views[:, :, 0] == views[:, :, 1]).flatten(2).all(-1) & (views[:, :, 1] == views[:, :, 2]).flatten(2).all(-1)
    assert 1 <= gray.sum() <= 16  # greyscale with p=0.2 over 32 views (plus ~1.6% greyscale sources)

    views, _ = next(iter(DaliMultiView(TINY, 16, views=2, size=32, preset="light", seed=5)))
    assert ((views[0] - views[1]).abs().flatten(1).amax(1) > 0.01).sum() >= 12

    views, _ = next(iter(DaliMultiView(TINY, 16, views=3, size=48, preset="none", seed=5)))
    assert views.shape == (3, 16, 3, 48, 48)
    assert torch.equal(views[0], views[1]) and torch.equal(views[0], views[2])


def test_full_size_imagenet_samples_at_224():
    loader = DaliMultiView(SAMPLES, 8, views=2, size=224, preset="simclr", seed=0)
    assert len(loader) == 100 // 8 and loader.num_classes == 100
    labels_seen = []
    for views, labels in loader:
        assert views.shape == (2, 8, 3, 224, 224) and views.dtype == torch.float32
        assert 0 <= views.min() and views.max() <= 1 and views.std() > 0.05
        labels_seen += labels.tolist()
    # one photo per class: an epoch of 12 full batches holds 96 distinct classes
    assert len(labels_seen) == 96 and len(set(labels_seen)) == 96


def test_len_drops_last_partial_batch_and_epochs_repeat(small_root):
    ds, imgs = _decoded(small_root)
    loader = DaliMultiView(small_root, 8, views=1, size=64, preset="none", seed=2)
    assert len(loader) == len(ds) // 8 == 5  # 41 images: 5 full batches, 1 image dropped per epoch
    epochs = []
    for _ in range(4):
        batches = list(loader)
        assert len(batches) == len(loader)
        assert all(v.shape == (1, 8, 3, 64, 64) and y.shape == (8,) for v, y in batches)
        order = torch.cat([_match(v[0], imgs) for v, _ in batches]).tolist()
        # no file twice within an epoch: an epoch never borrows from the next one (this fails without the
        # reader's pad_last_batch=True: the dropped batch then straddles two passes over the data)
        assert len(set(order)) == 40
        epochs.append(order)
    assert all(a != b for a, b in zip(epochs, epochs[1:]))  # reshuffled every epoch


def test_same_seed_same_batches_other_seed_differs(small_root):
    def first(seed, n=3):
        it = iter(DaliMultiView(small_root, 8, size=32, seed=seed))
        return [next(it) for _ in range(n)]

    a, b, c = first(7), first(7), first(8)
    for (va, ya), (vb, yb) in zip(a, b):
        assert torch.equal(va, vb) and torch.equal(ya, yb)
    assert not all(torch.equal(va, vc) for (va, _), (vc, _) in zip(a, c))


@pytest.mark.parametrize("num_shards,batch", [(2, 4), (3, 4)])
def test_shards_are_disjoint(small_root, num_shards, batch):
    # 41 images: 2 shards of 20/21 (20 a multiple of the batch: the case DALI 2.4's DROP iterator gets wrong),
    # or 3 shards of 13/14/14 (3 full batches, a partial one dropped)
    ds, imgs = _decoded(small_root)
    targets = torch.tensor(ds.targets)
    shards = [DaliMultiView(small_root, batch, views=1, size=64, preset="none", shard_id=k, num_shards=num_shards,
                            seed=0) for k in range(num_shards)]
    n = (len(ds) // num_shards) // batch
    assert [len(s) for s in shards] == [n] * num_shards
    for _ in range(3):  # epochs (the parts rotate between ranks, and stay disjoint)
        seen = []
        for loader in shards:
            got = []
            for views, labels in loader:
                idx = _match(views[0], imgs)
                assert torch.equal(labels, targets[idx])
                got += idx.tolist()
            assert len(got) == n * batch == len(set(got))  # full batches, no image twice (no padding)
            seen += got
        assert len(seen) == len(set(seen)) == num_shards * n * batch  # disjoint across shards


def _equal(xs, ys):
    return len(xs) == len(ys) and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(xs, ys))


def _take(loader, n):
    out = []
    while len(out) < n:
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                break
    return out


@pytest.mark.parametrize("num_shards,shard_id,batch", [(1, 0, 8), (2, 1, 4)])
def test_state_resume_is_exact(small_root, num_shards, shard_id, batch):
    kw = dict(views=2, size=32, preset="simclr", seed=4, num_shards=num_shards, shard_id=shard_id)
    per_epoch = 5  # 41 // 8, and (41 // 2) // 4
    total = 12  # the resumed runs cross epoch boundaries
    ref = _take(DaliMultiView(small_root, batch, **kw), total)
    assert len(DaliMultiView(small_root, batch, **kw)) == per_epoch
    for k in (0, 3, 5, 7):
        loader = DaliMultiView(small_root, batch, **kw)
        assert _equal(_take(loader, k), ref[:k])
        state = loader.state()
        assert isinstance(state, str) and json.loads(state)["config"]["batch_size"] == batch
        resumed = DaliMultiView(small_root, batch, checkpoint=state, **kw)
        first_epoch = list(resumed)  # the rest of the interrupted epoch (a whole one at an epoch boundary)
        assert len(first_epoch) == per_epoch - k % per_epoch
        rest = first_epoch + _take(resumed, total - k - len(first_epoch))
        assert _equal(rest, ref[k:total]), f"resume after {k} batches differs"
        # and the interrupted loader itself goes on with the same batches
        assert _equal(list(loader), first_epoch)
    # state taken after a complete pass: the next epoch, and the original loader agrees
    loader = DaliMultiView(small_root, batch, **kw)
    assert len(list(loader)) == per_epoch
    resumed = DaliMultiView(small_root, batch, checkpoint=loader.state(), **kw)
    assert _equal(list(resumed), ref[5:10]) and _equal(list(loader), ref[5:10])


def test_state_refuses_other_configuration(small_root):
    state = DaliMultiView(small_root, 8, size=32, seed=4).state()
    with pytest.raises(ValueError, match=r"checkpoint.*batch_size: saved 8, now 4"):
        DaliMultiView(small_root, 4, size=32, seed=4, checkpoint=state)
    with pytest.raises(ValueError, match=r"checkpoint.*seed: saved 4, now 5"):
        DaliMultiView(small_root, 8, size=32, seed=5, checkpoint=state)
    with pytest.raises(ValueError, match=r"checkpoint: expected the string returned by DaliMultiView.state"):
        DaliMultiView(small_root, 8, size=32, seed=4, checkpoint="not a state")


def test_bad_inputs_name_the_argument(tmp_path, small_root):
    with pytest.raises(FileNotFoundError, match=r"root: .*does not exist"):
        DaliMultiView(tmp_path / "nope", 8)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"root: .*not a directory"):
        DaliMultiView(tmp_path / "file.txt", 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"root: .*no class folders"):
        DaliMultiView(tmp_path / "empty", 8)
    bad = tmp_path / "bad"
    (bad / "cls_ok").mkdir(parents=True)
    (bad / "cls_empty").mkdir()
    first = sorted((small_root / "a").iterdir())[0]
    os.symlink(first, bad / "cls_ok" / first.name)
    with pytest.raises(FileNotFoundError, match=r"root: class folder\(s\) cls_empty .*hold no images"):
        DaliMultiView(bad, 1)
    (bad / "cls_empty" / "nested").mkdir()
    os.symlink(first, bad / "cls_empty" / "nested" / first.name)
    with pytest.raises(ValueError, match=r"root: .*nested.*inside class folder 'cls_empty'"):
        DaliMultiView(bad, 1)

    cases = [
        (dict(batch_size=0), r"batch_size: expected an int >= 1, got 0"),
        (dict(batch_size=42), r"batch_size: 42 is larger than the 41 images"),
        (dict(views=0), r"views: expected an int >= 1, got 0"),
        (dict(size=0), r"size: expected an int >= 1, got 0"),
        (dict(preset="autoaugment"), r"preset: expected one of .*'simclr'.*got 'autoaugment'"),
        (dict(device="tpu"), r"device: expected 'cpu', 'cuda'.*got 'tpu'"),
        (dict(device="mps"), r"device: expected 'cpu' or 'cuda\[:N\]', got 'mps'"),
        (dict(device=3), r"device: expected .*got 3 of type int"),
        (dict(shard_id=2, num_shards=2), r"shard_id: expected an int in \[0, num_shards=2\), got 2"),
        (dict(shard_id=-1), r"shard_id: expected an int in \[0, num_shards=1\), got -1"),
        (dict(num_shards=0), r"num_shards: expected an int >= 1, got 0"),
        (dict(batch_size=21, num_shards=2), r"batch_size: 21 is larger than the 20 images of each of the 2 shard"),
    ]
    for kw, msg in cases:
        kw = {"batch_size": 8, **kw}
        with pytest.raises(ValueError, match=msg):
            DaliMultiView(small_root, kw.pop("batch_size"), **kw)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device: 'cuda' requested but torch.cuda.is_available\(\) is False"):
            DaliMultiView(small_root, 8, device="cuda")
    # a CPU loader ignores device_id (a CPU-only DALI pipeline has none) and takes a torch.device
    views, _ = next(iter(DaliMultiView(small_root, 8, size=16, device=torch.device("cpu"), device_id=0)))
    assert views.device.type == "cpu"


def _copy_tree_as_links(src, dst, drop_last_of=None):
    for c in SMALL_NAMES:
        (dst / c).mkdir(parents=True)
        files = sorted((src / c).iterdir())
        for f in files[:-1] if c == drop_last_of else files:
            os.symlink(f.resolve(), dst / c / f.name)
    return dst


def test_state_survives_a_moved_root_but_not_other_data(small_root, tmp_path):
    loader = DaliMultiView(small_root, 8, size=32, seed=4)
    _take(loader, 2)
    state = loader.state()
    moved = _copy_tree_as_links(small_root, tmp_path / "moved")  # the same data set under another path
    a = _take(DaliMultiView(moved, 8, size=32, seed=4, checkpoint=state), 3)
    assert _equal(a, _take(loader, 3))
    other = _copy_tree_as_links(small_root, tmp_path / "other", drop_last_of=SMALL_NAMES[0])  # one image fewer
    with pytest.raises(ValueError, match=r"checkpoint: it was saved for 41 images .* holds 40"):
        DaliMultiView(other, 8, size=32, seed=4, checkpoint=state)


@pytest.mark.parametrize("preset", ["simclr", "light", "none"])
def test_cuda_variant_graph_is_defined(preset, small_root):
    # the CUDA pipeline (mixed decoding, GPU operators) cannot run without a GPU; check at least that its
    # graph is defined and serializes with the same code path, and that it really uses the GPU operators
    from urkle_fast.data.dali import _multiview_pipeline

    pipe = _multiview_pipeline()(file_root=str(small_root), views=2, size=32, preset=preset, gpu=True, shard_id=0,
                                 num_shards=1, batch_size=4, num_threads=1, device_id=None, seed=1)
    spec = pipe.serialize()
    assert b"mixed" in spec and spec.count(b"gpu") >= 3


def test_missing_dali_raises_import_error_with_hint(monkeypatch, small_root):
    for mod in ("nvidia.dali", "nvidia.dali.plugin", "nvidia.dali.plugin.pytorch"):
        monkeypatch.setitem(sys.modules, mod, None)  # makes `import nvidia.dali` raise ImportError
    ok, why = dali_available()
    assert not ok and "pip install nvidia-dali-cuda130" in why
    with pytest.raises(ImportError, match=r"NVIDIA DALI.*pip install nvidia-dali-cuda130.*urkle_fast\[dali\]"):
        DaliMultiView(small_root, 8)


def test_a_corrupt_jpeg_is_named(small_root, tmp_path):
    """DALI's decoder error names only its operator: the loader finds the file (PIL) and names it, as a BadImageError
    (the trainer's exit 2 with the message)."""
    from urkle_fast.data.datasets import BadImageError

    root = tmp_path / "tree"
    for c in sorted(p for p in small_root.iterdir() if p.is_dir()):
        (root / c.name).mkdir(parents=True)
        for f in sorted(c.iterdir()):
            (root / c.name / f.name).write_bytes(f.read_bytes())
    victim = sorted((root / "c9").iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:300])  # a truncated JPEG
    import re

    with pytest.raises(BadImageError, match=rf"DALI could not decode an image under .*unreadable: {re.escape(str(victim))}"
                                            rf"\. Remove or replace it, or train with --loader torch --skip-bad-images"):
        for _ in DaliMultiView(str(root), 8, views=2, size=16, preset="simclr", device=torch.device("cpu"), seed=0,
                               num_threads=1):
            pass
    # a tree too large to scan: the message says how to find the file instead
    loader = DaliMultiView(str(small_root), 8, views=2, size=16, preset="simclr", device=torch.device("cpu"), seed=0,
                           num_threads=1)
    err = loader._unreadable(RuntimeError("Error in CPU operator `nvidia.dali.fn.decoders.image`"), scan_limit=10)
    assert isinstance(err, BadImageError) and "41 files, too many to scan here: train with --loader torch" in str(err)
