"""NVIDIA DALI multi-view loader for ImageFolder JPEG trees (root/<class>/<image>), for the SimCLR trainer.

``DaliMultiView(root, batch_size, views=2, size=224, preset="simclr", device="cpu")`` reads, decodes and
augments in a DALI pipeline; iterating over it yields one epoch of ``(crops, labels)``:

* ``crops``: float32 ``[V, B, 3, size, size]`` in [0, 1] (CHW) on ``device``;
* ``labels``: int64 ``[B]`` on ``device``, equal to ``torchvision.datasets.ImageFolder(root)``'s class
  indices (DALI's ``fn.readers.file`` numbers the class folders in sorted order, as ImageFolder does;
  the same file extensions as ImageFolder are read, case-insensitively).

Greyscale (mode L) JPEGs are decoded to 3 channels (``output_type=types.RGB``).

Augmentation, drawn independently per view and per sample, after the presets of
``urkle_fast.data.augment.MultiViewAugment``:

* ``"simclr"``: ``fn.random_resized_crop`` (area 0.08-1, aspect 3/4-4/3) to size x size, horizontal flip
  p=0.5 (``crop_mirror_normalize(mirror=coin_flip)``), colour jitter with p=0.8 and greyscale with p=0.2.
  The jitter is the same sequence as augment.py's: brightness b ~ U(0.6, 1.4) and contrast c ~ U(0.6, 1.4)
  around the image's mean grey level m (``b * (m + c * (x - m))``, which is augment.py's brightness
  followed by its contrast), clamped to the valid range; then ``fn.hsv`` with saturation s ~ U(0.6, 1.4)
  and hue ~ U(-36, 36) degrees (augment.py's hue 0.1 of a turn). DALI's ``fn.hsv`` is a linear map in YIQ
  space, the same space augment.py rotates the hue in, and its saturation scales the chroma around the
  luma 0.299 R + 0.587 G + 0.114 B, augment.py's grey. Greyscale (after the jitter, as in augment.py)
  replaces the image by that luma on all 3 channels. Probabilistic application uses
  ``fn.random.coin_flip`` and arithmetic (``factor = apply * f + (1 - apply)``,
  ``gray * luma + (1 - gray) * image``), no conditionals.
  Differences from augment.py: augment.py clamps between its saturation and hue steps (here the two are
  one linear map, clamped once; DALI's rounded YIQ matrices are about 1e-3 off an exact inverse), DALI's
  hue rotation has the opposite sign (the draw is symmetric, so the distribution is the same), and the
  crop is resampled with DALI's antialiased resize instead of ``grid_sample`` (bilinear, no antialias,
  reflection padding).
* ``"light"``: resize to size x size, then a translation of up to 1/8 of the side in x and y
  (``fn.warp_affine`` with a ``fn.transforms.translation`` matrix), and a horizontal flip p=0.5.
  Nearest DALI equivalent, not identical: DALI's warp replicates the border pixels where augment.py's
  ``grid_sample`` reflects the image.
* ``"none"``: resize to size x size (antialiased, like augment.py's ``F.interpolate(antialias=True)``);
  all views are identical.

Epochs, sharding, batches: the reader shuffles (``random_shuffle=True``: DALI permutes the file list once,
with a fixed seed so that all shards agree on it, then every shard reads its part through a shuffle buffer
of ``initial_fill=1024`` samples, reshuffled every epoch; datasets much larger than the buffer are
reshuffled only locally from one epoch to the next - a DALI property). ``shard_id`` / ``num_shards`` go to
the reader, so torch.distributed ranks read disjoint parts in every epoch (the parts rotate between ranks
from one epoch to the next, DALI's default). Every epoch drops its last partial batch, so
``len(loader) == (num_images // num_shards) // batch_size`` on every rank (equal on all ranks, as DDP
needs): the reader pads each shard (``pad_last_batch=True``: an epoch never borrows samples from the next
one) and this class skips the at most one batch per epoch that holds the leftover and padding samples. It
does not use ``LastBatchPolicy.DROP`` with ``reader_name="Reader"``, the iterator setting meant for this:
in DALI 2.4 it delivers a whole batch of padding in the next epoch when the shards differ in size and
``num_images // num_shards`` is a multiple of ``batch_size`` (e.g. 41 images, 2 shards, batch 4). So the
``DALIGenericIterator`` runs as an endless stream and the epochs are counted here. Each pass
``for crops, labels in loader`` is one epoch (a pass that stops early is continued by the next one); the
next pass is the next epoch, reshuffled. The pipeline seed is derived from ``(seed, shard_id)``: same
seed, same batches; shards get different augmentation draws (the shard split does not depend on the seed).

Exact resume: the pipeline is built with ``enable_checkpointing=True``. ``loader.state()`` returns a
string (JSON holding DALI's serialized checkpoint from the iterator's ``checkpoints()``, base64-encoded,
the position within the epoch, this loader's configuration and the DALI version);
``DaliMultiView(..., checkpoint=state)`` with the same configuration (else ValueError; ``num_threads`` may
differ) restores reader position, shuffle buffer and all random generators, and yields exactly the batches
the original loader would have yielded next (same images, same augmentation). A loader restored in the middle
of an epoch first finishes that epoch (fewer than ``len(loader)`` batches), then continues with full
epochs. ``state()`` refers to the batches consumed so far, not to the ones DALI has prefetched.

What has run where: everything above has been run and tested on the CPU only (DALI 2.4.0,
``device_id=None``, ``fn.decoders.image(device="cpu")`` and CPU operators). The CUDA variant is the same
pipeline definition with ``device="mixed"`` decoding and ``device="gpu"`` operators (the random draws stay
CPU argument inputs; DALI moves the CPU scalars of the arithmetic to the GPU); here its graph has only
been defined and serialized, never built or run (no GPU with DALI in this workplace), so treat it as
untested until it has run on a GPU.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator, Optional, Tuple, Union

import numpy as np
import torch

PRESETS = ("simclr", "light", "none")
# torchvision.datasets.folder.IMG_EXTENSIONS, so that the file list (and the class set) is ImageFolder's
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_STATE_FORMAT = "urkle_fast.data.dali/1"
_INSTALL_HINT = "pip install nvidia-dali-cuda130 (or this package's extra: pip install 'urkle_fast[dali]')"

# augmentation constants of the "simclr" preset (urkle_fast/data/augment.py: MultiViewAugment defaults)
_AREA = (0.08, 1.0)
_RATIO = (3 / 4, 4 / 3)
_JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue (fraction of a turn)
_JITTER_P = 0.8
_GRAY_P = 0.2
_FLIP_P = 0.5
_SHIFT = 1 / 8  # "light": translation up to 1/8 of the side


def dali_available() -> Tuple[bool, str]:
    """(True, "") when NVIDIA DALI and its PyTorch plugin import; else (False, why not, with the install hint)."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception as e:  # ImportError, or a broken install failing while loading its libraries
        return False, f"NVIDIA DALI is not usable ({type(e).__name__}: {e}); install it with {_INSTALL_HINT}"
    return True, ""


def _require_dali():
    try:
        import nvidia.dali as dali
        from nvidia.dali.plugin import pytorch as dali_torch
    except Exception as e:
        raise ImportError(f"DaliMultiView needs NVIDIA DALI, which could not be imported "
                          f"({type(e).__name__}: {e}); install it with {_INSTALL_HINT}") from e
    return dali, dali_torch


@functools.lru_cache(maxsize=None)
def _multiview_pipeline():
    """The pipeline definition (built lazily so that this module imports without DALI)."""
    dali, _ = _require_dali()
    from nvidia.dali import fn, types
    import nvidia.dali.math as dmath

    @dali.pipeline_def(enable_checkpointing=True)
    def multiview_pipeline(file_root, views, size, preset, gpu, shard_id, num_shards):
        # the device switch: the only difference between the CPU and the CUDA pipelines
        decode_dev, op_dev = ("mixed", "gpu") if gpu else ("cpu", "cpu")
        jpegs, labels = fn.readers.file(
            file_root=file_root, file_filters=["*" + e for e in IMG_EXTENSIONS], case_sensitive_filter=False,
            random_shuffle=True, shard_id=shard_id, num_shards=num_shards, pad_last_batch=True, name="Reader")
        images = fn.decoders.image(jpegs, device=decode_dev, output_type=types.RGB)  # mode L -> 3 channels
        if preset != "simclr":  # "light" and "none" start from the whole image resized to size x size
            images = fn.resize(images, device=op_dev, size=[float(size), float(size)])

        def to_chw01(x, mirror=None):
            kw = {} if mirror is None else {"mirror": mirror}
            return fn.crop_mirror_normalize(x, device=op_dev, dtype=types.FLOAT, output_layout="CHW",
                                            mean=[0.0, 0.0, 0.0], std=[255.0, 255.0, 255.0], **kw)

        outs = []
        for _ in range(views):  # every fn.random.* / random op instance below has its own seed: views differ
            if preset == "none":
                outs.append(to_chw01(images))
                continue
            flip = fn.random.coin_flip(probability=_FLIP_P)
            if preset == "light":
                shift = fn.random.uniform(range=[-_SHIFT * size, _SHIFT * size], shape=[2])
                x = fn.warp_affine(images, device=op_dev, matrix=fn.transforms.translation(offset=shift),
                                   size=[float(size), float(size)])
                outs.append(to_chw01(x, flip))
                continue
            # "simclr"
            x = fn.random_resized_crop(images, device=op_dev, size=[size, size], random_area=list(_AREA),
                                       random_aspect_ratio=list(_RATIO))
            bri, con, sat, hue = _JITTER
            apply = fn.cast(fn.random.coin_flip(probability=_JITTER_P), dtype=types.FLOAT)
            gray = fn.cast(fn.random.coin_flip(probability=_GRAY_P), dtype=types.FLOAT)
            b = apply * fn.random.uniform(range=[1 - bri, 1 + bri]) + (1.0 - apply)
            c = apply * fn.random.uniform(range=[1 - con, 1 + con]) + (1.0 - apply)
            s = apply * fn.random.uniform(range=[1 - sat, 1 + sat]) + (1.0 - apply)
            h = apply * fn.random.uniform(range=[-360.0 * hue, 360.0 * hue])
            rgb_mean = fn.reductions.mean(x, device=op_dev, axis_names="HW", dtype=types.FLOAT)
            m = 0.299 * rgb_mean[0] + 0.587 * rgb_mean[1] + 0.114 * rgb_mean[2]  # mean grey level
            y = dmath.clamp(b * (m + c * (fn.cast(x, device=op_dev, dtype=types.FLOAT) - m)), 0.0, 255.0)
            y = dmath.clamp(fn.hsv(y, device=op_dev, hue=h, saturation=s, dtype=types.FLOAT), 0.0, 255.0)
            # greyscale: the luma, broadcast over the 3 channels (gray * l + (1 - gray) * y is exactly l when
            # gray == 1, so the channels come out bitwise equal)
            luma = 0.299 * y[:, :, 0:1] + 0.587 * y[:, :, 1:2] + 0.114 * y[:, :, 2:3]
            outs.append(to_chw01(gray * luma + (1.0 - gray) * y, flip))
        return (*outs, labels)

    return multiview_pipeline


def _parse_device(device, device_id) -> Tuple[torch.device, Optional[int]]:
    """-> (torch device, DALI device_id): None for CPU-only pipelines."""
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str):
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N' (or a torch.device), got {device!r}")
    else:
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N' (or a torch.device), "
                         f"got {device!r} of type {type(device).__name__}")
    if dev.type == "cpu":
        return torch.device("cpu"), None  # device_id is ignored: a CPU-only DALI pipeline has none
    if dev.type != "cuda":
        raise ValueError(f"device: expected 'cpu' or 'cuda[:N]', got {str(dev)!r} (DALI runs on the CPU or on "
                         f"CUDA GPUs only)")
    if not torch.cuda.is_available():
        raise ValueError(f"device: {str(dev)!r} requested but torch.cuda.is_available() is False; "
                         f"use device='cpu'")
    if dev.index is not None and device_id is not None and dev.index != device_id:
        raise ValueError(f"device_id: {device_id} contradicts device={str(dev)!r}; give one of them")
    idx = dev.index if dev.index is not None else device_id
    if idx is None:
        idx = torch.cuda.current_device()
    n = torch.cuda.device_count()
    if not (isinstance(idx, int) and 0 <= idx < n):
        raise ValueError(f"device_id: expected an int in [0, {n}) (the visible CUDA devices), got {idx!r}")
    return torch.device("cuda", idx), idx


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return int(value)


def _scan_root(root) -> Tuple[Path, list, int]:
    """Checks root/<class>/<image> as ImageFolder does; returns (resolved root, sorted class names, #images).

    DALI's file reader lists only the files directly inside each class folder while ImageFolder also
    descends into sub-folders: a tree with images in nested folders is refused rather than read differently.
    """
    if not isinstance(root, (str, os.PathLike)):
        raise ValueError(f"root: expected a path to an ImageFolder directory, got {type(root).__name__}")
    path = Path(root).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"root: {str(path)!r} does not exist (expected an ImageFolder directory "
                                f"root/<class>/<image>)")
    if not path.is_dir():
        raise FileNotFoundError(f"root: {str(path)!r} is not a directory (expected an ImageFolder directory "
                                f"root/<class>/<image>)")
    with os.scandir(path) as entries:
        classes = sorted(e.name for e in entries if e.is_dir())
    if not classes:
        raise FileNotFoundError(f"root: {str(path)!r} has no class folders (expected root/<class>/<image>, "
                                f"e.g. .../train with one folder per class)")
    total, empty = 0, []
    for c in classes:
        n, subdirs = 0, []
        with os.scandir(path / c) as entries:
            for e in entries:
                if e.is_dir():
                    subdirs.append(e.path)
                elif e.name.lower().endswith(IMG_EXTENSIONS):
                    n += 1
        for sub in subdirs:
            for _, _, files in os.walk(sub, followlinks=True):
                if any(f.lower().endswith(IMG_EXTENSIONS) for f in files):
                    raise ValueError(f"root: {sub!r} is a folder of images inside class folder {c!r}; DALI's file "
                                     f"reader reads only the files directly in root/<class>/ (ImageFolder would "
                                     f"also read these): flatten the class folders")
        total += n
        if n == 0:
            empty.append(c)
    if empty:
        shown = ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else "")
        raise FileNotFoundError(f"root: class folder(s) {shown} of {str(path)!r} hold no images "
                                f"(expected files ending in {', '.join(IMG_EXTENSIONS)})")
    return path.resolve(), classes, total


SCAN_LIMIT = 50_000  # files decoded with PIL to name an image DALI could not decode (Tiny ImageNet: 100 k takes ~1 min)


class DaliMultiView:
    """DALI multi-view loader: ``for crops, labels in loader`` is one epoch of full batches.

    crops: float32 [V, B, 3, size, size] in [0, 1] on ``device`` (V = ``views``); labels: int64 [B] (ImageFolder indices).
    ``batch_size`` is per shard; ``len(loader)`` is the number of full batches per epoch on this shard.
    ``state()`` returns a string from which ``DaliMultiView(..., checkpoint=state)`` or ``load_state(state)``
    resumes exactly (the trainer's loader interface, urkle_fast.data.loader).
    """

    def __init__(self, root, batch_size: int, *, views: int = 2, size: int = 224, preset: str = "simclr",
                 device: Union[str, torch.device] = "cpu", device_id: Optional[int] = None, shard_id: int = 0,
                 num_shards: int = 1, seed: int = 0, num_threads: int = 2, checkpoint: Optional[str] = None):
        self._init_args = dict(root=root, batch_size=batch_size, views=views, size=size, preset=preset, device=device,
                               device_id=device_id, shard_id=shard_id, num_shards=num_shards, seed=seed,
                               num_threads=num_threads)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.views = _check_int("views", views, 1)
        self.size = _check_int("size", size, 1)
        if preset not in PRESETS:
            raise ValueError(f"preset: expected one of {PRESETS}, got {preset!r}")
        self.preset = preset
        self.num_shards = _check_int("num_shards", num_shards, 1)
        if isinstance(shard_id, bool) or not isinstance(shard_id, (int, np.integer)) \
                or not 0 <= shard_id < self.num_shards:
            raise ValueError(f"shard_id: expected an int in [0, num_shards={self.num_shards}), got {shard_id!r}")
        self.shard_id = int(shard_id)
        self.seed = _check_int("seed", seed, 0)
        self.num_threads = _check_int("num_threads", num_threads, 1)
        self.device, dali_device_id = _parse_device(device, device_id)
        self.root, self.classes, n_files = _scan_root(root)
        _, dali_torch = _require_dali()

        dali_checkpoint, saved = None, None
        if checkpoint is not None:
            dali_checkpoint, saved = self._parse_state(checkpoint)
        # one pipeline seed per (seed, shard): shards draw different augmentations; the reader's shard
        # split does not depend on the seed (DALI shuffles the file list with a fixed seed)
        pipe_seed = int(np.random.SeedSequence([self.seed, self.shard_id]).generate_state(1)[0] & 0x7FFFFFFF)
        self._pipe = _multiview_pipeline()(
            file_root=str(self.root), views=self.views, size=self.size, preset=self.preset,
            gpu=self.device.type == "cuda", shard_id=self.shard_id, num_shards=self.num_shards,
            batch_size=self.batch_size, num_threads=self.num_threads, device_id=dali_device_id, seed=pipe_seed,
            checkpoint=dali_checkpoint)
        self._pipe.build()
        self.num_images = int(self._pipe.reader_meta("Reader")["epoch_size"])
        if self.num_images != n_files:  # would mean DALI's file list is not ImageFolder's
            raise ValueError(f"root: DALI's file reader found {self.num_images} images under {str(self.root)!r}, "
                             f"the ImageFolder rules {n_files}; refusing labels that may not match ImageFolder's")
        if saved is not None and saved.get("num_images") != self.num_images:
            raise ValueError(f"checkpoint: it was saved for {saved.get('num_images')} images (under "
                             f"{saved.get('root')!r}), {str(self.root)!r} holds {self.num_images}; cannot resume "
                             f"exactly")
        per_shard = self.num_images // self.num_shards  # the smallest shard
        if per_shard < self.batch_size:
            raise ValueError(f"batch_size: {self.batch_size} is larger than the {per_shard} images of each of the "
                             f"{self.num_shards} shard(s) of {str(self.root)!r}: no full batch per epoch")
        # Epoch accounting. With pad_last_batch=True every shard's reader emits, per epoch, its part of the
        # data padded to ceil(num_images / num_shards) samples and then to whole batches (by repeating its last
        # sample): `_reader_batches` batches, after which it moves to the next epoch. The first `_len` of them
        # hold distinct images (and are disjoint across shards); the rest (at most one batch) carry the images
        # left over and the padding, and are skipped, so that every rank yields the same number of full
        # batches. This is what LastBatchPolicy.DROP with reader_name="Reader" is meant to do, but DALI 2.4's
        # iterator gets it wrong when the shards differ in size and (num_images // num_shards) is a multiple
        # of batch_size: it leaves the padding batch in the stream and delivers it in the next epoch. So the
        # DALI iterator runs here as an endless stream (no reader_name, size=-1) and epochs are counted here.
        padded = int(self._pipe.reader_meta("Reader")["epoch_size_padded"]) // self.num_shards
        self._reader_batches = -(-padded // self.batch_size)
        self._len = per_shard // self.batch_size
        self._pos = 0  # batches of the current epoch taken from the stream
        if saved is not None:
            pos = saved.get("position")
            if not (isinstance(pos, int) and 0 <= pos <= self._len):
                raise ValueError(f"checkpoint: position {pos!r} is not in [0, {self._len}]")
            self._pos = pos
        self._outputs = [f"view{i}" for i in range(self.views)] + ["label"]
        with self._naming_unreadable_files():  # the iterator decodes its first batches now
            self._it = dali_torch.DALIGenericIterator([self._pipe], self._outputs, size=-1, auto_reset=False)

    # -- iteration -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Full batches per epoch on this shard: (num_images // num_shards) // batch_size, on every shard."""
        return self._len

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """One epoch; or the rest of the current one if a previous pass stopped early or the loader was restored."""
        if self._pos >= self._len:  # the previous epoch was fully delivered: skip its tail, start the next one
            for _ in range(self._reader_batches - self._pos):
                next(self._it)
            self._pos = 0
        while self._pos < self._len:
            with self._naming_unreadable_files():
                out = next(self._it)[0]
            self._pos += 1
            crops = torch.stack([out[k] for k in self._outputs[:-1]])
            labels = out["label"].reshape(-1).to(device=self.device, dtype=torch.int64, non_blocking=True)
            yield crops, labels

    @contextlib.contextmanager
    def _naming_unreadable_files(self) -> Iterator[None]:
        try:
            yield
        except RuntimeError as exc:  # DALI names its operator, not the file
            if "decoders.image" not in str(exc):
                raise
            raise self._unreadable(exc) from None

    def _unreadable(self, exc: RuntimeError, scan_limit: int = SCAN_LIMIT):
        """The BadImageError of a failed DALI decode, naming the file(s): DALI's error names only its operator, so
        the tree is decoded again with PIL to find them (trees up to ``scan_limit`` files; ImageNet's 1.28 M would
        take hours, so there the message says how to find it instead)."""
        from PIL import Image

        from .datasets import BadImageError

        why = next((ln.strip() for ln in reversed(str(exc).splitlines()) if "failure" in ln or "rror" in ln), "")
        files = sorted(p for c in self.classes for p in (self.root / c).iterdir()
                       if p.name.lower().endswith(IMG_EXTENSIONS))
        if len(files) > scan_limit:
            return BadImageError(f"DALI could not decode an image under {str(self.root)!r} ({why}); the tree has "
                                 f"{len(files)} files, too many to scan here: train with --loader torch, which names "
                                 f"the file (and --skip-bad-images trains past it)")
        bad = []
        for path in files:
            try:
                with Image.open(path) as im:
                    im.load()
            except Exception:  # noqa: BLE001 - any decoding failure is what we are looking for
                bad.append(str(path))
        named = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "") if bad else \
            "none that PIL cannot read either"
        return BadImageError(f"DALI could not decode an image under {str(self.root)!r} ({why}); unreadable: {named}. "
                             f"Remove or replace it, or train with --loader torch --skip-bad-images")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    # -- exact resume -------------------------------------------------------------------------------------
    def _config(self) -> dict:
        # the data set is identified by its class list and (checked after the build) its image count, not by
        # its path: a resumed job may find the same tree mounted elsewhere
        classes = hashlib.sha1("\n".join(self.classes).encode("utf-8")).hexdigest()
        return {"classes_sha1": classes, "batch_size": self.batch_size, "views": self.views, "size": self.size,
                "preset": self.preset, "device": self.device.type, "shard_id": self.shard_id,
                "num_shards": self.num_shards, "seed": self.seed}

    def state(self) -> str:
        """The loader's state after the batches consumed so far, as a string for ``checkpoint=``."""
        from nvidia.dali import __version__ as dali_version

        cpt = self._it.checkpoints()[0]
        raw = cpt.encode("utf-8") if isinstance(cpt, str) else bytes(cpt)
        return json.dumps({"format": _STATE_FORMAT, "dali_version": dali_version, "config": self._config(),
                           "root": str(self.root), "num_images": self.num_images, "position": self._pos,
                           "dali_checkpoint": base64.b64encode(raw).decode("ascii")},
                          sort_keys=True)

    def load_state(self, state: str) -> None:
        """Continue exactly after the batches ``state`` (from ``state()``) had consumed: DALI restores a
        pipeline only when it is built, so the pipeline is built again from that checkpoint."""
        self.__init__(**self._init_args, checkpoint=state)

    def _parse_state(self, checkpoint) -> Tuple[bytes, dict]:
        from nvidia.dali import __version__ as dali_version

        if isinstance(checkpoint, (bytes, bytearray)):
            checkpoint = bytes(checkpoint).decode("utf-8", errors="replace")
        if not isinstance(checkpoint, str):
            raise ValueError(f"checkpoint: expected the string returned by DaliMultiView.state(), "
                             f"got {type(checkpoint).__name__}")
        try:
            saved = json.loads(checkpoint)
            if not isinstance(saved, dict) or saved.get("format") != _STATE_FORMAT \
                    or not isinstance(saved.get("config"), dict):
                raise ValueError
            raw = base64.b64decode(saved["dali_checkpoint"], validate=True)
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"checkpoint: expected the string returned by DaliMultiView.state() "
                             f"(format {_STATE_FORMAT}), got {checkpoint[:60]!r}...")
        if saved.get("dali_version") != dali_version:
            raise ValueError(f"checkpoint: saved with DALI {saved.get('dali_version')}, this is DALI {dali_version}; "
                             f"DALI checkpoints are only valid within one DALI version")
        mine = self._config()
        diff = {k: (saved["config"].get(k), v) for k, v in mine.items() if saved["config"].get(k) != v}
        if diff:
            shown = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"checkpoint: saved for a different loader configuration ({shown}); exact resume needs "
                             f"the same classes (root), batch_size, views, size, preset, device type, shard and "
                             f"seed")
        return raw, saved

    def __repr__(self) -> str:
        return (f"DaliMultiView(root={str(self.root)!r}, batch_size={self.batch_size}, views={self.views}, "
                f"size={self.size}, preset={self.preset!r}, device={str(self.device)!r}, "
                f"shard={self.shard_id}/{self.num_shards}, seed={self.seed}, images={self.num_images}, "
                f"batches_per_epoch={len(self)})")
