"""``python -m urkle_fast.evaluation.merge A/results.json B/results.json ... --out DIR``: one table from
evaluations run separately (one per model, as scripts/reproduce_mnist.sh does), rows in --order.

Refuses files whose dataset, eps or attack settings differ (their numbers would not be comparable); the
test subsets must be the same too (n_test and seed are part of the settings). One row name may come from
several files when they hold different label budgets or tasks of the same model kind and method (the
classifiers trained on 5000 and 1000 labels, for example)."""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from urkle_fast.evaluation.report import markdown_table, write_outputs

# what must agree for two evaluations to share a table (the device and head-training details may differ)
COMPARABLE = ("samples", "attack_steps", "alpha", "eot_iter", "apgd_steps", "apgd_targets", "square_queries",
              "transfer", "redraws", "pgd_restarts", "n_test", "seed", "bounded_M", "head")


def _join(into: dict, other: dict, name: str) -> None:
    """One row name from two evaluations (a classifier per label budget, say): the same kind and method, and
    no (task, budget) evaluated twice."""
    if (into.get("kind"), into.get("method")) != (other.get("kind"), other.get("method")):
        raise ValueError(f"model {name!r} names two different models ({into.get('method')} and "
                         f"{other.get('method')}); rename one (--name)")
    for task, t in other.get("tasks", {}).items():
        mine = into.setdefault("tasks", {}).setdefault(task, {"budgets": {}})
        twice = set(mine.get("budgets", {})) & set(t.get("budgets", {}))
        if twice:
            raise ValueError(f"model {name!r}, task {task}: labels {sorted(twice)} evaluated in two results files")
        mine.setdefault("budgets", {}).update(t.get("budgets", {}))
        if t.get("skipped") and not mine["budgets"]:
            mine["skipped"] = t["skipped"]
        elif mine["budgets"]:
            mine.pop("skipped", None)
    into["budgets"] = {**into.get("budgets", {}), **other.get("budgets", {})}


def merge(parts: Sequence[dict], order: Sequence[str] = ()) -> dict:
    if not parts:
        raise ValueError("nothing to merge: give at least one results.json")
    parts = copy.deepcopy(list(parts))  # _join fills the first file's entries: the caller's dicts stay as they were
    first = parts[0]
    for p in parts[1:]:
        if (p["dataset"], p["eps_list"]) != (first["dataset"], first["eps_list"]):
            raise ValueError(f"cannot merge {p['dataset']} at eps {p['eps_list']} with {first['dataset']} at eps "
                             f"{first['eps_list']}")
        differ = [k for k in COMPARABLE if p["settings"].get(k) != first["settings"].get(k)]
        if bool(p["settings"].get("cascade")) != bool(first["settings"].get("cascade")):
            differ.append("cascade (the attack columns mean different things)")
        if differ:
            raise ValueError(f"cannot merge evaluations whose settings differ: {', '.join(differ)}")
    # the same n_test and seed draw the same subset of the same files; the fingerprint (pixels and labels) also
    # catches another copy of the data or another image size (evaluations older than it have none)
    prints = {p["settings"].get("test_fingerprint") for p in parts} - {None}
    if len(prints) > 1:
        raise ValueError(f"cannot merge evaluations whose settings differ: test_fingerprint (not the same test "
                         f"images: {', '.join(sorted(prints))})")
    merged = dict(first, models={}, label_budgets=[], tasks=[])
    if prints:
        merged["settings"] = dict(first["settings"], test_fingerprint=prints.pop())
    for p in parts:
        for name, m in p["models"].items():
            if name in merged["models"]:
                _join(merged["models"][name], m, name)
            else:
                merged["models"][name] = m
        merged["label_budgets"] += [b for b in p["label_budgets"] if b not in merged["label_budgets"]]
        merged["tasks"] += [t for t in p.get("tasks") or [] if t not in merged["tasks"]]
    rank = {n: i for i, n in enumerate(order)}
    merged["models"] = dict(sorted(merged["models"].items(), key=lambda kv: rank.get(kv[0], len(rank))))
    return merged


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m urkle_fast.evaluation.merge", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="results.json files written by urkle_fast.eval")
    p.add_argument("--order", nargs="*", default=[], help="row names in this order first")
    p.add_argument("--out", required=True, help="folder for the merged table.md and results.json")
    args = p.parse_args(argv)
    try:
        parts = [json.loads(Path(f).read_text()) for f in args.results]
        merged = merge(parts, args.order)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_outputs(merged, args.out)
    print(markdown_table(merged))
    return 0


if __name__ == "__main__":
    sys.exit(main())
