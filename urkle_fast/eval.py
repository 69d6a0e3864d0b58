"""``python -m urkle_fast.eval``: robust accuracy of frozen representations (docs/PROTOCOL.md sec. 7).

For every checkpoint: train the downstream head on the frozen representation (one z per input,
no adversarial training; supervised baselines are used as they are), then measure accuracy on
clean test images and under white-box l_inf PGD (random start, EOT over the z samples), APGD-CE and
(optionally) Square, for the S-sample averaged prediction (paper Eq. 1) and the z = mu path, for each
label budget; "worst" is the per-image worst case over every attack that ran. Writes table.md,
results.json, accuracy_vs_eps_<model>.png, accuracy_vs_eps.png and, for representation models,
zspace_<model>.png (paper Figure 2) to --out.

An interrupted evaluation continues where it stopped: the same command on the same --out reuses every attack
that finished (<out>/progress, ``_Progress``) and the heads it trained (<out>/heads), and gives the same numbers
as a run that was never interrupted.

    python -m urkle_fast.eval --checkpoint runs/urkle.pt --checkpoint runs/standard.pt \\
        --dataset mnist --eps 0.1 --label-budgets all 5000 1000 --n-test 1000 --out runs/eval

The flags are the fields of ``EvalConfig``; ``evaluate_checkpoints(paths, EvalConfig(...))`` is the same
from Python.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from . import distributed as udist
from .attack import frozen
from .checkpoint import CheckpointError, load_model
from .cli import config_from, flag as _flag, opt, parser_for
from .data import INFO, to_float01
from .defaults import DATASETS, defaults_for, help_for
from .checkpoint import write_atomic
from .evaluation.attacks import attack_scores, wilson_interval
from .evaluation.bound import proposition1_per_image, summarize_bound
from .data.datasets import subset_order
from .evaluation.datasets import Split, load_split
from .evaluation.probe import (ProbabilisticClassifier, balanced_subset, encode_dataset, make_head, parse_budget,
                               train_head)
from .evaluation.report import markdown_table, write_outputs
from .evaluation.tasks import get_task, primary_task


@dataclass
class EvalConfig:
    checkpoint: list[str] = opt(help="checkpoint file (repeat for several models)", factory=list, action="append",
                                required=True)
    name: list[str] = opt(help="row name per --checkpoint, in order (default: the method)", factory=list,
                          action="append")
    dataset: Optional[str] = opt(None, "default: the first checkpoint's", choices=list(DATASETS))
    data_root: Optional[str] = opt(None, "default: the checkpoint's data_root, else ../shared/data")
    eps: Optional[list[float]] = opt(None, "test epsilons in [0, 1] pixels; None: " + help_for("test_eps"))
    out: Optional[str] = opt("runs/eval", "output folder (None from Python: write nothing); it belongs to one "
                             "evaluation: the same command continues it, another is refused (see --overwrite)")
    overwrite: bool = opt(False, "let this evaluation replace another one's results in --out")
    label_budgets: list[str] = opt(help="'all' and/or label counts, e.g. all 5000 1000", factory=lambda: ["all"])
    samples: int = opt(10, "S, z samples averaged per prediction (paper Eq. 1)")
    attack_steps: int = opt(20, "PGD steps (the paper's attack)")
    alpha: Optional[float] = opt(None, "PGD step; None: eps / 10")
    eot_iter: int = opt(20, "forwards averaged per gradient step on the S-sample prediction (EOT; AutoAttack's rand "
                        "version: 20); the z = mu path and classifiers are deterministic and use 1")
    apgd_steps: int = opt(100, "APGD iterations (APGD-CE, APGD-DLR, APGD-T per target); 0 disables all three")
    apgd_targets: int = opt(9, "APGD-T target classes (AutoAttack: 9); 0 disables APGD-T")
    square_queries: int = opt(5000, "Square Attack (gradient-free) queries per image (AutoAttack: 5000); 0 disables")
    transfer: bool = opt(True, "score every adversary of the z = mu path on the S-sample prediction too")
    redraws: int = opt(5, "fresh predictions that score an adversary of the S-sample prediction: a fool counts "
                       "when most of them are wrong")
    pgd_restarts: int = opt(1, "PGD runs from different random starts; an image must survive all")
    cascade: bool = opt(False, "AutoAttack's standard run: each attack only on the images every earlier attack of the "
                        "path left correct (the z = mu path also on those its S-sample prediction still gets right): "
                        "the same per-image worst case at a fraction of the cost; the per-attack columns become the "
                        "accuracy left after that attack, and the transfer column is not reported")
    tasks: Optional[list[str]] = opt(None, "downstream tasks, a head each on the same frozen representation: digit, "
                                     "parity, gt4 (digits, mnist); class, animal_vehicle (cifar10); class (any); "
                                     "None: the dataset's classes")
    heads: Optional[str] = opt(None, "folder of saved heads (an earlier run's <out>/heads): reuse those that match "
                               "instead of training them")
    n_test: Optional[int] = opt(None, "class-balanced seeded test subset; None: the whole test set")
    holdout: Optional[int] = opt(None, "test on the last N images of the TRAINING split instead of the test split (the "
                                 "heads train on the images before them), to choose hyper-parameters without the test "
                                 "set; every model must have been trained with --train-subset <= train size - N")
    sweep_eps: Optional[list[float]] = opt(None, "epsilons of the accuracy-vs-eps plot; None: per dataset "
                                           "(urkle_fast.defaults)")
    sweep_n_test: Optional[int] = opt(500, "test images in the sweep")
    head: Optional[str] = opt(None, "downstream head; None: " + help_for("head"), choices=["linear", "mlp3"])
    head_epochs: Optional[int] = opt(None, "None: " + help_for("head_epochs"))
    head_lr: float = opt(1e-3, "Adam lr of the head")
    bounded_M: Optional[float] = opt(None, "bounded softmax of paper footnote 1 (-log p <= M) in every prediction")
    bound: Optional[float] = opt(None, "Proposition 1 at this M: clean term, max KL, right- and left-hand sides and "
                                 "the per-example check, per model, task, budget and eps (Gaussian encoders)")
    bound_samples: int = opt(64, "z samples per image in the Proposition 1 estimates (>= 32)")
    head_loss: str = opt("ce", "train heads on the cross-entropy, or on the bounded loss of --bound M",
                         choices=["ce", "bounded"])
    batch_size: int = opt(256, "attack batch")
    seed: int = opt(0, "seed of the label subsets, heads, random starts and z samples")
    device: Optional[str] = opt(None, "default: cuda when available, else cpu")
    num_workers: int = opt(2, "DataLoader workers decoding ImageFolder train splits for the features")
    plots: bool = opt(True, "accuracy-vs-eps and z-space PNGs")
    fig2_images: int = opt(4, "test images in the z-space figure (paper Figure 2); 0: none")
    verbose: bool = opt(True, cli=False)


def load_eval_model(path: str, map_location: str = "cpu") -> tuple[nn.Module, dict]:
    """(model, config) of a checkpoint for evaluation (``urkle_fast.checkpoint.load_model``):
    FileNotFoundError for a missing file, CheckpointError for anything that is not a trained model."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path!r}")
    try:
        model, config = load_model(path, map_location=map_location)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"cannot rebuild the model of checkpoint {path!r} ({type(exc).__name__}: {exc})") from exc
    if getattr(model, "kind", None) not in ("representation", "supervised"):
        raise CheckpointError(f"checkpoint {path!r}: model.kind is {getattr(model, 'kind', None)!r}, "
                              "expected 'representation' or 'supervised'")
    return model, dict(config or {})


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


@dataclass
class _Job:
    """An evaluation with every default resolved and its data loaded (what the helpers below share)."""

    cfg: EvalConfig  # eps, head, head_epochs, sweep_eps filled in
    device: torch.device
    rank: int
    world: int
    train: Split
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_sw: torch.Tensor
    y_sw: torch.Tensor
    d_z: Optional[int] = None  # the representation being evaluated (heads of ranks > 0 are built to this width)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def out(self) -> Optional[str]:  # rank 0 writes
        return self.cfg.out if self.main else None


class _Progress:
    """The finished attacks of one (model, task, label budget) in <out>/progress/<name>__<task>__<budget>.pt, so
    that an interrupted evaluation, run again on the same --out, resumes after its last finished attack instead
    of from the start (on the CPU one budget's attacks take up to an hour). Each attack's per-image scores are
    saved (rank 0, atomically) as it ends. A rerun reuses them only under the same key: the model's and the
    head's weights, the test images, the eps and every setting that changes a score; another key starts afresh.
    Every attack reseeds its own random streams and the cascade's survivors follow from the scores, so the replay
    gives the numbers of an uninterrupted run exactly."""

    def __init__(self, job: "_Job", name: str, task: str, budget, **key):
        c = job.cfg
        key.update(settings={k: v for k, v in _settings(job).items() if k != "tasks"}, eps=list(c.eps),
                   batch_size=c.batch_size, task=task, budget=str(budget), code=_attack_code())
        self.key = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.path = os.path.join(c.out, "progress", f"{_slug(name)}__{task}__{budget}.pt") if c.out else None
        self.main = job.main
        units = None
        if job.main and self.path and os.path.isfile(self.path):
            try:
                saved = torch.load(self.path, map_location="cpu", weights_only=True)
                units = saved["units"] if saved.get("key") == self.key else None
                why = "another evaluation's progress (other weights, head, test images, settings or attack code)"
            except Exception as exc:  # a damaged file costs its attacks, never the evaluation (nor a hung rank)
                units, why = None, f"unreadable ({type(exc).__name__})"
            if units is None:
                warnings.warn(f"{self.path}: {why}; these attacks start afresh", stacklevel=2)
        if job.world > 1:  # every rank replays what rank 0 found
            units = udist.gather_objects(units)[0]
        self.units: dict[str, Any] = units or {}
        if self.units and c.verbose and job.main:
            print(f"[eval] {name} {task} {budget}: resuming, {len(self.units)} finished attack(s) reused from "
                  f"{self.path}", flush=True)

    def get(self, unit: str):
        return self.units.get(unit)

    def put(self, unit: str, value) -> None:
        self.units[unit] = value
        if self.main and self.path:
            buf = io.BytesIO()
            torch.save(dict(key=self.key, units=self.units), buf)
            write_atomic(self.path, buf.getvalue())


def _attack_code() -> str:
    """sha256 of the source a saved score depends on: the attacks, the PGD engine and step, the prediction (probe,
    the encoders' and heads' forward, the pixel scaling) and this module's scoring and cascade. Scores saved
    before a change there are not replayed."""
    import inspect

    from . import attack as pgd_engine
    from .data import to_float01
    from .evaluation import attacks, probe
    from .models import backbones, heads
    from .ops import pgd as pgd_op

    h = hashlib.sha256()
    for mod in (attacks, probe, pgd_engine, pgd_op, backbones, heads):
        with open(mod.__file__, "rb") as f:
            h.update(f.read())
    for fn in (to_float01, _scores, _live_scores, _ensemble, _attack_paths, _one_attack):
        h.update(inspect.getsource(fn).encode())
    return h.hexdigest()[:16]


# how an evaluation runs and where it writes, never what it measures: a rerun may change them and still continue
RUNTIME_FIELDS = ("out", "overwrite", "verbose", "num_workers", "device", "plots", "fig2_images", "heads",
                  "checkpoint", "name")


def _identity(models: dict, cfg: EvalConfig) -> dict:
    """What <out>/evaluation.json records: the models' weights and every setting that changes a number."""
    return json.loads(json.dumps(dict({k: v for k, v in asdict(cfg).items() if k not in RUNTIME_FIELDS},
                                      models={n: fingerprint(m) for n, (m, _) in models.items()})))


def _out_conflict(ident: dict, cfg: EvalConfig) -> Optional[str]:
    """Why --out cannot take this evaluation (None when it can): it holds another one, or results that kept no
    record. A setting the record does not know (added to eval since) counts as the same when at its default."""
    path = os.path.join(cfg.out, "evaluation.json")
    if cfg.overwrite:
        return None
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        defaults = json.loads(json.dumps(asdict(EvalConfig(checkpoint=[]))))
        differ = sorted(k for k in set(old) | set(ident) if old.get(k) != ident.get(k)
                        and not (k not in old and k in defaults and ident.get(k) == defaults[k]))
        if differ:
            what = ", ".join("the models (names, weights or configuration: pixel scaling, sigma_min, modules' "
                             "settings; evaluations begun before 5bb0e69 fingerprinted weights only)"
                             if k == "models" else _flag(k) for k in differ)
            return f"--out {cfg.out!r} holds another evaluation (it differs in {what}): choose another --out, or " \
                   f"give --overwrite to replace it"
    elif os.path.isfile(os.path.join(cfg.out, "results.json")):
        return f"--out {cfg.out!r} holds an earlier evaluation's results.json, which kept no record of its settings: " \
               f"choose another --out, or give --overwrite to replace it"
    return None


def _check_out(models: dict, cfg: EvalConfig) -> Optional[dict]:
    """--out holds one evaluation (``_identity``): the same evaluation again continues it (``_Progress``);
    another is refused before any work, naming what differs, unless --overwrite. Rank 0 decides and every rank
    raises the same error (a rank that raised alone would leave the others waiting). Returns the record to
    write once the evaluation has started (``_record_out``)."""
    if cfg.out is None:
        return None
    ident = _identity(models, cfg)
    err = _out_conflict(ident, cfg) if udist.rank() == 0 else None
    if udist.is_distributed():
        err = udist.gather_objects(err)[0]
    if err:
        raise ValueError(err)
    return ident


def _record_out(ident: Optional[dict], job: "_Job") -> None:
    """Claim --out for this evaluation once its data and settings proved valid (a command that fails before that
    leaves the folder as it was). --overwrite first removes the other evaluation's results, so that a run that
    dies early never leaves them beside this one's record."""
    if ident is None or not job.out:
        return
    if job.cfg.overwrite:
        for name in ("results.json", "table.md"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(job.out, name))
    write_atomic(os.path.join(job.out, "evaluation.json"), (json.dumps(ident, indent=1) + "\n").encode())


def validate(cfg: EvalConfig) -> None:
    """Every setting's range and the output folder, before any work; the message names the flag."""
    defaults_for(cfg.dataset)
    for e in cfg.eps or ():
        if not (isinstance(e, (int, float)) and math.isfinite(e) and 0 < e <= 1):
            raise ValueError(f"--eps must be in (0, 1] (pixels in [0, 1]), got {e!r}")
    for e in cfg.sweep_eps or ():
        if not (isinstance(e, (int, float)) and math.isfinite(e) and 0 <= e <= 1):
            raise ValueError(f"--sweep-eps must be in [0, 1], got {e!r}")
    for name in ("samples", "pgd_restarts", "eot_iter", "redraws", "batch_size", "n_test", "sweep_n_test",
                 "head_epochs", "holdout"):
        v = getattr(cfg, name)
        if v is not None and not (isinstance(v, int) and v >= 1):
            raise ValueError(f"{_flag(name)} must be an integer >= 1, got {v!r}")
    if cfg.redraws % 2 == 0:  # a fool counts when most fresh predictions are wrong: an even count could tie
        raise ValueError(f"--redraws must be odd, got {cfg.redraws}")
    for name in ("attack_steps", "apgd_steps", "apgd_targets", "square_queries", "fig2_images", "num_workers"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{_flag(name)} must be >= 0, got {getattr(cfg, name)!r}")
    if cfg.head_loss == "bounded" and cfg.bound is None:
        raise ValueError("--head-loss bounded trains heads on the bounded loss of --bound M: give --bound too")
    if cfg.bound_samples < 32:
        raise ValueError(f"--bound-samples must be >= 32, got {cfg.bound_samples!r}")
    for name in ("head_lr", "alpha", "bounded_M", "bound"):
        v = getattr(cfg, name)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError(f"{_flag(name)} must be a positive number, got {v!r}")
    for b in cfg.label_budgets:
        try:
            parse_budget(b)
        except ValueError as exc:
            raise ValueError(f"--label-budgets: {exc}") from None
    udist.check_device_flags(cfg.device or "auto")
    for t in cfg.tasks or ():
        get_task(cfg.dataset, t, 10)
    if cfg.heads is not None and not os.path.isdir(cfg.heads):
        raise ValueError(f"--heads {cfg.heads!r} is not a folder (an earlier evaluation's <out>/heads)")
    if cfg.out is not None:
        if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
            raise ValueError(f"--out {cfg.out!r} is a file; the evaluation writes a folder (table.md, results.json, "
                             f"PNGs): choose another --out")
        try:
            os.makedirs(cfg.out, exist_ok=True)
            with tempfile.TemporaryFile(dir=cfg.out):
                pass
        except OSError as exc:
            raise ValueError(f"--out {cfg.out!r} is not a writable folder ({exc})") from None


def check_models_match(models: dict, dataset: str) -> None:
    """A model trained on another dataset, channel count or (in-memory datasets) image size is refused."""
    info = INFO[dataset]
    for name, (_, config) in models.items():
        trained = config.get("dataset")
        if trained and trained != dataset and not {trained, dataset} <= {"folder", "imagenet"}:
            raise ValueError(f"{name}: the checkpoint was trained on {trained!r}, not --dataset {dataset!r}")
        ch, size = config.get("in_channels"), config.get("image_size")
        if ch is not None and ch != info.in_channels:
            raise ValueError(f"{name}: the model takes {ch}-channel images, --dataset {dataset!r} has {info.in_channels}")
        if size is not None and dataset not in ("folder", "imagenet") and size != info.image_size:
            raise ValueError(f"{name}: the model was trained at {size} pixels, --dataset {dataset!r} images are "
                             f"{info.image_size}")


def _resolve(cfg: EvalConfig) -> EvalConfig:
    d = defaults_for(cfg.dataset)
    return replace(cfg, eps=[float(e) for e in (cfg.eps or d.test_eps)], head=cfg.head or d.head,
                   tasks=list(dict.fromkeys(cfg.tasks or [primary_task(cfg.dataset)])),
                   head_epochs=d.head_epochs if cfg.head_epochs is None else cfg.head_epochs,
                   sweep_eps=list(d.sweep if cfg.sweep_eps is None else cfg.sweep_eps),
                   label_budgets=[parse_budget(b) for b in cfg.label_budgets])


def _holdout(train: Split, n: int, models: dict) -> tuple[Split, Split]:
    """(the training split without its last n images, those n) in subset_order, the order of the trainer's
    --train-subset; refused when a model was trained on any of those n images."""
    keep = len(train.y) - n
    if keep < 1:
        raise ValueError(f"--holdout {n}: the training split has only {len(train.y)} images")
    for name, (_, c) in models.items():
        seen = c.get("train_subset") or len(train.y)
        if train.x is None and c.get("train_subset") and c.get("subset_order", "first") == "first":
            raise ValueError(f"--holdout {n}: {name} was trained on the first {seen} files of the tree (a run from before "
                             f"--train-subset shuffled ImageFolder trees); its held-out images cannot be told apart "
                             f"from them: train it again")
        if c.get("label_budget") or seen > keep:
            trained_on = ("a label subset of the whole training split" if c.get("label_budget")
                          else f"the first {seen} training images")
            raise ValueError(f"--holdout {n}: {name} was trained on {trained_on}, which include held-out ones (the "
                             f"last {n} of {len(train.y)}); train it with --train-subset {keep} or less")
    order = subset_order(len(train.y), by_class=train.x is None)
    return train.subset(order[:keep]), train.subset(order[keep:])


def _prepare(models: dict, cfg: EvalConfig, splits: Optional[tuple]) -> _Job:
    ctx = udist.context(cfg.device or "auto")
    # ImageFolder trees are read at the models' training size (the first model's; ResNets take any size)
    size = next((c.get("image_size") for _, c in models.values() if c.get("image_size")), None)
    train, test = splits if splits is not None else (load_split(cfg.dataset, "train", cfg.data_root, image_size=size),
                                                    None if cfg.holdout else
                                                    load_split(cfg.dataset, "test", cfg.data_root, image_size=size))
    if cfg.holdout:
        train, test = _holdout(train, cfg.holdout, models)
    if cfg.n_test is not None and cfg.n_test < len(test.y):
        idx = balanced_subset(test.y, cfg.n_test, seed=cfg.seed)
        x_test, y_test = test.images(idx), test.y[idx]
    else:
        x_test, y_test = test.images(), test.y  # uint8 for ImageFolder trees: converted per batch
    n_sw = len(y_test) if cfg.sweep_n_test is None else min(cfg.sweep_n_test, len(y_test))
    classes = max([train.num_classes] + [get_task(cfg.dataset, t, train.num_classes).num_classes for t in cfg.tasks])
    for name in ("bounded_M", "bound"):  # footnote 1 needs C e^-M < 1, checked before any head is trained
        M = getattr(cfg, name)
        if M is not None and classes * math.exp(-M) >= 1:
            raise ValueError(f"{_flag(name)} {M:g}: the bounded softmax needs M > log(C) = {math.log(classes):.3f} "
                             f"for the {classes} classes of {cfg.dataset}")
    sw = sweep_rows(len(y_test), n_sw, cfg.seed)
    return _Job(cfg, ctx.device, ctx.rank, ctx.world_size, train, x_test, y_test, x_test[sw], y_test[sw])


def sweep_rows(n_test: int, n_sweep: int, seed: int) -> torch.Tensor:
    """The sweep's rows of the test subset: a seeded random n_sweep of them, in order (the same on every rank).
    Not the first n_sweep: an ImageFolder split's subset is sorted by class, so its first rows are one or two
    classes."""
    if n_sweep >= n_test:
        return torch.arange(n_test)
    g = torch.Generator().manual_seed(int(seed) + 104729)
    return torch.randperm(n_test, generator=g)[:n_sweep].sort().values


def _settings(job: _Job) -> dict:
    c = job.cfg
    return dict(samples=c.samples, attack_steps=c.attack_steps, alpha=c.alpha,
                alpha_desc=("eps/10" if c.alpha is None else f"{c.alpha:g}"), eot_iter=c.eot_iter,
                apgd_steps=c.apgd_steps, apgd_targets=c.apgd_targets, square_queries=c.square_queries,
                transfer=c.transfer, redraws=c.redraws, tasks=c.tasks, pgd_restarts=c.pgd_restarts, cascade=c.cascade,
                n_test=len(job.y_test), test_fingerprint=subset_fingerprint(job.x_test, job.y_test),
                sweep_n_test=len(job.y_sw), head=c.head, head_epochs=c.head_epochs,
                head_lr=c.head_lr, bounded_M=c.bounded_M, seed=c.seed, device=str(job.device), n_train=len(job.train.y),
                split=f"holdout (the last {c.holdout} training images)" if c.holdout else "test")


def _scores(job: _Job, clf: ProbabilisticClassifier, x, y, attack: Optional[str] = None, eps: float = 0.0,
            desc: str = "", transfer_to: Optional[nn.Module] = None, **kw) -> dict:
    """``attack_scores`` of the clean (attack None) or attacked prediction ({"frac", "ok"[, "transfer"]}, [n]
    each); under torchrun each rank takes whole batches and the scores are gathered to every rank."""
    c = job.cfg
    sl, b0 = udist.batch_shard(len(y), c.batch_size, job.rank, job.world)
    atk = dict(steps=c.attack_steps, alpha=c.alpha, batch_size=c.batch_size, seed=c.seed, device=job.device,
               redraws=c.redraws, n_targets=max(1, c.apgd_targets), desc=desc, first_batch=b0)
    r = attack_scores(clf, x[sl], y[sl], attack=attack or "pgd", eps=eps if attack else 0.0,
                      transfer_to=transfer_to, **{**atk, **kw})

    def gather(d: dict) -> dict:
        frac = udist.gather_rows(d["frac"].float(), len(y), c.batch_size)
        return {"frac": frac, "ok": frac >= 0.5}

    out = gather(r)
    if "transfer" in r:
        out["transfer"] = gather(r["transfer"])
    return out


def _live_scores(job: _Job, clf, x, y, live: Optional[torch.Tensor], *args, **kw) -> dict:
    """``_scores`` of the rows ``live`` only (all rows when None); the others score 1, which leaves a worst case
    (a minimum) as it was."""
    if live is None:
        return _scores(job, clf, x, y, *args, **kw)
    r = _scores(job, clf, x[live], y[live], *args, **kw) if len(live) else None

    def spread(d: Optional[dict]) -> dict:
        frac = torch.ones(len(y))
        if d is not None:
            frac[live] = d["frac"]
        return {"frac": frac, "ok": frac >= 0.5}

    out = spread(r)
    if kw.get("transfer_to") is not None:
        out["transfer"] = spread(r["transfer"] if r is not None else None)
    return out


def _acc(ok: torch.Tensor) -> float:
    return ok.float().mean().item() if len(ok) else 0.0


def _ci(ok: torch.Tensor) -> list[float]:
    return list(wilson_interval(int(ok.sum()), len(ok)))


def ok_bits(ok: torch.Tensor) -> str:
    """Per-image correctness, 1 bit per test image in the subset's order, as hex: what a paired comparison of two
    models on the same images needs (``unpack_ok``), 250 bytes for 2000 images."""
    return np.packbits(ok.detach().cpu().numpy().astype(bool)).tobytes().hex()


def unpack_ok(bits: str, n: int) -> torch.Tensor:
    """``ok_bits``'s inverse: a bool tensor of the n images."""
    return torch.from_numpy(np.unpackbits(np.frombuffer(bytes.fromhex(bits), dtype=np.uint8))[:n].astype(bool))


def subset_fingerprint(x: torch.Tensor, y: torch.Tensor) -> str:
    """The test subset's identity (its pixels and labels, in order): per-image results of two evaluations pair up
    only when these agree."""
    h = hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes())
    h.update(y.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _ensemble(c: EvalConfig, stochastic: bool, num_classes: int) -> list[tuple[str, int, dict]]:
    """(attack, steps or queries, extra arguments) of one prediction path: AutoAttack's standard ensemble for a
    deterministic prediction (APGD-CE, APGD-T, Square), its rand version for the S-sample one (APGD-CE and
    APGD-DLR with EOT), with the paper's PGD first; DLR needs 3 classes, APGD-T 4."""
    eot = dict(eot_iter=c.eot_iter if stochastic else 1)
    out = [("pgd", c.attack_steps, eot)] if c.attack_steps else []
    if c.apgd_steps:
        out.append(("apgd", c.apgd_steps, eot))
        if stochastic and num_classes >= 3:
            out.append(("apgd-dlr", c.apgd_steps, eot))
        if not stochastic and c.apgd_targets and num_classes >= 4:
            out.append(("apgd-t", c.apgd_steps, eot))
    if c.square_queries:
        out.append(("square", c.square_queries, {}))
    return out


def _attack_paths(job: _Job, clfs: dict, tag: str, num_classes: int, y: torch.Tensor,
                  progress: Optional[_Progress] = None) -> dict:
    """Every attack of each path's ensemble, per eps; "worst": correct under every attack that ran on the path
    (per image, as AutoAttack counts), with a 95% Wilson interval; on the S-sample path also under every
    adversary of the z = mu path ("transfer"). "redraw_avg": the share of fresh predictions still correct
    under each image's worst attack, averaged. clfs: {"mu": clf[, "samples": clf]}. progress: the attacks an
    interrupted run finished, replayed instead of run again (and each new one saved)."""
    c, x = job.cfg, job.x_test
    out: dict[str, dict] = {}
    worst = {}  # per path and eps: each image's share of right predictions under its worst attack so far
    for path, clf in clfs.items():
        clf.reseed(c.seed)
        clean = _scores(job, clf, x, y)
        out[path] = {"clean": _acc(clean["ok"]), "clean_ci": _ci(clean["ok"]), "attacks": [], "worst": {},
                     "worst_ci": {}, "redraw_avg": {}, "ok_bits": {"clean": ok_bits(clean["ok"]), "worst": {}}}
        worst[path] = {e: clean["frac"].clone() for e in c.eps}  # a clean mistake is a mistake under any attack
    target = clfs.get("samples") if c.transfer else None
    transfer = {e: torch.ones(len(y)) for e in c.eps}
    for path in clfs:  # the z = mu path first: its adversaries are scored on the S-sample path as they come
        for k, (attack, steps, kw) in enumerate(_ensemble(c, clfs[path].stochastic, num_classes)):
            out[path]["attacks"].append(attack)
            out[path][attack] = {}
            for e in c.eps:
                # reseeded whether the attack runs or is replayed: what runs after it (the next attack, the
                # sweep) starts from the same stream either way
                clfs[path].reseed(c.seed + 1 + k)
                to = target if path == "mu" else None
                unit = f"{path}/{attack}/{e!r}"
                saved = progress.get(unit) if progress is not None else None
                if saved is not None:  # finished before an interruption: its scores, as they were
                    r = {"frac": saved["frac"], "ok": saved["frac"] >= 0.5}
                    if "transfer" in saved:
                        r["transfer"] = {"frac": saved["transfer"], "ok": saved["transfer"] >= 0.5}
                else:
                    r = _one_attack(job, clfs, path, attack, k, steps, kw, e, to, worst, tag, y)
                    if progress is not None:
                        progress.put(unit, {"frac": r["frac"], **({"transfer": r["transfer"]["frac"]}
                                                                  if "transfer" in r else {})})
                worst[path][e] = torch.minimum(worst[path][e], r["frac"])
                out[path][attack][str(e)] = _acc(worst[path][e] >= 0.5) if c.cascade else _acc(r["ok"])
                if "transfer" in r:
                    transfer[e] = torch.minimum(transfer[e], r["transfer"]["frac"])
                    worst["samples"][e] = torch.minimum(worst["samples"][e], r["transfer"]["frac"])
    if target is not None and not c.cascade:  # the S-sample prediction under every adversary of the z = mu path
        out["samples"]["transfer"] = {str(e): _acc(transfer[e] >= 0.5) for e in c.eps}
    for path in clfs:
        for e in c.eps:
            ok = worst[path][e] >= 0.5
            out[path]["worst"][str(e)], out[path]["worst_ci"][str(e)] = _acc(ok), _ci(ok)
            out[path]["ok_bits"]["worst"][str(e)] = ok_bits(ok)
            # under --cascade an image stops being attacked once most draws are wrong: its share would be that
            # of the attacks up to then, not of every attack, so none is reported
            out[path]["redraw_avg"][str(e)] = None if c.cascade else worst[path][e].mean().item() if len(y) else 0.0
    return out


def _one_attack(job: _Job, clfs: dict, path: str, attack: str, k: int, steps: int, kw: dict, e: float,
                to: Optional[ProbabilisticClassifier], worst: dict, tag: str, y: torch.Tensor) -> dict:
    """The k-th attack of a path's ensemble at eps e, on the images the cascade leaves (all without it)."""
    c = job.cfg
    # --cascade: an image already wrong under an earlier attack cannot count as robust again, so only the others
    # are attacked (every rank holds the same worst, so every rank picks the same rows)
    live = None
    if c.cascade:
        live = worst[path][e] >= 0.5
        if to is not None:  # its adversaries still feed the S-sample path's worst case
            live |= worst["samples"][e] >= 0.5
        live = live.nonzero().squeeze(1)
    return _live_scores(job, clfs[path], job.x_test, y, live, attack, e, desc=f"{tag} {path} {attack} {e:.4g}",
                        steps=steps, transfer_to=to, restarts=c.pgd_restarts if attack == "pgd" else 1, **kw)


def _sweep(job: _Job, clf: ProbabilisticClassifier, name: str) -> list[float]:
    return [_acc(_scores(job, clf, job.x_sw, job.y_sw, "pgd", e, desc=f"{name} sweep {e:.3g}",
                         eot_iter=1)["ok"]) for e in job.cfg.sweep_eps]


def _head_file(folder: str, name: str, task: str, budget) -> str:
    return os.path.join(folder, f"{_slug(name)}__{task}__{budget}.pt")


def _plain(v) -> bool:
    """A value whose repr is the same in every process (no object address in it)."""
    return v is None or isinstance(v, (bool, int, float, str)) or \
        (isinstance(v, tuple) and all(x is None or isinstance(x, (bool, int, float, str)) for x in v))


def fingerprint(model: nn.Module) -> str:
    """sha1 of what the model computes with: its weights and persistent buffers (the state dict), its non-persistent
    buffers (pixel mean / std, which a checkpoint does not hold but a config sets), and every module's type and
    plain attributes (sigma_min, the variance map, strides, epsilons). A saved head, and a saved attack, is reused
    only on the representation it was made on: the same weights under another config are another model."""
    h = hashlib.sha1()
    state = model.state_dict()
    tensors = {**{f"buffer:{k}": v for k, v in model.named_buffers() if k not in state}, **state}
    for k, v in sorted(tensors.items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    for name, m in model.named_modules():  # registration order: part of the architecture
        attrs = sorted((a, v) for a, v in vars(m).items() if not a.startswith("_") and a != "training" and _plain(v))
        h.update(f"{name}:{type(m).__qualname__}:{attrs!r}".encode())
    return h.hexdigest()


def _head_code() -> str:
    """sha256 of how a head is built and trained: a head saved before a change there is trained afresh."""
    import inspect

    from .evaluation import probe
    from .models import heads

    return hashlib.sha256((inspect.getsource(heads) + inspect.getsource(probe.train_head)).encode()).hexdigest()[:16]


def _head(job: _Job, name: str, task, budget, idx, feats, model_id: str) -> nn.Module:
    """The task's head for this label budget: reused from --heads (else from this --out's heads, an interrupted
    run's) when a file there was trained the same way on the same weights (``fingerprint``), else trained on the
    frozen features (rank 0, then broadcast); saved to <out>/heads for later attacks either way."""
    c = job.cfg
    h = None
    recipe = dict(model=model_id, kind=c.head, num_classes=task.num_classes, n_labels=len(idx), seed=c.seed,
                  code=_head_code(),
                  epochs=c.head_epochs, lr=c.head_lr, loss=c.head_loss, M=c.bound if c.head_loss == "bounded" else None,
                  # the labelled images themselves: a head of the whole training split is not one of --holdout's
                  n_train=len(job.train.y), holdout=c.holdout)
    # --heads, then this --out's own (an interrupted run's): the same head, so its finished attacks still apply
    for flag, folder in (("--heads", c.heads), ("--out", os.path.join(c.out, "heads") if c.out else None)):
        if h is not None or not folder or not os.path.isfile(_head_file(folder, name, task.name, budget)):
            continue
        saved = torch.load(_head_file(folder, name, task.name, budget), map_location="cpu", weights_only=True)
        if saved.get("recipe") == recipe:
            h = make_head(c.head, saved["d_in"], task.num_classes)
            h.load_state_dict(saved["state_dict"])
            h.eval()
        elif job.main:
            warnings.warn(f"{flag}: {_head_file(folder, name, task.name, budget)} was trained another way or on "
                          f"other weights; training this head afresh", stacklevel=2)
    if h is None and job.main:
        mu_tr, lv_tr, y_tr = feats
        h = train_head(mu_tr[idx], lv_tr[idx], y_tr[idx], num_classes=task.num_classes, head_kind=c.head,
                       epochs=c.head_epochs, lr=c.head_lr, seed=c.seed, desc=f"{name} {task.name} head {budget}",
                       bounded_M=c.bound if c.head_loss == "bounded" else None)
    elif h is None:  # the architecture only (without touching the global random stream): rank 0's weights follow
        with torch.random.fork_rng(devices=[]):
            h = make_head(c.head, int(job.d_z), task.num_classes).eval()
    h = udist.broadcast_module(h.to(job.device))
    if job.out:
        buf = io.BytesIO()
        torch.save(dict(state_dict={k: v.cpu() for k, v in h.state_dict().items()}, recipe=recipe,
                        d_in=int(next(h.parameters()).shape[1]), task=task.name, budget=str(budget)), buf)
        write_atomic(_head_file(os.path.join(job.out, "heads"), name, task.name, budget), buf.getvalue())
    return h


def _representation(job: _Job, name: str, model: nn.Module, entry: dict, curves: dict) -> None:
    """Per task and label budget a head on the frozen features, then every attack on both prediction paths
    (the z = mu path alone for a deterministic encoder: its S-sample prediction is the same)."""
    c, train = job.cfg, job.train
    # each rank encodes its share; rank 0 gathers the features, trains the heads, broadcasts them
    sl, _ = udist.batch_shard(len(train.y), 512, job.rank, job.world)
    mu_tr, lv_tr = encode_dataset(model, train.subset(sl), batch_size=512, device=job.device, desc=f"{name} encode",
                                  num_workers=c.num_workers)
    mu_tr = udist.gather_rows(mu_tr, len(train.y), 512, to_all=False)
    lv_tr = udist.gather_rows(lv_tr, len(train.y), 512, to_all=False)
    job.d_z = model.d_z
    deterministic = bool(getattr(model, "deterministic", False))
    model_id = fingerprint(model)
    for task in _tasks(job):
        y_tr, y_te = task.relabel(train.y), task.relabel(job.y_test)
        budgets = entry["tasks"].setdefault(task.name, {"budgets": {}})["budgets"]
        for b in c.label_budgets:
            try:
                idx = balanced_subset(y_tr, b, seed=c.seed)
            except ValueError as exc:
                warnings.warn(f"{name} {task.name}: {exc}; budget skipped", stacklevel=2)
                budgets[str(b)] = dict(skipped=str(exc))
                continue
            h = _head(job, name, task, b, idx, (mu_tr, lv_tr, y_tr), model_id)
            clfs = {path: ProbabilisticClassifier(model, h, path=path, samples=c.samples, bounded_M=c.bounded_M,
                                                  seed=c.seed).to(job.device)
                    for path in (("mu",) if deterministic else ("mu", "samples"))}
            progress = _Progress(job, name, task.name, b, model=model_id, head=fingerprint(h),
                                 paths=list(clfs), samples=c.samples, bounded_M=c.bounded_M, bound=c.bound,
                                 bound_samples=c.bound_samples)
            paths = _attack_paths(job, clfs, f"{name} {task.name} {b}", task.num_classes, y_te, progress)
            if deterministic:
                paths["samples"] = dict(paths["mu"], note="deterministic encoder: the S-sample prediction is z = mu")
            budgets[str(b)] = dict(n_labels=len(idx), paths=paths)
            if c.bound is not None and not deterministic:
                budgets[str(b)]["bound"] = {str(e): _bound(job, model, h, y_te, e, progress) for e in c.eps}
            if c.out and c.plots and b == c.label_budgets[0] and task.name == c.tasks[0]:
                for path, clf in clfs.items():
                    curves[f"{'S=%d' % c.samples if path == 'samples' else 'z = mu'}, labels {b}"] = dict(
                        eps=c.sweep_eps, acc=_sweep(job, clf, name))
            _flag_at_chance(job, name, task, b, budgets[str(b)])


def _bound(job: _Job, model: nn.Module, head: nn.Module, y: torch.Tensor, eps: float,
           progress: Optional[_Progress] = None) -> dict:
    """Proposition 1 at this eps, every rank on its share of whole batches (``_scores``' sharding); saved to
    progress when it ends, replayed from it on a resumed run."""
    c = job.cfg
    saved = progress.get(f"bound/{eps!r}") if progress is not None else None
    if saved is not None:
        return saved
    sl, b0 = udist.batch_shard(len(y), c.batch_size, job.rank, job.world)
    per = proposition1_per_image(model, head, job.x_test[sl], y[sl], M=c.bound, eps=eps, samples=c.bound_samples,
                                 batch_size=c.batch_size, seed=c.seed, first_batch=b0, device=job.device)
    per = {k: udist.gather_rows(v.float(), len(y), c.batch_size) for k, v in per.items()}
    result = summarize_bound(per, M=c.bound, eps=eps, samples=c.bound_samples)
    if progress is not None:
        progress.put(f"bound/{eps!r}", result)
    return result


def _flag_at_chance(job: _Job, name: str, task, b, result: dict, what: str = "head") -> None:
    chance = 1.0 / task.num_classes
    if result["paths"]["mu"]["clean"] <= chance + 0.1 * (1 - chance):  # a model that learned (next to) nothing
        result["at_chance"] = True
        who = "the representation (or the head)" if what == "head" else "the classifier"
        if job.main:
            warnings.warn(f"{name}, task {task.name}, labels {b}: the {what}'s clean accuracy "
                          f"{100 * result['paths']['mu']['clean']:.1f}% is at chance (1/{task.num_classes}): "
                          f"{who} learned nothing, so its robust accuracy means nothing either", stacklevel=2)


def _tasks(job: _Job) -> list:
    return [get_task(job.cfg.dataset, t, job.train.num_classes) for t in job.cfg.tasks]


def _supervised(job: _Job, name: str, model: nn.Module, config: dict, entry: dict, curves: dict) -> None:
    """A classifier as it is: its own task, and only the label budget it was trained on (all when the config
    names none), whatever --label-budgets says."""
    c = job.cfg
    clf = ProbabilisticClassifier(model, None, bounded_M=c.bounded_M, seed=c.seed).to(job.device)
    trained = config.get("label_budget") or "all"
    primary = get_task(c.dataset, primary_task(c.dataset), job.train.num_classes)
    progress = _Progress(job, name, primary.name, trained, model=fingerprint(model), paths=["mu"],
                         bounded_M=c.bounded_M)
    paths = _attack_paths(job, {"mu": clf}, name, primary.num_classes, job.y_test, progress)
    paths["samples"] = dict(paths["mu"], note="classifier: no z, one prediction")
    budgets = entry["tasks"].setdefault(primary.name, {"budgets": {}})["budgets"]
    n = len(job.train.y) if trained == "all" else int(trained)
    budgets[str(trained)] = dict(n_labels=n, paths=paths, note=f"supervised: trained on {trained} labels, no head")
    _flag_at_chance(job, name, primary, trained, budgets[str(trained)], what="classifier")
    for t in c.tasks:
        if t != primary.name:
            entry["tasks"][t] = {"budgets": {}, "skipped": f"a classifier of the {c.dataset} classes"}
    if c.out and c.plots:
        curves["supervised"] = dict(eps=c.sweep_eps, acc=_sweep(job, clf, name))


def _plots(job: _Job, name: str, model: nn.Module, curves: dict) -> list[str]:
    from .evaluation.plots import plot_accuracy_vs_eps, plot_z_projection

    c = job.cfg
    out = [plot_accuracy_vs_eps(curves, c.sweep_eps, os.path.join(job.out, f"accuracy_vs_eps_{_slug(name)}.png"),
                                f"{name} on {c.dataset}: PGD-{c.attack_steps}, n = {len(job.y_sw)}")]
    if model.kind == "representation" and c.fig2_images > 0:
        k = min(c.fig2_images, len(job.x_test))
        fig_eps = next((e for e in c.eps if e > 0), defaults_for(c.dataset).test_eps[0])
        out.append(plot_z_projection(
            model, to_float01(job.x_test[:k].to(job.device)), job.y_test[:k],
            os.path.join(job.out, f"zspace_{_slug(name)}.png"), eps=fig_eps, steps=c.attack_steps, seed=c.seed,
            title=f"{name}: 20 z samples per image (o) and per Urkle adversary (x), eps = {fig_eps:g}"))
    return out


def _evaluate_one(job: _Job, name: str, model: nn.Module, config: dict, checkpoint: Optional[str]) -> dict:
    c = job.cfg
    t0 = time.time()
    entry: dict[str, Any] = dict(kind=model.kind, method=config.get("method"), config=config, checkpoint=checkpoint,
                                 tasks={})
    curves: dict[str, dict] = {}
    model = model.to(job.device)
    with frozen(model):  # eval mode, no parameter gradients; the caller's model is restored afterwards
        if model.kind == "supervised":
            _supervised(job, name, model, config, entry, curves)
        else:
            _representation(job, name, model, entry, curves)
        entry["budgets"] = entry["tasks"].get(primary_task(c.dataset), {}).get("budgets", {})
        entry["sweep"] = curves
        if c.plots and job.out:
            try:
                entry["plots"] = _plots(job, name, model, curves)
            except ImportError as exc:  # a plot never costs the numbers
                print(f"[eval] plots skipped: {exc} (pip install matplotlib)", file=sys.stderr)
    entry["wall_s"] = round(time.time() - t0, 2)
    if c.verbose and job.main:
        print(f"[eval] {name}: done in {entry['wall_s']:.1f} s", flush=True)
    return entry


def evaluate_models(models: dict[str, tuple[nn.Module, dict]], cfg: EvalConfig, *, splits: Optional[tuple] = None,
                    checkpoint_paths: Optional[dict[str, str]] = None) -> dict:
    """Evaluate already-loaded models ``{name: (model, config)}`` as ``cfg`` says (its checkpoint / name
    fields are not read). ``splits`` = (train, test) ``Split`` objects overrides the dataset loader (tests).

    Returns the dict written to results.json: {"dataset", "eps_list", "settings", "label_budgets",
    "models": {name: {"kind", "budgets": {budget: {"paths": {"samples"|"mu": {"clean", "pgd": {eps: acc},
    "apgd": {eps: acc}, "both", ["square", "worst"]}}}}, "sweep", "wall_s"}}} with accuracies in [0, 1].
    Under torchrun (a process group started by the caller) every rank evaluates its share."""
    if cfg.dataset is None:
        raise ValueError("dataset: required (EvalConfig.dataset or --dataset)")
    validate(cfg)
    check_models_match(models, cfg.dataset)
    ident = _check_out(models, cfg)
    job = _prepare(models, _resolve(cfg), splits)
    _record_out(ident, job)
    c = job.cfg
    results: dict[str, Any] = dict(dataset=c.dataset, eps_list=c.eps, sweep_eps=c.sweep_eps, tasks=c.tasks,
                                   label_budgets=[str(b) for b in c.label_budgets], settings=_settings(job), models={})
    from tqdm.auto import tqdm

    bar = tqdm(models.items(), desc="eval", unit="model", disable=not (c.verbose and job.main))
    for name, (model, config) in bar:
        bar.set_postfix_str(name)
        results["models"][name] = _evaluate_one(job, name, model, config, (checkpoint_paths or {}).get(name))
        if job.out:  # each model's numbers are on disk as soon as they exist
            write_outputs(results, job.out)
    if c.plots and job.out and results["models"]:
        try:
            from .evaluation.plots import plot_accuracy_vs_eps

            allc = {f"{n} ({k})": cv for n, m in results["models"].items() for k, cv in m["sweep"].items()}
            results["plots"] = [plot_accuracy_vs_eps(allc, c.sweep_eps, os.path.join(job.out, "accuracy_vs_eps.png"),
                                                     f"{c.dataset}: accuracy under PGD-{c.attack_steps}")]
        except ImportError as exc:
            print(f"[eval] plots skipped: {exc} (pip install matplotlib)", file=sys.stderr)
    if job.out:
        write_outputs(results, job.out)
    if c.verbose and job.main:
        print(markdown_table(results), flush=True)
    return results


def load_models(paths: Sequence[str], names: Sequence[str] = ()) -> dict[str, tuple[nn.Module, dict]]:
    """{row name: (model, config)}; names default to each checkpoint's method (made unique)."""
    if names and len(names) != len(paths):
        raise ValueError(f"--name given {len(names)} times for {len(paths)} --checkpoint")
    loaded: dict[str, tuple[nn.Module, dict]] = {}
    for i, path in enumerate(paths):
        model, config = load_eval_model(path)
        name = names[i] if names else (config.get("method") or os.path.splitext(os.path.basename(path))[0])
        base, k = name, 2
        while name in loaded:
            name, k = f"{base}-{k}", k + 1
        loaded[name] = (model, config)
    return loaded


def _evaluate_loaded(loaded: dict, paths: dict[str, str], cfg: EvalConfig) -> dict:
    """``cfg.dataset`` and ``cfg.data_root`` default to the first checkpoint's that names one."""
    configs = [c for _, c in loaded.values()]
    dataset = cfg.dataset or next((c.get("dataset") for c in configs if c.get("dataset")), None)
    if dataset is None:
        raise ValueError("--dataset is required (the checkpoint does not name one)")
    defaults_for(dataset)
    data_root = cfg.data_root or next((c.get("data_root") for c in configs if c.get("data_root")), None)
    return evaluate_models(loaded, replace(cfg, dataset=dataset, data_root=data_root), checkpoint_paths=paths)


def evaluate_checkpoints(checkpoints: dict[str, str], cfg: EvalConfig) -> dict:
    """Train the downstream head per checkpoint, attack, write table.md / results.json / PNGs.

    checkpoints: {row name: path to a file written by urkle_fast.train}; ``cfg.dataset`` and
    ``cfg.data_root`` default to the first checkpoint's. Returns what ``evaluate_models`` returns.
    Raises FileNotFoundError (missing file), CheckpointError (unreadable file), ValueError (unknown dataset)."""
    if cfg.dataset is not None:
        defaults_for(cfg.dataset)  # an unknown dataset fails before any checkpoint is read
    loaded = {name: load_eval_model(path) for name, path in checkpoints.items()}
    return _evaluate_loaded(loaded, dict(checkpoints), cfg)


def parse_args(argv: Optional[Sequence[str]] = None) -> EvalConfig:
    p = parser_for(EvalConfig, "python -m urkle_fast.eval", __doc__.split("\n\n")[0])
    return config_from(EvalConfig, p.parse_args(argv))


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Parse the flags, start the process group under torchrun, evaluate; returns the results dict."""
    cfg = parse_args(argv)
    if os.environ.get("RANK", "0") not in ("", "0"):
        os.environ["TQDM_DISABLE"] = "1"  # under torchrun, progress bars from rank 0 only
    if cfg.dataset is not None:
        validate(cfg)  # bad flags fail before any checkpoint is read (evaluate_models checks again, cheaply)
    udist.check_device_flags(cfg.device or "auto")  # (validate's check, for a dataset named by the checkpoint)
    udist.init_distributed(cfg.device or "auto")
    loaded = load_models(cfg.checkpoint, cfg.name)
    return _evaluate_loaded(loaded, dict(zip(loaded, cfg.checkpoint)), cfg)


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """``main`` with one-line errors and exit status 2 for bad input (missing / corrupt checkpoint,
    unknown dataset, missing data)."""
    try:
        main(argv)
    except (FileNotFoundError, CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        udist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
