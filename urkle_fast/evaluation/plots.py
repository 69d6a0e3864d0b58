"""PNG figures: accuracy vs epsilon, the paper's Figure 2 (2-D projection of sampled z), and training
curves from metrics.jsonl."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_eps(curves: dict[str, dict[str, Sequence[float]]], eps: Sequence[float], path: str,
                         title: str) -> str:
    """curves: {label: {"eps": [...], "acc": [...]}} (accuracy in [0,1]); writes one PNG."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    # curves that coincide (z = mu and S samples, or a robust and a broken model both at 0 %) would hide each
    # other: each gets its own line style and marker, drawn over the previous ones with a little transparency
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    for k, (label, c) in enumerate(curves.items()):
        ax.plot(c["eps"], [100 * a for a in c["acc"]], linestyle=styles[k % len(styles)],
                marker=markers[k % len(markers)], markersize=6 - min(3, k), alpha=0.85, lw=1.4, label=label,
                zorder=2 + k)
    ax.set_xlabel("l_inf epsilon (pixels in [0, 1])")
    ax.set_ylabel("accuracy under PGD (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def read_metrics(path) -> list[dict]:
    """The records of a run's metrics.jsonl (clear errors for a missing or empty file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {str(path)!r} does not exist (a run writes <out-dir>/metrics.jsonl)")
    recs = []
    for i, ln in enumerate(path.read_text().splitlines(), 1):
        if ln.strip():
            try:
                recs.append(json.loads(ln))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{str(path)!r} line {i} is not JSON: {exc}") from exc
    if not recs:
        raise ValueError(f"metrics file {str(path)!r} holds no records yet")
    return recs


def plot_training_curves(runs: dict[str, str], path: str, title: str = "") -> str:
    """runs: {label: metrics.jsonl path}. One panel per logged quantity (loss, each loss term, lr,
    images/s) against the step, every run in each panel; writes one PNG."""
    data = {label: read_metrics(p) for label, p in runs.items()}
    keys: list[str] = []
    for recs in data.values():
        for k in recs[-1]:
            if k not in ("step", "epoch") and k not in keys:
                keys.append(k)
    plt = _plt()
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), dpi=110, squeeze=False)
    for ax, k in zip(axes.flat, keys):
        for label, recs in data.items():
            pts = [(r["step"], r[k]) for r in recs if k in r]
            if pts:
                ax.plot(*zip(*pts), label=label, lw=1.2)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        vals = [r[k] for recs in data.values() for r in recs if k in r]
        if vals and min(vals) > 0 and max(vals) > 10 * min(vals):  # log only where it spans a decade
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def urkle_adversary(model, x: torch.Tensor, *, eps: float, steps: int = 20, alpha=None, seed: int = 0) -> torch.Tensor:
    """Unsupervised adversary of docs/MATH.md sec. 5: argmax_{x'} KL[p(z|x) || p(z|x')], p(z|x) fixed."""
    from urkle_fast.attack import pgd, urkle_kl

    return pgd(urkle_kl(model, x), x, eps=eps, alpha=eps / 10 if alpha is None else alpha, steps=steps,
               model=model, seed=seed)


def plot_z_projection(model, x: torch.Tensor, y: torch.Tensor, path: str, *, eps: float, n_z: int = 20,
                      steps: int = 20, seed: int = 0, title: str = "") -> str:
    """Figure 2: PCA to 2-D of n_z samples of z for each image (o) and for its Urkle adversary (x)."""
    plt = _plt()
    model.eval()
    x_adv = urkle_adversary(model, x, eps=eps, steps=steps, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        mu, lv = model.encode(x)
        mua, lva = model.encode(x_adv)
        z = mu.float().unsqueeze(1) + (0.5 * lv.float()).exp().unsqueeze(1) * torch.randn((len(x), n_z, mu.shape[1]), generator=g)
        za = mua.float().unsqueeze(1) + (0.5 * lva.float()).exp().unsqueeze(1) * torch.randn((len(x), n_z, mu.shape[1]), generator=g)
        allz = torch.cat([z.reshape(-1, z.shape[-1]), za.reshape(-1, z.shape[-1])])
        centre = allz.mean(0, keepdim=True)
        _, _, v = torch.pca_lowrank(allz - centre, q=2, center=False)
        p, pa = (z - centre) @ v, (za - centre) @ v
    fig, ax = plt.subplots(figsize=(5, 4.2), dpi=120)
    cmap = plt.get_cmap("tab10")
    for i in range(len(x)):
        ax.scatter(p[i, :, 0], p[i, :, 1], s=14, marker="o", color=cmap(i % 10), label=f"x (label {int(y[i])})")
        ax.scatter(pa[i, :, 0], pa[i, :, 1], s=18, marker="x", color=cmap(i % 10),
                   label="Urkle adversary (x)" if i == 0 else None)  # one legend entry, not one per image
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title or f"{n_z} samples of z per image (o) and per adversary (x), eps = {eps:g}", fontsize=8)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
