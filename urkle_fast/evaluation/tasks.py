"""Downstream tasks: one frozen representation, several label sets (issue 10 item 5, "task-agnostic").

A task maps the dataset's class index to its own label. The head of each task is trained on the same
frozen features, without adversarial training; the attacks then target that task's prediction. The first
task of a dataset (its own classes) is the one supervised baselines were trained for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Task:
    name: str
    num_classes: int
    relabel: Callable[[torch.Tensor], torch.Tensor]  # class index [N] int64 -> task label [N] int64
    summary: str


_CIFAR10_VEHICLES = (0, 1, 8, 9)  # airplane, automobile, ship, truck; the other six classes are animals


def _identity(y: torch.Tensor) -> torch.Tensor:
    return y


_DIGIT_TASKS = {
    "digit": Task("digit", 10, _identity, "the digit, 10 classes"),
    "parity": Task("parity", 2, lambda y: y % 2, "odd (1) or even (0)"),
    "gt4": Task("gt4", 2, lambda y: (y > 4).long(), "digit > 4 (1) or not (0)"),
}
TASKS: dict[str, dict[str, Task]] = {"digits": _DIGIT_TASKS, "mnist": _DIGIT_TASKS}
TASKS["cifar10"] = {
    "class": Task("class", 10, _identity, "the CIFAR-10 class"),
    "animal_vehicle": Task("animal_vehicle", 2,
                           lambda y: 1 - torch.isin(y, torch.tensor(_CIFAR10_VEHICLES)).long(),
                           "animal (1) or vehicle (0)"),
}


def primary_task(dataset: str) -> str:
    """The dataset's own classes: the task supervised baselines are trained for."""
    return "digit" if dataset in ("digits", "mnist") else "class"


def get_task(dataset: str, name: str, num_classes: int) -> Task:
    """The task ``name`` of ``dataset`` (its own classes under the primary name for any dataset)."""
    if name == primary_task(dataset) and name not in TASKS.get(dataset, {}):
        return Task(name, num_classes, _identity, "the dataset's classes")
    known = TASKS.get(dataset, {})
    if name not in known:
        choices = sorted(set(known) | {primary_task(dataset)})
        raise ValueError(f"--tasks {name!r}: not a task of {dataset}; expected one of {choices}")
    return known[name]
