"""``python -m urkle_fast.eval``: robust accuracy of frozen representations (SPEC sec. 7).

For every checkpoint: train the downstream head on the frozen representation (one z per input,
no adversarial training; supervised baselines are used as they are), then measure accuracy on
clean test images and under white-box l_inf PGD (random start, EOT over the z samples) and
APGD-CE, for the S-sample averaged prediction (paper Eq. 1) and the z = mu path, for each label
budget. Writes table.md, results.json, accuracy_vs_eps_<model>.png, accuracy_vs_eps.png and,
for representation models, zspace_<model>.png (paper Figure 2) to --out.

    python -m urkle_fast.eval --checkpoint runs/urkle.pt --checkpoint runs/standard.pt \
        --dataset mnist --eps 0.1 --label-budgets all 5000 1000 --n-test 1000 --out runs/eval
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn

from .checkpoint import CheckpointError, load_model
from .evaluation.attacks import robust_accuracy
from .evaluation.datasets import (DATASETS, DEFAULT_EPS, DEFAULT_HEAD, DEFAULT_SWEEP, check_dataset,
                                  load_split)
from .evaluation.probe import ProbabilisticClassifier, balanced_subset, encode_dataset, parse_budget, predict, train_head
from .evaluation import sharding
from .evaluation.report import markdown_table, write_outputs
from . import distributed as udist
from .data import to_float01

DEFAULT_HEAD_EPOCHS = {"digits": 100, "mnist": 10, "cifar10": 30, "cifar100": 30, "folder": 30, "imagenet": 30}


def load_checkpoint(path: str, map_location: str = "cpu") -> tuple[nn.Module, dict]:
    """(model, config) from ``urkle_fast.checkpoint.load_model``: FileNotFoundError for a missing
    file, CheckpointError (urkle_fast.checkpoint) for anything that cannot be read as a model."""
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


def evaluate_models(models: dict[str, tuple[nn.Module, dict]], *, dataset: str, data_root: Optional[str] = None,
                    eps_list: Sequence[float], out_dir: Optional[str], label_budgets: Sequence[Union[int, str]] = ("all",),
                    samples: int = 10, attack_steps: int = 20, seed: int = 0, alpha: Optional[float] = None,
                    eot_iter: int = 1, apgd_steps: int = 100, square_queries: int = 0, pgd_restarts: int = 1,
                    n_test: Optional[int] = None,
                    sweep_eps: Optional[Sequence[float]] = None, sweep_n_test: Optional[int] = 500,
                    head: Optional[str] = None, head_epochs: Optional[int] = None, head_lr: float = 1e-3,
                    bounded_M: Optional[float] = None, batch_size: int = 256, device: Optional[str] = None,
                    fig2_images: int = 4, plots: bool = True, verbose: bool = True, num_workers: int = 2,
                    splits: Optional[tuple[Any, Any]] = None, checkpoint_paths: Optional[dict[str, str]] = None) -> dict:
    """Evaluate already-loaded models ``{name: (model, config)}``; see ``evaluate_checkpoints``.

    ``splits`` = (train, test) ``Split`` objects overrides the dataset loader (tests).
    """
    check_dataset(dataset)
    eps_list = [float(e) for e in eps_list]
    budgets = [parse_budget(b) for b in label_budgets]
    if udist.is_distributed() or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        # torchrun: every rank evaluates its share of each batch set (urkle_fast.evaluation.sharding)
        device = udist.init_distributed(device or "auto").device
    else:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = udist.rank(), udist.world_size()
    main_rank = rank == 0
    plots_requested = plots  # every rank computes the sweep (a collective); rank 0 draws
    verbose, plots = verbose and main_rank, plots and main_rank
    out_dir_all, out_dir = out_dir, (out_dir if main_rank else None)
    head_kind = head or DEFAULT_HEAD[dataset]
    head_epochs = DEFAULT_HEAD_EPOCHS[dataset] if head_epochs is None else head_epochs
    sweep = list(DEFAULT_SWEEP[dataset] if sweep_eps is None else sweep_eps)
    # ImageFolder trees are read at the models' training size (the first model's; ResNets take any size)
    size = next((c.get("image_size") for _, c in models.values() if c.get("image_size")), None)
    train, test = splits if splits is not None else (load_split(dataset, "train", data_root, image_size=size),
                                                    load_split(dataset, "test", data_root, image_size=size))
    if n_test is not None and n_test < len(test.y):
        idx = balanced_subset(test.y, n_test, seed=seed)
        x_test, y_test = test.images(idx), test.y[idx]
    else:
        x_test, y_test = test.images(), test.y  # uint8 for ImageFolder trees: converted per batch
    n_sw = len(y_test) if sweep_n_test is None else min(sweep_n_test, len(y_test))
    x_sw, y_sw = x_test[:n_sw], y_test[:n_sw]
    settings = dict(samples=samples, attack_steps=attack_steps, alpha=alpha,
                    alpha_desc=("eps/10" if alpha is None else f"{alpha:g}"), eot_iter=eot_iter, apgd_steps=apgd_steps,
                    square_queries=square_queries, pgd_restarts=pgd_restarts,
                    n_test=len(y_test), sweep_n_test=n_sw, head=head_kind, head_epochs=head_epochs, head_lr=head_lr,
                    bounded_M=bounded_M, seed=seed, device=str(device), n_train=len(train.y))
    results: dict[str, Any] = dict(dataset=dataset, eps_list=eps_list, sweep_eps=sweep,
                                   label_budgets=[str(b) for b in budgets], settings=settings, models={})
    atk = dict(steps=attack_steps, alpha=alpha, eot_iter=eot_iter, batch_size=batch_size, seed=seed, device=device)

    def correct(clf: ProbabilisticClassifier, x, y, attack: Optional[str] = None, eps: float = 0.0,
                desc: str = "", **kw) -> torch.Tensor:
        """Per-image correctness [n] bool of the clean (attack None) or attacked prediction; under
        torchrun each rank takes whole batches and the flags are gathered to every rank."""
        sl, b0 = sharding.batch_shard(len(y), batch_size, rank, world)
        xs, ys = x[sl], y[sl]
        if attack is None:
            ok = predict(clf, xs, batch_size=batch_size, device=device) == ys.cpu()
        else:
            _, ok = robust_accuracy(clf, xs, ys, attack=attack, eps=eps, return_correct=True, desc=desc,
                                    first_batch=b0, **{**atk, **kw})
        return sharding.gather_rows(ok.to(torch.uint8), len(y), batch_size).bool()

    def acc_of(ok: torch.Tensor) -> float:
        return ok.float().mean().item() if len(ok) else 0.0

    def attack_all(clf: ProbabilisticClassifier, tag: str) -> dict:
        """clean, PGD, APGD (and Square) accuracy per eps; "both": correct under PGD and APGD, "worst": under
        every attack that ran (per sample, as AutoAttack counts an ensemble)."""
        r: dict[str, Any] = {"clean": acc_of(correct(clf, x_test, y_test)), "pgd": {}}
        survived = {}  # per eps: correct under every attack so far
        for e in eps_list:
            clf.reseed(seed + 1)
            survived[e] = correct(clf, x_test, y_test, "pgd", e, desc=f"{tag} PGD {e:.4g}", restarts=pgd_restarts)
            r["pgd"][str(e)] = acc_of(survived[e])
        # then APGD ("both": PGD & APGD) and the gradient-free Square ("worst": every attack that ran)
        extra = ([("apgd", "APGD", apgd_steps, "both", 2)] if apgd_steps else []) + \
            ([("square", "Square", square_queries, "worst", 3)] if square_queries else [])
        for key, label, n_steps, combined, seed_offset in extra:
            r[key], r[combined] = {}, {}
            for e in eps_list:
                clf.reseed(seed + seed_offset)
                ok = correct(clf, x_test, y_test, key, e, desc=f"{tag} {label} {e:.4g}", steps=n_steps)
                survived[e] = survived[e] & ok
                r[key][str(e)] = acc_of(ok)
                r[combined][str(e)] = acc_of(survived[e])
        return r

    def sweep_curve(clf: ProbabilisticClassifier, name: str) -> list[float]:
        return [acc_of(correct(clf, x_sw, y_sw, "pgd", e, desc=f"{name} sweep {e:.3g}")) for e in sweep]

    for name, (model, config) in models.items():
        t0 = time.time()
        model = model.to(device)
        was_training, flags = model.training, [p.requires_grad for p in model.parameters()]
        model.eval()  # restored after this model's evaluation
        for p in model.parameters():
            p.requires_grad_(False)
        cfg_ds = config.get("dataset")
        if cfg_ds and cfg_ds != dataset:
            warnings.warn(f"{name}: checkpoint was trained on {cfg_ds!r}, evaluating on {dataset!r}", stacklevel=2)
        entry: dict[str, Any] = dict(kind=model.kind, method=config.get("method"), config=config,
                                     checkpoint=(checkpoint_paths or {}).get(name), budgets={})
        curves: dict[str, dict] = {}
        if model.kind == "supervised":
            clf = ProbabilisticClassifier(model, None, bounded_M=bounded_M, seed=seed).to(device)
            r = attack_all(clf, name)
            for b in budgets:  # no head: the same numbers under every budget (trained with all labels)
                entry["budgets"][str(b)] = dict(n_labels=len(train.y), paths={"samples": r, "mu": r},
                                                note="supervised: no head, trained with all labels")
            if out_dir_all and plots_requested:
                curves["supervised"] = dict(eps=sweep, acc=sweep_curve(clf, name))
        else:
            # each rank encodes its share; rank 0 gathers the features, trains the heads, broadcasts them
            sl, _ = sharding.batch_shard(len(train.y), 512, rank, world)
            mu_tr, lv_tr = encode_dataset(model, train.subset(sl), batch_size=512, device=device,
                                          desc=f"{name} encode", num_workers=num_workers)
            mu_tr = sharding.gather_rows(mu_tr, len(train.y), 512, to_all=False)
            lv_tr = sharding.gather_rows(lv_tr, len(train.y), 512, to_all=False)
            for b in budgets:
                try:
                    idx = balanced_subset(train.y, b, seed=seed)
                except ValueError as exc:
                    warnings.warn(f"{name}: {exc}; budget skipped", stacklevel=2)
                    entry["budgets"][str(b)] = dict(skipped=str(exc))
                    continue
                h = train_head(mu_tr[idx], lv_tr[idx], train.y[idx], num_classes=train.num_classes, head_kind=head_kind,
                               epochs=head_epochs, lr=head_lr, seed=seed, desc=f"{name} head {b}") if main_rank else None
                h = sharding.broadcast_module(h).to(device)
                paths = {}
                for path in ("samples", "mu"):
                    clf = ProbabilisticClassifier(model, h, path=path, samples=samples, bounded_M=bounded_M,
                                                  seed=seed).to(device)
                    paths[path] = attack_all(clf, f"{name} {b} {path}")
                    if out_dir_all and plots_requested and b == budgets[0]:
                        curves[f"{'S=%d' % samples if path == 'samples' else 'z = mu'}, labels {b}"] = dict(
                            eps=sweep, acc=sweep_curve(clf, name))
                entry["budgets"][str(b)] = dict(n_labels=len(idx), paths=paths)
        entry["sweep"] = curves
        if plots and out_dir:
            from .evaluation.plots import plot_accuracy_vs_eps, plot_z_projection

            entry["plots"] = [plot_accuracy_vs_eps(curves, sweep, os.path.join(out_dir, f"accuracy_vs_eps_{_slug(name)}.png"),
                                                   f"{name} on {dataset}: PGD-{attack_steps}, n = {n_sw}")]
            if model.kind == "representation" and fig2_images > 0:
                k = min(fig2_images, len(x_test))
                fig_eps = next((e for e in eps_list if e > 0), DEFAULT_EPS[dataset][0])
                entry["plots"].append(plot_z_projection(
                    model, to_float01(x_test[:k].to(device)), y_test[:k], os.path.join(out_dir, f"zspace_{_slug(name)}.png"),
                    eps=fig_eps, steps=attack_steps, seed=seed,
                    title=f"{name}: 20 z samples per image (o) and per Urkle adversary (x), eps = {fig_eps:g}"))
        model.train(was_training)
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        entry["wall_s"] = round(time.time() - t0, 2)
        results["models"][name] = entry
        if verbose:
            print(f"[eval] {name}: done in {entry['wall_s']:.1f} s", flush=True)

    if plots and out_dir and results["models"]:
        from .evaluation.plots import plot_accuracy_vs_eps

        allc = {f"{n} ({k})": c for n, m in results["models"].items() for k, c in m["sweep"].items()}
        results["plots"] = [plot_accuracy_vs_eps(allc, sweep, os.path.join(out_dir, "accuracy_vs_eps.png"),
                                                 f"{dataset}: accuracy under PGD-{attack_steps}")]
    if out_dir:
        write_outputs(results, out_dir)
    if verbose:
        print(markdown_table(results), flush=True)
    return results


def evaluate_checkpoints(checkpoints: dict[str, str], *, dataset: str, data_root: str | None = None,
                         eps_list: list[float], out_dir: str, label_budgets=("all",), samples: int = 10,
                         attack_steps: int = 20, seed: int = 0, **kwargs) -> dict:
    """Train the downstream head per checkpoint, attack, write table.md / results.json / PNGs.

    checkpoints: {row name: path to a file written by urkle_fast.train}. dataset: one of
    "digits", "mnist", "cifar10", "cifar100", "folder"; data_root defaults to ../shared/data.
    eps_list: test epsilons in [0,1] pixel units. label_budgets: "all" and/or label counts
    (class-balanced, seeded). samples: S of paper Eq. 1. attack_steps: PGD steps (step eps/10).
    Further keywords (see ``evaluate_models``): alpha, eot_iter, apgd_steps (0 = off), square_queries (0 = off), pgd_restarts, n_test,
    sweep_eps, sweep_n_test, head ("linear"/"mlp3"), head_epochs, head_lr, bounded_M, batch_size,
    device, fig2_images, plots, verbose, num_workers.

    Returns the dict written to results.json: {"dataset", "eps_list", "settings", "label_budgets",
    "models": {name: {"kind", "budgets": {budget: {"paths": {"samples"|"mu": {"clean", "pgd": {eps: acc},
    "apgd": {eps: acc}}}}}, "sweep", "wall_s"}}} with accuracies in [0, 1].
    Raises FileNotFoundError (missing file), CheckpointError (unreadable file), ValueError (unknown dataset).
    """
    check_dataset(dataset)
    models = {}
    for name, path in checkpoints.items():
        models[name] = load_checkpoint(path)
    if data_root is None:
        data_root = next((c.get("data_root") for _, c in models.values() if c.get("data_root")), None)
    return evaluate_models(models, dataset=dataset, data_root=data_root, eps_list=eps_list, out_dir=out_dir,
                           label_budgets=label_budgets, samples=samples, attack_steps=attack_steps, seed=seed,
                           checkpoint_paths=dict(checkpoints), **kwargs)


@dataclass
class EvalConfig:
    checkpoint: list[str] = field(default_factory=list)
    name: list[str] = field(default_factory=list)
    dataset: Optional[str] = None
    data_root: Optional[str] = None
    eps: Optional[list[float]] = None
    out: str = "runs/eval"
    label_budgets: list[str] = field(default_factory=lambda: ["all"])
    samples: int = 10
    attack_steps: int = 20
    alpha: Optional[float] = None
    eot_iter: int = 1
    apgd_steps: int = 100
    square_queries: int = 0
    pgd_restarts: int = 1
    n_test: Optional[int] = None
    sweep_eps: Optional[list[float]] = None
    sweep_n_test: Optional[int] = 500
    head: Optional[str] = None
    head_epochs: Optional[int] = None
    head_lr: float = 1e-3
    bounded_M: Optional[float] = None
    batch_size: int = 256
    seed: int = 0
    device: Optional[str] = None
    num_workers: int = 2
    no_plots: bool = False


def parse_args(argv: Optional[Sequence[str]] = None) -> EvalConfig:
    p = argparse.ArgumentParser(prog="python -m urkle_fast.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", action="append", required=True, help="checkpoint file (repeat for several models)")
    p.add_argument("--name", action="append", default=[], help="row name per --checkpoint, in order (default: method)")
    p.add_argument("--dataset", choices=DATASETS, help="default: the first checkpoint's config")
    p.add_argument("--data-root", help="default: the checkpoint's data_root, else ../shared/data")
    p.add_argument("--eps", type=float, nargs="+", help="test epsilons; default per dataset (SPEC sec. 6)")
    p.add_argument("--out", default="runs/eval", help="output folder (default runs/eval)")
    p.add_argument("--label-budgets", nargs="+", default=["all"],
                   help="'all' and/or label counts, e.g. all 5000 1000 (default all)")
    p.add_argument("--samples", type=int, default=10, help="S, z samples averaged per prediction (default 10)")
    p.add_argument("--attack-steps", type=int, default=20, help="PGD steps (default 20)")
    p.add_argument("--alpha", type=float, help="PGD step (default eps/10)")
    p.add_argument("--eot-iter", type=int, default=1, help="forwards averaged per attack step (default 1)")
    p.add_argument("--apgd-steps", type=int, default=100, help="APGD-CE iterations; 0 disables (default 100)")
    p.add_argument("--square-queries", type=int, default=0,
                   help="Square Attack (gradient-free) queries per image; 0 disables (default 0; 1000-5000 to check "
                        "for gradient masking)")
    p.add_argument("--pgd-restarts", type=int, default=1,
                   help="PGD runs from different random starts; an image must survive all (default 1)")
    p.add_argument("--n-test", type=int, help="class-balanced seeded test subset (default: whole test set)")
    p.add_argument("--sweep-eps", type=float, nargs="+", help="epsilons of the accuracy-vs-eps plot")
    p.add_argument("--sweep-n-test", type=int, default=500, help="test images in the sweep (default 500)")
    p.add_argument("--head", choices=["linear", "mlp3"], help="default: mlp3 on MNIST, linear elsewhere")
    p.add_argument("--head-epochs", type=int, help="default: 10 on MNIST, 100 on digits, 30 elsewhere")
    p.add_argument("--head-lr", type=float, default=1e-3, help="Adam lr of the head (default 1e-3)")
    p.add_argument("--bounded-M", type=float, help="bounded softmax of paper footnote 1 (-log p <= M)")
    p.add_argument("--batch-size", type=int, default=256, help="attack batch (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--num-workers", type=int, default=2,
                   help="DataLoader workers decoding ImageFolder train splits for the features (default 2)")
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args(argv)
    return EvalConfig(**{k: v for k, v in vars(a).items()})


def main(argv: Optional[Sequence[str]] = None) -> dict:
    cfg = parse_args(argv)
    if os.environ.get("RANK", "0") not in ("", "0"):
        os.environ["TQDM_DISABLE"] = "1"  # under torchrun, progress bars from rank 0 only
    if cfg.name and len(cfg.name) != len(cfg.checkpoint):
        raise SystemExit(f"--name given {len(cfg.name)} times for {len(cfg.checkpoint)} --checkpoint")
    loaded, paths = {}, {}
    for i, path in enumerate(cfg.checkpoint):
        model, config = load_checkpoint(path)
        name = cfg.name[i] if cfg.name else (config.get("method") or os.path.splitext(os.path.basename(path))[0])
        base, k = name, 2
        while name in loaded:
            name, k = f"{base}-{k}", k + 1
        loaded[name], paths[name] = (model, config), path
    dataset = cfg.dataset or next(iter(loaded.values()))[1].get("dataset")
    if dataset is None:
        raise SystemExit("--dataset is required (the checkpoint does not name one)")
    check_dataset(dataset)
    data_root = cfg.data_root or next((c.get("data_root") for _, c in loaded.values() if c.get("data_root")), None)
    return evaluate_models(
        loaded, dataset=dataset, data_root=data_root, eps_list=cfg.eps or DEFAULT_EPS[dataset], out_dir=cfg.out,
        label_budgets=cfg.label_budgets, samples=cfg.samples, attack_steps=cfg.attack_steps, seed=cfg.seed,
        alpha=cfg.alpha, eot_iter=cfg.eot_iter, apgd_steps=cfg.apgd_steps, square_queries=cfg.square_queries,
        pgd_restarts=cfg.pgd_restarts, n_test=cfg.n_test, sweep_eps=cfg.sweep_eps,
        sweep_n_test=cfg.sweep_n_test, head=cfg.head, head_epochs=cfg.head_epochs, head_lr=cfg.head_lr,
        bounded_M=cfg.bounded_M, batch_size=cfg.batch_size, device=cfg.device, plots=not cfg.no_plots,
        num_workers=cfg.num_workers, checkpoint_paths=paths)


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
