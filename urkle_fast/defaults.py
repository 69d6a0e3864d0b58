"""Per-dataset defaults: ONE table, read by the trainer, the evaluator, their ``--help`` and the README.

Where the paper gives a value (its hyper-parameter table: CIFAR-10 ResNet-18, CIFAR-100 and ImageNet
ResNet-50, batch 1024 / 4096, 2000 / 200 epochs, eps 8/255 and 2/255; MNIST eps 0.1 and a 3-layer
head) this table has it; ``source`` says which rows are our own choice. tests/test_defaults.py
checks the README's table against this one, so the two cannot drift apart again.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class DatasetDefaults:
    arch: str  # encoder backbone (urkle_fast.models)
    epochs: int
    batch: int  # the global training batch
    train_eps: float  # l_inf radius of the training attacks, in [0, 1] pixels
    test_eps: tuple[float, ...]  # the evaluation's table columns
    sweep: tuple[float, ...]  # the accuracy-vs-eps plot; it ends where an undefended model is at ~0
    head: str  # downstream classifier: linear, or mlp3 (three FC layers with BN + ReLU, the paper's MNIST head)
    head_epochs: int
    source: str  # where the numbers come from


_CIFAR_SWEEP = (0.0, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 32 / 255, 64 / 255)

DEFAULTS: dict[str, DatasetDefaults] = {
    # 8x8 scikit-learn digits, the built-in default job: no paper number, every value our choice
    "digits": DatasetDefaults("digits_conv", 100, 256, 0.15, (0.1, 0.2), (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75),
                              "linear", 100, "ours"),
    # the paper's MNIST table: eps 0.1 train and test, the 3-layer head; epochs and batch ours
    "mnist": DatasetDefaults("mnist_conv", 100, 256, 0.1, (0.1,), (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75),
                             "mlp3", 10, "paper (eps, head); epochs, batch ours"),
    "cifar10": DatasetDefaults("resnet18", 2000, 1024, 8 / 255, (8 / 255, 16 / 255), _CIFAR_SWEEP,
                               "linear", 30, "paper"),
    "cifar100": DatasetDefaults("resnet50", 2000, 1024, 8 / 255, (8 / 255, 16 / 255), _CIFAR_SWEEP,
                                "linear", 30, "paper"),
    # any ImageFolder tree: ImageNet's settings at a smaller batch and budget
    "folder": DatasetDefaults("resnet50", 100, 256, 2 / 255, (2 / 255,), _CIFAR_SWEEP, "linear", 30, "ours"),
    "imagenet": DatasetDefaults("resnet50", 200, 4096, 2 / 255, (2 / 255,),
                                (0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 32 / 255), "linear", 30, "paper"),
}
DATASETS = tuple(DEFAULTS)


def defaults_for(dataset: str) -> DatasetDefaults:
    """The row of ``dataset``; a ValueError that lists the datasets otherwise."""
    if dataset not in DEFAULTS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    return DEFAULTS[dataset]


def _eps(e: float) -> str:
    """0.1 as 0.1, 8/255 as 8/255."""
    short, n = f"{e:g}", e * 255
    return f"{round(n)}/255" if len(short) > 5 and abs(n - round(n)) < 1e-6 else short


def markdown_table() -> str:
    """The table as Markdown (the README embeds exactly this text)."""
    cols = ["dataset", "arch", "epochs", "batch", "train eps", "test eps", "head", "source"]
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, d in DEFAULTS.items():
        rows.append(f"| {name} | {d.arch} | {d.epochs} | {d.batch} | {_eps(d.train_eps)} | "
                    f"{', '.join(_eps(e) for e in d.test_eps)} | {d.head} ({d.head_epochs} epochs) | {d.source} |")
    return "\n".join(rows)


def help_for(field: str) -> str:
    """'digits 100, mnist 100, ...' for one column, for a flag's --help text."""
    assert field in {f.name for f in fields(DatasetDefaults)}, field
    show = {"train_eps": _eps, "test_eps": lambda t: "/".join(_eps(e) for e in t)}.get(field, str)
    return ", ".join(f"{name} {show(getattr(d, field))}" for name, d in DEFAULTS.items())
