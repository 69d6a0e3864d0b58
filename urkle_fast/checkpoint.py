"""Atomic checkpoints and ``load_model`` (the function eval uses to rebuild any trained model).

A checkpoint is a dict with at least: config (the training config as a plain dict), model (state
dict of the uncompiled model), step, epoch, optimizer, scheduler, rng (torch / numpy / python /
cuda states) and format_version.
"""

from __future__ import annotations

import os
import pickle
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


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically: temp file in the same directory, fsync, os.replace.

    A crash at any moment leaves either the previous checkpoint or the new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(state, format_version=FORMAT_VERSION), f)
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


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Read and validate a checkpoint; raise CheckpointError with the path and the reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        # weights_only=False: the checkpoint holds python/numpy RNG states; only load files you trust
        state = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError,
            AttributeError, ImportError, IndexError, KeyError, TypeError) as exc:
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
