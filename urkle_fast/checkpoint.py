"""Atomic checkpoints and ``load_model`` (the function eval uses to rebuild any trained model).

A checkpoint is a dict with at least: config (the training config as a plain dict), model (state
dict of the uncompiled model), step, epoch, optimizer, scheduler, rng (torch / numpy / python /
cuda states) and format_version.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

FORMAT_VERSION = 1
REQUIRED_KEYS = ("config", "model", "step", "epoch")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or not an urkle_fast checkpoint."""


def unwrap(model: nn.Module) -> nn.Module:
    """The module torch.compile wrapped (so state dict keys never carry `_orig_mod.`)."""
    return getattr(model, "_orig_mod", model)


def checkpoint_bytes(state: Mapping[str, Any]) -> bytes:
    """``state`` serialised now (a snapshot: the tensors are copied, training may go on), for ``save_checkpoint``."""
    buf = io.BytesIO()
    torch.save(dict(state, format_version=FORMAT_VERSION), buf)
    return buf.getvalue()


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, os.replace, fsync of the
    directory. A crash at any moment leaves either the old file or the new one, never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - some filesystems refuse directory fsync
        pass
    return path


def claim_folder(folder: str | os.PathLike, flag: str = "--out-dir"):
    """An exclusive lock on ``<folder>/.run.lock`` for as long as the returned file stays open (the OS drops it
    when the process ends, however it ends): a second run started on the same folder while the first still
    runs (a double submit, a requeue) is refused before it reads or writes anything there. Close the file (or
    ``release_folder``) to let go."""
    import fcntl
    import socket

    path = Path(folder) / ".run.lock"
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "a running process"
        f.close()
        raise ValueError(f"{flag} {str(folder)!r} is in use by another run ({holder}): wait for it to end, or "
                         f"choose another {flag}") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


def release_folder(lock) -> None:
    if lock is not None and not lock.closed:
        lock.close()


def save_checkpoint(state: Mapping[str, Any] | bytes, path: str | os.PathLike) -> Path:
    """Write ``state`` (or its ``checkpoint_bytes``) to ``path`` atomically (``write_atomic``)."""
    return write_atomic(path, state if isinstance(state, bytes) else checkpoint_bytes(state))


def previous_path(path: str | os.PathLike) -> Path:
    """Where ``keep_previous`` puts the checkpoint a final save replaces: ``checkpoint.pt`` -> ``checkpoint.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def keep_previous(path: str | os.PathLike) -> Path | None:
    """Keep the checkpoint at ``path`` as ``previous_path(path)`` before a save whose weights have not been through a
    forward pass replaces it (the final or stop-time save; a diverging last step can leave huge but finite weights).
    A hard link under a temporary name renamed into place (a copy where the filesystem refuses links): the file at
    ``path`` stays whole throughout, and the previous one is never torn. None when there is nothing to keep."""
    path = Path(path)
    if not path.is_file():
        return None
    prev = previous_path(path)
    tmp = prev.with_name(f".{prev.name}.{os.getpid()}.tmp")
    try:
        os.link(path, tmp)
    except OSError:
        return write_atomic(prev, path.read_bytes())
    os.replace(tmp, prev)
    return prev


def _numpy_array_globals() -> list:
    """What a plain numpy array needs to unpickle (checkpoints written before RNG states were stored as
    tensors hold numpy's random state as an array); no callable that runs code."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


_NUMPY_ARRAY_GLOBALS = _numpy_array_globals()


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Read and validate a checkpoint; raise CheckpointError with the path and the reason.

    Loaded with ``weights_only=True``: tensors and plain data (dicts, lists, numbers, strings) only, so
    a file that carries pickled code (an object whose ``__reduce__`` runs a command) is refused, never
    executed. urkle_fast writes nothing else (random states are stored as tensors and tuples)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:  # a pickled reference to a Python callable or class, not corruption
            raise CheckpointError(
                f"refusing to load checkpoint {str(path)!r}: it references {found.group(1)}, which could run code when "
                f"unpickled; urkle_fast checkpoints hold only tensors and plain data. Load only files you trust, and "
                f"not with this tool") from exc
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "Unsupported" in ln or "load key" in ln), lines[0] if lines else "")
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or truncated and cannot be loaded "
                              f"({type(exc).__name__}: {detail}); use an earlier checkpoint or retrain") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, AttributeError, ImportError, IndexError,
            KeyError, TypeError) as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or truncated and cannot be loaded "
            f"({type(exc).__name__}: {exc}); use an earlier checkpoint or retrain"
        ) from exc
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{str(path)!r} is not an urkle_fast checkpoint: expected keys {list(REQUIRED_KEYS)}, got {got}"
        )
    return state


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """``path`` holds either its old text or ``text``, never a torn file (config.json, metrics.jsonl)."""
    return write_atomic(path, text.encode("utf-8"))


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files that killed writes (kill -9, power loss) left next to checkpoints; returns them."""
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def non_finite_entries(state_dict: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors of ``state_dict`` holding NaN or inf."""
    return [k for k, v in state_dict.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def load_model(path: str | os.PathLike, map_location: Any = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint was trained with and load its weights.

    Returns (model in eval mode, config dict). The model follows the protocol of urkle_fast.models:
    ``kind`` "representation" (encode / d_z / project or decode) or "supervised" (logits).
    """
    from urkle_fast.methods import get_method
    from urkle_fast.models import build_model

    state = load_checkpoint(path, map_location=map_location)
    config = dict(state["config"])
    if not config.get("family"):  # checkpoints written before configs named the model family
        try:
            config["family"] = get_method(config.get("method")).family
        except ValueError as exc:
            raise CheckpointError(f"checkpoint {str(path)!r}: {exc}") from exc
    model = build_model(config)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r}: weights do not match the model its config builds: {exc}") from exc
    if map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
        model.to(map_location)
    return model.eval(), config


class _Encoder(nn.Module):
    """pixels in [0, 1] -> (mu, logvar): the representation alone (no projector, decoder or classifier)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.normalize, self.backbone, self.head = model.normalize, model.backbone, model.head
        self.deterministic = bool(getattr(model, "deterministic", False))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.backbone(self.normalize(x)).flatten(1)
        if self.deterministic:
            mu = self.head(h)
            return mu, torch.full_like(mu, -20.0)
        return self.head(h)


def export_encoder(checkpoint: str | os.PathLike, path: str | os.PathLike, batch: int = 2) -> Path:
    """Write the trained encoder of ``checkpoint`` as a ``torch.export`` program (``.pt2``) mapping pixels in
    [0, 1], [B, C, H, W] float32, to (mu, logvar), each [B, d_z]; any batch size. Another project loads it
    with ``torch.export.load(path).module()`` and needs neither urkle_fast nor its config."""
    model, config = load_model(checkpoint)
    if model.kind != "representation":
        raise ValueError(f"{str(checkpoint)!r} holds a supervised model ({config.get('method')}); it has no encoder "
                         f"p(z|x) to export")
    enc = _Encoder(model).eval()
    size, ch = int(config["image_size"]), int(config["in_channels"])
    example = torch.rand(batch, ch, size, size)
    program = torch.export.export(enc, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))
    return path
