"""``python -m urkle_fast.eval``: robust accuracy of frozen representations (docs/PROTOCOL.md sec. 7).

For every checkpoint: train the downstream head on the frozen representation (one z per input,
no adversarial training; supervised baselines are used as they are), then measure accuracy on
clean test images and under white-box l_inf PGD (random start, EOT over the z samples), APGD-CE and
(optionally) Square, for the S-sample averaged prediction (paper Eq. 1) and the z = mu path, for each
label budget; "worst" is the per-image worst case over every attack that ran. Writes table.md,
results.json, accuracy_vs_eps_<model>.png, accuracy_vs_eps.png and, for representation models,
zspace_<model>.png (paper Figure 2) to --out.

    python -m urkle_fast.eval --checkpoint runs/urkle.pt --checkpoint runs/standard.pt \\
        --dataset mnist --eps 0.1 --label-budgets all 5000 1000 --n-test 1000 --out runs/eval

The flags are the fields of ``EvalConfig``; ``evaluate_checkpoints(paths, EvalConfig(...))`` is the same
from Python.
"""

from __future__ import annotations

import math
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from . import distributed as udist
from .attack import frozen
from .checkpoint import CheckpointError, load_model
from .cli import config_from, flag as _flag, opt, parser_for
from .data import INFO, to_float01
from .defaults import DATASETS, defaults_for, help_for
from .evaluation.attacks import robust_accuracy
from .evaluation.datasets import Split, load_split
from .evaluation.probe import (ProbabilisticClassifier, balanced_subset, encode_dataset, make_head, parse_budget, predict,
                               train_head)
from .evaluation.report import markdown_table, write_outputs


@dataclass
class EvalConfig:
    checkpoint: list[str] = opt(help="checkpoint file (repeat for several models)", factory=list, action="append",
                                required=True)
    name: list[str] = opt(help="row name per --checkpoint, in order (default: the method)", factory=list,
                          action="append")
    dataset: Optional[str] = opt(None, "default: the first checkpoint's", choices=list(DATASETS))
    data_root: Optional[str] = opt(None, "default: the checkpoint's data_root, else ../shared/data")
    eps: Optional[list[float]] = opt(None, "test epsilons in [0, 1] pixels; None: " + help_for("test_eps"))
    out: Optional[str] = opt("runs/eval", "output folder (None from Python: write nothing)")
    label_budgets: list[str] = opt(help="'all' and/or label counts, e.g. all 5000 1000", factory=lambda: ["all"])
    samples: int = opt(10, "S, z samples averaged per prediction (paper Eq. 1)")
    attack_steps: int = opt(20, "PGD steps")
    alpha: Optional[float] = opt(None, "PGD step; None: eps / 10")
    eot_iter: int = opt(1, "forwards averaged per attack step (EOT)")
    apgd_steps: int = opt(100, "APGD-CE iterations; 0 disables")
    square_queries: int = opt(0, "Square Attack (gradient-free) queries per image; 0 disables (1000-5000 to check "
                              "for gradient masking)")
    pgd_restarts: int = opt(1, "PGD runs from different random starts; an image must survive all")
    n_test: Optional[int] = opt(None, "class-balanced seeded test subset; None: the whole test set")
    sweep_eps: Optional[list[float]] = opt(None, "epsilons of the accuracy-vs-eps plot; None: per dataset "
                                           "(urkle_fast.defaults)")
    sweep_n_test: Optional[int] = opt(500, "test images in the sweep")
    head: Optional[str] = opt(None, "downstream head; None: " + help_for("head"), choices=["linear", "mlp3"])
    head_epochs: Optional[int] = opt(None, "None: " + help_for("head_epochs"))
    head_lr: float = opt(1e-3, "Adam lr of the head")
    bounded_M: Optional[float] = opt(None, "bounded softmax of paper footnote 1 (-log p <= M)")
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

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def out(self) -> Optional[str]:  # rank 0 writes
        return self.cfg.out if self.main else None


def validate(cfg: EvalConfig) -> None:
    """Every setting's range and the output folder, before any work; the message names the flag."""
    defaults_for(cfg.dataset)
    for e in cfg.eps or ():
        if not (isinstance(e, (int, float)) and math.isfinite(e) and 0 < e <= 1):
            raise ValueError(f"--eps must be in (0, 1] (pixels in [0, 1]), got {e!r}")
    for e in cfg.sweep_eps or ():
        if not (isinstance(e, (int, float)) and math.isfinite(e) and 0 <= e <= 1):
            raise ValueError(f"--sweep-eps must be in [0, 1], got {e!r}")
    for name in ("samples", "pgd_restarts", "eot_iter", "batch_size", "n_test", "sweep_n_test", "head_epochs"):
        v = getattr(cfg, name)
        if v is not None and not (isinstance(v, int) and v >= 1):
            raise ValueError(f"{_flag(name)} must be an integer >= 1, got {v!r}")
    for name in ("attack_steps", "apgd_steps", "square_queries", "fig2_images", "num_workers"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{_flag(name)} must be >= 0, got {getattr(cfg, name)!r}")
    for name in ("head_lr", "alpha", "bounded_M"):
        v = getattr(cfg, name)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError(f"{_flag(name)} must be a positive number, got {v!r}")
    for b in cfg.label_budgets:
        parse_budget(b)
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
                   head_epochs=d.head_epochs if cfg.head_epochs is None else cfg.head_epochs,
                   sweep_eps=list(d.sweep if cfg.sweep_eps is None else cfg.sweep_eps),
                   label_budgets=[parse_budget(b) for b in cfg.label_budgets])


def _prepare(models: dict, cfg: EvalConfig, splits: Optional[tuple]) -> _Job:
    ctx = udist.context(cfg.device or "auto")
    # ImageFolder trees are read at the models' training size (the first model's; ResNets take any size)
    size = next((c.get("image_size") for _, c in models.values() if c.get("image_size")), None)
    train, test = splits if splits is not None else (load_split(cfg.dataset, "train", cfg.data_root, image_size=size),
                                                    load_split(cfg.dataset, "test", cfg.data_root, image_size=size))
    if cfg.n_test is not None and cfg.n_test < len(test.y):
        idx = balanced_subset(test.y, cfg.n_test, seed=cfg.seed)
        x_test, y_test = test.images(idx), test.y[idx]
    else:
        x_test, y_test = test.images(), test.y  # uint8 for ImageFolder trees: converted per batch
    n_sw = len(y_test) if cfg.sweep_n_test is None else min(cfg.sweep_n_test, len(y_test))
    return _Job(cfg, ctx.device, ctx.rank, ctx.world_size, train, x_test, y_test, x_test[:n_sw], y_test[:n_sw])


def _settings(job: _Job) -> dict:
    c = job.cfg
    return dict(samples=c.samples, attack_steps=c.attack_steps, alpha=c.alpha,
                alpha_desc=("eps/10" if c.alpha is None else f"{c.alpha:g}"), eot_iter=c.eot_iter,
                apgd_steps=c.apgd_steps, square_queries=c.square_queries, pgd_restarts=c.pgd_restarts,
                n_test=len(job.y_test), sweep_n_test=len(job.y_sw), head=c.head, head_epochs=c.head_epochs,
                head_lr=c.head_lr, bounded_M=c.bounded_M, seed=c.seed, device=str(job.device), n_train=len(job.train.y))


def _correct(job: _Job, clf: ProbabilisticClassifier, x, y, attack: Optional[str] = None, eps: float = 0.0,
             desc: str = "", **kw) -> torch.Tensor:
    """Per-image correctness [n] bool of the clean (attack None) or attacked prediction; under torchrun
    each rank takes whole batches and the flags are gathered to every rank."""
    c = job.cfg
    sl, b0 = udist.batch_shard(len(y), c.batch_size, job.rank, job.world)
    xs, ys = x[sl], y[sl]
    if attack is None:
        ok = predict(clf, xs, batch_size=c.batch_size, device=job.device) == ys.cpu()
    else:
        atk = dict(steps=c.attack_steps, alpha=c.alpha, eot_iter=c.eot_iter, batch_size=c.batch_size, seed=c.seed,
                   device=job.device)
        _, ok = robust_accuracy(clf, xs, ys, attack=attack, eps=eps, return_correct=True, desc=desc, first_batch=b0,
                                **{**atk, **kw})
    return udist.gather_rows(ok.to(torch.uint8), len(y), c.batch_size).bool()


def _acc(ok: torch.Tensor) -> float:
    return ok.float().mean().item() if len(ok) else 0.0


def _attack_all(job: _Job, clf: ProbabilisticClassifier, tag: str) -> dict:
    """clean, PGD, APGD (and Square) accuracy per eps; "both": correct under PGD and APGD, "worst": under
    every attack that ran (per sample, as AutoAttack counts an ensemble)."""
    c = job.cfg
    r: dict[str, Any] = {"clean": _acc(_correct(job, clf, job.x_test, job.y_test)), "pgd": {}}
    survived = {}  # per eps: correct under every attack so far
    for e in c.eps:
        clf.reseed(c.seed + 1)
        survived[e] = _correct(job, clf, job.x_test, job.y_test, "pgd", e, desc=f"{tag} PGD {e:.4g}",
                               restarts=c.pgd_restarts)
        r["pgd"][str(e)] = _acc(survived[e])
    # then APGD ("both": PGD & APGD) and the gradient-free Square ("worst": every attack that ran)
    extra = ([("apgd", "APGD", c.apgd_steps, "both", 2)] if c.apgd_steps else []) + \
        ([("square", "Square", c.square_queries, "worst", 3)] if c.square_queries else [])
    for key, label, n_steps, combined, seed_offset in extra:
        r[key], r[combined] = {}, {}
        for e in c.eps:
            clf.reseed(c.seed + seed_offset)
            ok = _correct(job, clf, job.x_test, job.y_test, key, e, desc=f"{tag} {label} {e:.4g}", steps=n_steps)
            survived[e] = survived[e] & ok
            r[key][str(e)] = _acc(ok)
            r[combined][str(e)] = _acc(survived[e])
    return r


def _sweep(job: _Job, clf: ProbabilisticClassifier, name: str) -> list[float]:
    return [_acc(_correct(job, clf, job.x_sw, job.y_sw, "pgd", e, desc=f"{name} sweep {e:.3g}"))
            for e in job.cfg.sweep_eps]


def _representation(job: _Job, name: str, model: nn.Module, entry: dict, curves: dict) -> None:
    """Heads per label budget on the frozen features, then every attack on both prediction paths."""
    c, train = job.cfg, job.train
    # each rank encodes its share; rank 0 gathers the features, trains the heads, broadcasts them
    sl, _ = udist.batch_shard(len(train.y), 512, job.rank, job.world)
    mu_tr, lv_tr = encode_dataset(model, train.subset(sl), batch_size=512, device=job.device, desc=f"{name} encode",
                                  num_workers=c.num_workers)
    mu_tr = udist.gather_rows(mu_tr, len(train.y), 512, to_all=False)
    lv_tr = udist.gather_rows(lv_tr, len(train.y), 512, to_all=False)
    for b in c.label_budgets:
        try:
            idx = balanced_subset(train.y, b, seed=c.seed)
        except ValueError as exc:
            warnings.warn(f"{name}: {exc}; budget skipped", stacklevel=2)
            entry["budgets"][str(b)] = dict(skipped=str(exc))
            continue
        if job.main:
            h = train_head(mu_tr[idx], lv_tr[idx], train.y[idx], num_classes=train.num_classes, head_kind=c.head,
                           epochs=c.head_epochs, lr=c.head_lr, seed=c.seed, desc=f"{name} head {b}")
        else:  # the architecture only (without touching the global random stream): rank 0's weights follow
            with torch.random.fork_rng(devices=[]):
                h = make_head(c.head, model.d_z, train.num_classes).eval()
        h = udist.broadcast_module(h.to(job.device))
        paths = {}
        for path in ("samples", "mu"):
            clf = ProbabilisticClassifier(model, h, path=path, samples=c.samples, bounded_M=c.bounded_M,
                                          seed=c.seed).to(job.device)
            paths[path] = _attack_all(job, clf, f"{name} {b} {path}")
            if c.out and c.plots and b == c.label_budgets[0]:
                curves[f"{'S=%d' % c.samples if path == 'samples' else 'z = mu'}, labels {b}"] = dict(
                    eps=c.sweep_eps, acc=_sweep(job, clf, name))
        entry["budgets"][str(b)] = dict(n_labels=len(idx), paths=paths)
        chance = 1.0 / train.num_classes
        if paths["mu"]["clean"] <= chance + 0.1 * (1 - chance):  # a head that learned (next to) nothing
            entry["budgets"][str(b)]["at_chance"] = True
        if entry["budgets"][str(b)].get("at_chance") and job.main:
            warnings.warn(f"{name}, labels {b}: the head's clean accuracy {100 * paths['mu']['clean']:.1f}% is at "
                          f"chance (1/{train.num_classes}): the representation (or the head) learned nothing, so its "
                          f"robust accuracy means nothing either", stacklevel=2)


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
                                 budgets={})
    curves: dict[str, dict] = {}
    model = model.to(job.device)
    with frozen(model):  # eval mode, no parameter gradients; the caller's model is restored afterwards
        if model.kind == "supervised":
            clf = ProbabilisticClassifier(model, None, bounded_M=c.bounded_M, seed=c.seed).to(job.device)
            r = _attack_all(job, clf, name)
            for b in c.label_budgets:  # no head: the same numbers under every budget (trained with all labels)
                entry["budgets"][str(b)] = dict(n_labels=len(job.train.y), paths={"samples": r, "mu": r},
                                                note="supervised: no head, trained with all labels")
            if c.out and c.plots:
                curves["supervised"] = dict(eps=c.sweep_eps, acc=_sweep(job, clf, name))
        else:
            _representation(job, name, model, entry, curves)
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
    job = _prepare(models, _resolve(cfg), splits)
    c = job.cfg
    results: dict[str, Any] = dict(dataset=c.dataset, eps_list=c.eps, sweep_eps=c.sweep_eps,
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
