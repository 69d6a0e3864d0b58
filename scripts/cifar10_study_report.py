"""The CIFAR-10 CPU study's report (scripts/cifar10_cpu_study.sh, stage "report"): the paper's Table 2 layout
(clean / 8/255 / 16/255 per label budget, worst case over every attack with 95% Wilson intervals, beside the
paper's numbers), the held-out beta choice, the ordering of SimCLR, RoCL and SimCLR+Urkle, Proposition 1, the
animal-vs-vehicle task, training speed, wall times, and accuracy against eps as a picture.

    python scripts/cifar10_study_report.py runs/cifar10_cpu --seeds 0 1 --out results/cifar10_cpu

Reads the study's results.json files, and with --prior an earlier report's summary.json for the cells the study
folder lacks (marked †; its evaluation settings must match); a cell that has neither says why. Writes table.md,
summary.json (committed; with the per-image bits, a few hundred bytes a cell, so that a later --prior can still
pair), accuracy_vs_eps.png and (with more than one label budget) worst_vs_labels.png into --out."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

EPS = ("0.031372549", "0.062745098")  # 8/255, 16/255 as the study passes them
PAPER = {"SimCLR+Urkle": (82.31, 42.56, 14.29), "RoCL": (83.71, 40.27, 9.55)}  # docs/PROTOCOL.md, full labels
REPRESENTATION = ("simclr_urkle", "rocl", "simclr")
SUPERVISED = ("trades", "at", "standard")
NAME = {"simclr_urkle": "SimCLR+Urkle", "rocl": "RoCL", "simclr": "SimCLR", "trades": "TRADES", "at": "AT",
        "standard": "Standard"}


def _load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _entry(results, task: str, budget: str):
    """(the model's entry for this task and budget, its kind) from one evaluation of one model."""
    m = next(iter(results["models"].values()))
    t = m.get("tasks", {}).get(task) or {}
    return t.get("budgets", {}).get(budget), m.get("kind")


def _cell(paths: dict, path: str, fingerprint=None) -> dict:
    r = paths[path]
    cell = dict(clean=r["clean"], clean_ci=r["clean_ci"], worst={e: r["worst"].get(e) for e in EPS},
                worst_ci={e: r["worst_ci"].get(e) for e in EPS})
    if fingerprint and "ok_bits" in r:  # per-image results (evaluations since eval.ok_bits): paired comparisons
        cell["paired"] = dict(fingerprint=fingerprint, bits={e: r["ok_bits"]["worst"].get(e) for e in EPS})
    return cell


def _headline(paths: dict, fingerprint=None) -> dict:
    """The row's headline cell: the S-sample prediction, or z = mu for a deterministic encoder (whose "samples"
    path only notes that it is the same)."""
    return _cell(paths, "samples" if "note" not in paths["samples"] else "mu", fingerprint)


def _unpack(bits: str, n: int) -> list[bool]:
    """eval.unpack_ok without torch: the n images' bits from the hex string."""
    return [bool(byte >> (7 - i) & 1) for byte in bytes.fromhex(bits) for i in range(8)][:n]


def paired_difference(a: list[bool], b: list[bool]) -> tuple[float, float, float, int, int]:
    """a's accuracy minus b's on the same images, with the Agresti-Min 95% interval for matched proportions
    (Wald on the 2x2 table with 0.5 added to each cell, clipped to [-1, 1]; Agresti & Min 2005): (difference, low,
    high, images only a
    gets right, images only b gets right). Sharper than comparing two unpaired intervals, because the images
    both models get right (or wrong) cancel."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired images: {len(a)} and {len(b)}")
    n = len(a)
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    na, nb, m = only_a + 0.5, only_b + 0.5, n + 2
    d = (na - nb) / m
    half = 1.959964 * ((na + nb) - (na - nb) ** 2 / m) ** 0.5 / m
    return (only_a - only_b) / n, max(-1.0, d - half), min(1.0, d + half), only_a, only_b


def _fmt(v, ci) -> str:
    return "—" if v is None else f"{100 * v:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _run_dirs(out: Path, seed: int, method: str, budget: str) -> Path:
    """The folder of one evaluation in the study's layout."""
    if method == "simclr_urkle":
        chosen = (out / f"select_s{seed}" / "chosen.txt")
        run = chosen.read_text().strip() if chosen.is_file() else None
        if run is None:
            return out / f"select_s{seed}" / "missing"
        return out / (f"eval_{run}" if budget == "all" else f"eval_{run}_{budget}")
    if method in REPRESENTATION:
        return out / (f"eval_{method}_s{seed}" if budget == "all" else f"eval_{method}_s{seed}_{budget}")
    return out / (f"eval_{method}_s{seed}" if budget == "all" else f"eval_{method}_{budget}_s{seed}")


def collect(out: Path, seeds: list[int], budgets: list[str]) -> dict:
    rows = []
    last_status = {step: rc for step, _, rc in _tries(out)}  # the last try of each step
    for s in seeds:
        for method in REPRESENTATION + SUPERVISED:
            for b in budgets:
                d = _run_dirs(out, s, method, b)
                r = _load(d / "results.json")
                row = dict(seed=s, method=method, name=NAME[method], budget=b, folder=str(d))
                if r is None:
                    rc = last_status.get(d.name)  # the study names each step's log and folder alike
                    # the model's training step: eval_<run> (all labels, supervised budgets) or eval_<run>_<budget>
                    run = d.name.removeprefix("eval_")
                    run = run.rsplit("_", 1)[0] if method in REPRESENTATION and b != "all" else run
                    why = ("the held-out beta choice has not run" if d.name == "missing" else
                           f"failed (exit {rc}): logs/{d.name}.log" if rc not in (None, "0") else
                           "evaluation started, not finished" if d.is_dir() else
                           "trained; evaluation not run yet" if last_status.get(f"train_{run}") == "0" else
                           "model not trained yet")
                    rows.append(dict(row, missing=why))
                    continue
                e, kind = _entry(r, "class", b)
                if e is None:
                    rows.append(dict(row, missing="no entry for this budget in " + str(d / "results.json")))
                    continue
                paths = e["paths"]
                row["n_test"] = r["settings"]["n_test"]
                row["wall_s"] = next(iter(r["models"].values())).get("wall_s")
                row["config"] = {k: next(iter(r["models"].values()))["config"].get(k)
                                 for k in ("beta_robust", "train_subset", "epochs", "pgd_steps", "label_budget")}
                fp = r["settings"].get("test_fingerprint")
                row["headline"] = _headline(paths, fp)
                if "note" not in paths["samples"]:
                    row["z_mu"] = _cell(paths, "mu", fp)
                rows.append(row)
    return dict(rows=rows, settings=_settings(out, seeds), select=_select(out, seeds), bound=_bound(out, seeds),
                tasks=_tasks(out, seeds), times=_times(out), speed=_speed(out, seeds))


def fill_from_prior(summary: dict, prior: dict, methods, source: str) -> int:
    """Fill the cells the study folder lacks from an earlier report's summary (``prior``), for ``methods`` only:
    a machine that lost the study's folder keeps what its committed report measured, and a method whose earlier
    numbers a correction superseded is left out of ``methods`` so that its cells say what is missing instead.
    Rows, task rows, and (with simclr_urkle) the beta choice and Proposition 1 of seeds the study lacks; each
    filled entry carries prior=True (the table marks it). Pairing survives where that report kept per-image bits.
    Returns how many table rows were filled."""
    methods = set(methods)
    mine, theirs = summary["settings"], prior.get("settings", {})
    differ = sorted(k for k in set(mine) & set(theirs) if mine[k] is not None and theirs[k] is not None
                    and mine[k] != theirs[k])
    if differ:  # cells of two evaluation protocols in one table would read as one
        raise ValueError(f"the evaluations differ in {', '.join(f'{k} ({mine[k]!r} here, {theirs[k]!r} there)' for k in differ)}")
    old = {(r["seed"], r["method"], r["budget"]): r for r in prior.get("rows", []) if "missing" not in r}
    filled = 0
    for i, r in enumerate(summary["rows"]):
        p = old.get((r["seed"], r["method"], r["budget"]))
        if "missing" in r and r["method"] in methods and p is not None:
            summary["rows"][i] = dict(p, prior=True)
            filled += 1
    seeds = {r["seed"] for r in summary["rows"]}
    method_of = {v: k for k, v in NAME.items()}
    have = {(t["seed"], t["name"], t["task"]) for t in summary["tasks"]}
    summary["tasks"] += [dict(t, prior=True) for t in prior.get("tasks", [])
                         if t["seed"] in seeds and method_of.get(t["name"]) in methods
                         and (t["seed"], t["name"], t["task"]) not in have]
    if "simclr_urkle" in methods:
        for key in ("select", "bound"):
            done = {e["seed"] for e in summary[key]}
            summary[key] += [dict(e, prior=True) for e in prior.get(key, []) if e["seed"] in seeds - done]
    if not summary["settings"]:
        summary["settings"] = prior.get("settings", {})
    if filled or any(e.get("prior") for k in ("tasks", "select", "bound") for e in summary[k]):
        summary["prior"] = dict(source=source, methods=sorted(methods))
    return filled


def _settings(out: Path, seeds) -> dict:
    for s in seeds:
        for d in sorted(out.glob(f"eval_*_s{s}")):
            r = _load(d / "results.json")
            if r:
                return {k: r["settings"].get(k) for k in ("n_test", "attack_steps", "apgd_steps", "apgd_targets",
                                                          "square_queries", "eot_iter", "samples", "redraws",
                                                          "cascade", "head", "head_epochs")}
    return {}


def _select(out: Path, seeds) -> list[dict]:
    rows = []
    for s, d, r in _found(out, seeds, "select_b*_s{seed}"):
        chosen = out / f"select_s{s}" / "chosen.txt"
        name, m = next(iter(r["models"].items()))
        beta = name.split("=")[1]
        p = m["tasks"]["class"]["budgets"]["all"]["paths"]
        rows.append(dict(seed=s, beta=beta, n=r["settings"]["n_test"], samples=_cell(p, "samples"), z_mu=_cell(p, "mu"),
                         chosen=chosen.is_file() and chosen.read_text().strip() == f"urkle_b{beta}_s{s}"))
    return rows


def _found(out: Path, seeds, pattern: str):
    """(seed, folder, results) of every finished evaluation whose folder matches pattern.format(seed=s)."""
    for s in seeds:
        for d in sorted(out.glob(pattern.format(seed=s))):
            r = _load(d / "results.json")
            if r:
                yield s, d, r


def _bound(out: Path, seeds) -> list[dict]:
    rows = []
    for s, d, r in _found(out, seeds, "bound_urkle_b*_s{seed}"):
        b = next(iter(r["models"].values()))["tasks"]["class"]["budgets"]["all"].get("bound", {})
        rows += [dict(seed=s, run=d.name, **v) for v in b.values()]
    return rows


def _tasks(out: Path, seeds) -> list[dict]:
    rows = []
    for s, _, r in _found(out, seeds, "tasks_*_s{seed}"):
        name, m = next(iter(r["models"].items()))
        for task, t in m.get("tasks", {}).items():
            e = t.get("budgets", {}).get("all")
            if e:
                p = e["paths"]
                rows.append(dict(seed=s, name=name, task=task, n_test=r["settings"]["n_test"],
                                 headline=_headline(p, r["settings"].get("test_fingerprint"))))
    return rows


def _speed(out: Path, seeds) -> list[dict]:
    """Each training's median images/s over the steps its log (metrics.jsonl) recorded: the training step's
    measured cost, one thread, while the study's other lanes shared the cores."""
    import statistics

    rows = []
    for s in seeds:
        for d in sorted(out.glob(f"*_s{s}")):
            cfg, log = _load(d / "config.json"), d / "metrics.jsonl"
            if cfg is None or not log.is_file():
                continue
            v = [x for line in log.read_text().splitlines() if line.strip()
                 if (x := json.loads(line).get("img_per_s"))]
            if v:
                rows.append(dict(seed=s, run=d.name, method=cfg.get("method"), arch=cfg.get("arch"),
                                 pgd_steps=cfg.get("pgd_steps"), img_per_s=statistics.median(v), logged=len(v)))
    return rows


def _tries(out: Path) -> list[tuple[str, int, str]]:
    """(step, wall s, exit status) per row of the study's times.tsv, in order."""
    f = out / "times.tsv"
    rows = [line.split("\t") for line in f.read_text().splitlines()] if f.is_file() else []
    return [(p[0], int(p[1]), p[2] if len(p) > 2 else "0") for p in rows if len(p) >= 2]


def _times(out: Path) -> dict:
    t = {}
    for step, secs, _ in _tries(out):  # a step resumed after an interruption: its tries add up
        t[step] = t.get(step, 0) + secs
    return t


def newcombe_difference(p1: float, ci1, p2: float, ci2) -> tuple[float, float, float]:
    """p1 - p2 for two proportions measured on different images (or by evaluations without per-image results),
    with Newcombe's hybrid score 95% interval built from their two Wilson intervals (Newcombe 1998, method 10),
    clipped to [-1, 1]. Sharper than asking whether the two intervals are apart, which is a test at about the
    0.5% level rather than 5%."""
    d = p1 - p2
    lo = d - ((p1 - ci1[0]) ** 2 + (ci2[1] - p2) ** 2) ** 0.5
    hi = d + ((ci1[1] - p1) ** 2 + (p2 - ci2[0]) ** 2) ** 0.5
    return d, max(-1.0, lo), min(1.0, hi)


def _compare(ra: dict, rb: dict, eps: str) -> dict:
    """Row a's worst case minus row b's at eps with its 95% interval: paired (Agresti-Min) when both evaluations
    kept per-image results on the same test images (the same fingerprint), else Newcombe's from the two Wilson
    intervals."""
    ha, hb = ra["headline"], rb["headline"]
    pa, pb = ha.get("paired"), hb.get("paired")
    if pa and pb and pa["fingerprint"] == pb["fingerprint"] and pa["bits"][eps] and pb["bits"][eps]:
        n = ra["n_test"]
        d, lo, hi, only_a, only_b = paired_difference(_unpack(pa["bits"][eps], n), _unpack(pb["bits"][eps], n))
        return dict(d=d, lo=lo, hi=hi, paired=True, n=n, only_a=only_a, only_b=only_b)
    d, lo, hi = newcombe_difference(ha["worst"][eps], ha["worst_ci"][eps], hb["worst"][eps], hb["worst_ci"][eps])
    return dict(d=d, lo=lo, hi=hi, paired=False)


def _verdict(c: dict) -> str:
    """'>' / '<' when the difference's 95% interval lies above / below 0, '≈' otherwise."""
    return ">" if c["lo"] > 0 else "<" if c["hi"] < 0 else "≈"


def _diff(c: dict) -> str:
    return f"{100 * c['d']:+.1f} [{100 * c['lo']:+.1f}, {100 * c['hi']:+.1f}]"


def _representations(rows: list[dict], seed: int, budget: str) -> dict:
    return {r["name"]: r for r in rows
            if r["seed"] == seed and r["budget"] == budget and "headline" in r and r["method"] in REPRESENTATION}


def _evaluated_at(got: dict, eps: str) -> bool:
    return all(r["headline"]["worst"][eps] is not None and r["headline"]["worst_ci"][eps] is not None
               for r in got.values())


def _ordering(rows: list[dict], seed: int, eps: str, budget: str = "all", got: Optional[dict] = None,
              what: str = "") -> str:
    """The three representations from the most robust down at eps, each step with its difference's interval.
    got: {name: row} to order instead of the class rows of this seed and budget (the task's rows)."""
    got = _representations(rows, seed, budget) if got is None else got
    what = what or f"labels {budget}"
    if len(got) < 3:
        return f"seed {seed}, {what}: not all three representation models are evaluated yet"
    if not _evaluated_at(got, eps):
        return f"seed {seed}, {what}, {_eps_label(eps)}: not every model was evaluated at this eps"
    h = {name: r["headline"] for name, r in got.items()}
    order = sorted(h, key=lambda n: -h[n]["worst"][eps])
    parts = []
    for a, b in zip(order, order[1:]):
        c = _compare(got[a], got[b], eps)
        how = (f"paired, same {c['n']} images: {_diff(c)} points; {c['only_a']} right only for {a}, {c['only_b']} "
               f"only for {b}" if c["paired"] else f"unpaired: {_diff(c)} points")
        parts.append(f"{a} {_verdict(c)} {b} ({how})")  # a is the more robust: never '<'
    desc = ", ".join(f"{n} {_fmt(h[n]['worst'][eps], h[n]['worst_ci'][eps])}" for n in order)
    return (f"seed {seed}, {what}, {_eps_label(eps)}: " + "; ".join(parts) + f" ({desc}; '>' when the 95% "
            f"interval of the difference excludes 0: paired where both evaluations kept per-image results, else "
            f"Newcombe's from the two Wilson intervals; '≈' otherwise)")


# the paper's claim, SimCLR << RoCL <= SimCLR+Urkle, as two differences
CLAIM = (("SimCLR+Urkle", "RoCL"), ("RoCL", "SimCLR"))


def _across_seeds(rows: list[dict], seeds: list[int], eps: str, budget: str) -> str:
    """Each claimed difference in every seed that has all three representations at this budget and eps, and
    whether the seeds agree. One seed's interval is test-sampling noise only; the spread between seeds adds the
    training's."""
    per_seed = {s: got for s in seeds
                if len(got := _representations(rows, s, budget)) == 3 and _evaluated_at(got, eps)}
    head = f"labels {budget}, {_eps_label(eps)}"
    if len(per_seed) < 2:
        return f"{head}: {len(per_seed)} seed(s) with all three representations evaluated; needs 2"
    parts = []
    for a, b in CLAIM:
        cs = {s: _compare(got[a], got[b], eps) for s, got in per_seed.items()}
        each = ", ".join(f"seed {s} {_diff(c)}{'' if c['paired'] else ' unpaired'}" for s, c in cs.items())
        verdicts = {_verdict(c) for c in cs.values()}
        mean = sum(c["d"] for c in cs.values()) / len(cs)
        agree = (f"'{verdicts.pop()}' in every seed" if len(verdicts) == 1 else
                 "the seeds disagree (" + ", ".join(f"seed {s} '{_verdict(c)}'"
                                                    for s, c in cs.items()) + ")")
        parts.append(f"{a} - {b}: {each}; mean {100 * mean:+.1f} points; {agree}")
    return f"{head}: " + "; ".join(parts)


def _supervised_vs_urkle(rows: list[dict], seed: int, eps: str, budget: str) -> Optional[str]:
    """AT and TRADES (labels, the same training images) against SimCLR+Urkle at one seed, budget and eps: each
    difference with its interval (paired where both kept per-image results). None when SimCLR+Urkle's row is
    not evaluated; a model not evaluated yet is left out of the line."""
    got = {r["method"]: r for r in rows if r["seed"] == seed and r["budget"] == budget and "headline" in r
           and r["headline"]["worst"].get(eps) is not None}
    u = got.get("simclr_urkle")
    if u is None:
        return None
    parts = []
    for m in ("at", "trades"):
        if m in got:
            c = _compare(got[m], u, eps)
            parts.append(f"{NAME[m]} - SimCLR+Urkle {_diff(c)}{'' if c['paired'] else ' unpaired'} '{_verdict(c)}'")
    return f"seed {seed}, labels {budget}, {_eps_label(eps)}: " + "; ".join(parts) if parts else None


def _mu_vs_rocl(rows: list[dict], seed: int, eps: str, budget: str) -> Optional[str]:
    """SimCLR+Urkle's z = mu path against RoCL: both deterministic, so this comparison rests on the attacks of
    deterministic predictions alone (the S-sample prediction's EOT attacks and redraw rule play no part). None
    until both rows are evaluated at eps."""
    got = {r["method"]: r for r in rows if r["seed"] == seed and r["budget"] == budget and "headline" in r}
    u, rocl = got.get("simclr_urkle"), got.get("rocl")
    if u is None or rocl is None or "z_mu" not in u or u["z_mu"]["worst"].get(eps) is None \
            or rocl["headline"]["worst"].get(eps) is None:
        return None
    c = _compare(dict(u, headline=u["z_mu"]), rocl, eps)
    how = f"paired: {c['only_a']} images right only for z = mu, {c['only_b']} only for RoCL" if c["paired"] else "unpaired"
    return (f"seed {seed}, labels {budget}, {_eps_label(eps)}: SimCLR+Urkle (z = mu) - RoCL {_diff(c)} '{_verdict(c)}' "
            f"({how}; {_fmt(u['z_mu']['worst'][eps], u['z_mu']['worst_ci'][eps])} against "
            f"{_fmt(rocl['headline']['worst'][eps], rocl['headline']['worst_ci'][eps])})")


def _eps_label(e: str) -> str:
    return f"{round(float(e) * 255)}/255"


def markdown(summary: dict, budgets: list[str]) -> str:
    s, rows = summary["settings"], summary["rows"]
    lines = ["# CIFAR-10 at CPU scale: worst-case robust accuracy (%, 95% Wilson intervals)", ""]
    if s:
        lines += [f"{s['n_test']} class-balanced test images; per image the worst case over PGD-{s['attack_steps']}, "
                  f"APGD-CE, APGD-T ({s['apgd_targets']} targets), Square ({s['square_queries']} queries) on the "
                  f"z = mu path and classifiers; PGD, APGD-CE, APGD-DLR (EOT {s['eot_iter']}), Square and every "
                  f"z = mu adversary on SimCLR+Urkle's S = {s['samples']} prediction; {s['apgd_steps']} APGD "
                  f"iterations; run as AutoAttack runs it (each attack on the images still right)"
                  f"{'' if s.get('cascade') else ' [cascade off]'}. Representation rows: a {s['head']} head on the "
                  f"frozen features of all 50,000 / 5000 / 1000 labelled training images. Supervised rows: the "
                  f"classifier itself, trained on the study's training subset ('all') or on 5000 / 1000 labelled "
                  f"images for at least as many optimiser steps (whole epochs of the same batch) with the same warm-up "
                  f"steps.", ""]
    head = ["method", "seed", "labels", "clean", "8/255", "16/255", "paper (clean / 8 / 16, all labels)"]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        paper = " / ".join(f"{v:.2f}" for v in PAPER[r["name"]]) if r["name"] in PAPER and r["budget"] == "all" \
            else ("not quoted in docs/PROTOCOL.md" if r["budget"] == "all" else "")
        label = r["name"] + (f" (beta {r['config']['beta_robust']:g}, S = {s.get('samples')})"
                             if r["method"] == "simclr_urkle" and "config" in r else "") + (" †" if r.get("prior") else "")
        if "missing" in r:
            lines.append(f"| {label} | {r['seed']} | {r['budget']} | {r['missing']} | — | — | {paper} |")
            continue
        h = r["headline"]
        lines.append(f"| {label} | {r['seed']} | {r['budget']} | {_fmt(h['clean'], h['clean_ci'])} | "
                     + " | ".join(_fmt(h["worst"][e], h["worst_ci"][e]) for e in EPS) + f" | {paper} |")
        if "z_mu" in r:
            z = r["z_mu"]
            lines.append(f"| {r['name']} (z = mu){' †' if r.get('prior') else ''} | {r['seed']} | {r['budget']} | "
                         f"{_fmt(z['clean'], z['clean_ci'])} | "
                         + " | ".join(_fmt(z["worst"][e], z["worst_ci"][e]) for e in EPS) + " | |")
    if summary.get("prior"):
        pr = summary["prior"]
        lines += ["", f"† from {pr['source']}, an earlier report of this study (methods {', '.join(pr['methods'])}): "
                      f"measured by a run whose folder is not here. Compared paired where that report kept per-image "
                      f"results, else unpaired."]
    # the paper's claim is about every label budget: the gap widens at 16/255 and with fewer labels
    lines += ["", "## Ordering of the representations (worst case, per seed and label budget)", ""]
    for seed in sorted({r["seed"] for r in rows}):
        for b in budgets:
            lines += list(dict.fromkeys(f"- {_ordering(rows, seed, e, b)}" for e in EPS))  # once when not evaluated
    seeds = sorted({r["seed"] for r in rows})
    if len(seeds) > 1:
        lines += ["", "## Across seeds (each seed's difference in points with its 95% interval; '>' when it excludes "
                  "0; one seed's interval holds the test images' noise, the spread between seeds the training's)", ""]
        lines += [f"- {_across_seeds(rows, seeds, e, b)}" for b in budgets for e in EPS]
    mu = [line for s in seeds for b in budgets for e in EPS if (line := _mu_vs_rocl(rows, s, e, b))]
    if mu:
        lines += ["", "## SimCLR+Urkle's z = mu path against RoCL (both deterministic: no EOT attack or redraw rule "
                  "enters; difference in points, 95% interval)", ""]
        lines += [f"- {line}" for line in mu]
    versus = [line for s in seeds for b in budgets for e in EPS if (line := _supervised_vs_urkle(rows, s, e, b))]
    if versus:
        lines += ["", "## The supervised adversarial models against SimCLR+Urkle (difference in points, 95% "
                  "interval; '>' / '<' when it excludes 0)", ""]
        lines += [f"- {line}" for line in versus]
    if summary["select"]:
        lines += ["", "## SimCLR+Urkle's beta, chosen on held-out training images (worst case at 8/255)", "",
                  "| seed | beta | n | S = 10 clean | S = 10 worst 8/255 | z = mu worst 8/255 | chosen |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in summary["select"]:
            lines.append(f"| {r['seed']}{' †' if r.get('prior') else ''} | {r['beta']} | {r['n']} | {_fmt(r['samples']['clean'], r['samples']['clean_ci'])}"
                         f" | {_fmt(r['samples']['worst'][EPS[0]], r['samples']['worst_ci'][EPS[0]])} | "
                         f"{_fmt(r['z_mu']['worst'][EPS[0]], r['z_mu']['worst_ci'][EPS[0]])} | "
                         f"{'yes' if r['chosen'] else ''} |")
    if summary["bound"]:
        lines += ["", "## Proposition 1 (SimCLR+Urkle, bounded heads)", "",
                  "| seed | eps | M | term1 | term2 (max KL) | RHS | LHS | holds | vacuous | violations / pairs |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for b in summary["bound"]:
            lines.append(f"| {b['seed']}{' †' if b.get('prior') else ''} | {_eps_label(str(b['eps']))} | {b['M']:g} | {b['term1']:.3f} | "
                         f"{b['term2']:.3f} | {b['rhs']:.3f} | {b['lhs']:.3f} | {b['holds']} | {b['vacuous']} | "
                         f"{b['violations']} / {b['checked_pairs']} |")
    tasks = [t for t in summary["tasks"] if t["task"] == "animal_vehicle"]  # the class task is the headline row
    if tasks:
        # one frozen representation, two heads: the 10 classes (the headline row) and animal vs vehicle
        lines += ["", "## One representation, two tasks (all labels; worst case)", "",
                  "6 of the 10 classes are animals: on the class-balanced test images a head that always answers "
                  "'animal' scores 60% clean and 60% under every attack, the floor the animal-vs-vehicle columns "
                  "are read against.", "",
                  "| method | seed | class: clean | class: 8/255 | class: 16/255 | animal vs vehicle: clean | "
                  "animal vs vehicle: 8/255 | animal vs vehicle: 16/255 |", "|" + " --- |" * 8]
        for t in tasks:
            h = t["headline"]
            c = next((r["headline"] for r in rows if r["name"] == t["name"] and r["seed"] == t["seed"]
                      and r["budget"] == "all" and "headline" in r), None)
            cls = (["not evaluated yet"] + ["—"] * len(EPS) if c is None else
                   [_fmt(c["clean"], c["clean_ci"])] + [_fmt(c["worst"][e], c["worst_ci"][e]) for e in EPS])
            lines.append(f"| {t['name']}{' †' if t.get('prior') else ''} | {t['seed']} | " + " | ".join(cls) + f" | {_fmt(h['clean'], h['clean_ci'])} | "
                         + " | ".join(_fmt(h["worst"][e], h["worst_ci"][e]) for e in EPS) + " |")
        lines.append("")
        for seed in sorted({t["seed"] for t in tasks}):
            got = {t["name"]: t for t in tasks if t["seed"] == seed}
            lines += list(dict.fromkeys(f"- {_ordering([], seed, e, got=got, what='animal vs vehicle')}"
                                        for e in EPS))
    if summary.get("speed"):
        lines += ["", "## Training speed (median images/s over each training's logged steps, one thread)", "",
                  "| run | method | encoder | PGD steps | img/s | logged steps |", "| --- | --- | --- | --- | ---: | ---: |"]
        lines += [f"| {r['run']} | {r['method']} | {r['arch']} | {r['pgd_steps']} | {r['img_per_s']:.1f} | "
                  f"{r['logged']} |" for r in summary["speed"]]
    if summary["times"]:
        lines += ["", "## Wall times (s, one core each; summed over the tries of a resumed step)", "",
                  "| step | s |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in summary["times"].items()]
        if any(k.startswith("superseded_") for k in summary["times"]):
            lines += ["", "superseded_*: the tries of runs that a later correction of the protocol replaced (their "
                          "folders are kept under superseded/ in the study's folder); not part of any table above."]
    return "\n".join(lines) + "\n"


def _style(method: str, seed: int) -> dict:
    """One look per row in every plot: a method keeps its colour and marker, a seed its line style."""
    m = (REPRESENTATION + SUPERVISED).index(method)
    return dict(color=f"C{m}", linestyle=["-", "--", ":", "-."][seed % 4], marker="os^DvP"[m % 6], markersize=5,
                capsize=3, alpha=0.9)


def plot(summary: dict, path: str) -> None:
    """Accuracy against eps per method (all labels): clean, then the worst case over every attack at 8/255 and
    16/255, each with its 95% interval. (Not eval's PGD sweep: on an ImageFolder test set its first
    --sweep-n-test images of the class-sorted subset are one or two classes.)"""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in summary["rows"]:
        if r["budget"] != "all" or "headline" not in r:
            continue
        h = r["headline"]
        pts = [(h["clean"], h["clean_ci"])] + [(h["worst"][e], h["worst_ci"][e]) for e in EPS]
        # Wilson bounds of 0 % or 100 % can sit a rounding error past the point: clipped at 0
        ax.errorbar([0] + [255 * float(e) for e in EPS], [100 * v for v, _ in pts],
                    yerr=[[max(0.0, 100 * (v - ci[0])) for v, ci in pts], [max(0.0, 100 * (ci[1] - v)) for v, ci in pts]],
                    label=f"{r['name']} (seed {r['seed']})", **_style(r["method"], r["seed"]))
    ax.set_xlabel("l_inf eps (x 1/255)")
    ax.set_ylabel("accuracy (%)")
    ax.set_xticks([0] + [255 * float(e) for e in EPS])
    ax.set_title("CIFAR-10, CPU scale: clean and worst case over every attack (95% intervals)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_budgets(summary: dict, budgets: list[str], path: str) -> None:
    """The worst case at 8/255 and at 16/255 against the label budget, one line per method and seed, with 95%
    intervals: the paper's claim that SimCLR+Urkle's lead over RoCL grows as labels get fewer. A cell that has
    not run is left out of its line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(EPS), figsize=(11, 3.8), dpi=120, sharey=False)
    series = sorted({(r["method"], r["seed"]) for r in summary["rows"]},
                    key=lambda m: ((REPRESENTATION + SUPERVISED).index(m[0]), m[1]))
    for ax, e in zip(axes, EPS):
        for method, seed in series:
            got = [(budgets.index(r["budget"]), r["headline"]) for r in summary["rows"]
                   if r["method"] == method and r["seed"] == seed and "headline" in r and r["budget"] in budgets]
            if not got:
                continue
            got.sort(key=lambda t: t[0])
            v = [100 * h["worst"][e] for _, h in got]
            lo = [max(0.0, 100 * (h["worst"][e] - h["worst_ci"][e][0])) for _, h in got]
            hi = [max(0.0, 100 * (h["worst_ci"][e][1] - h["worst"][e])) for _, h in got]
            ax.errorbar([i for i, _ in got], v, yerr=[lo, hi], label=f"{NAME[method]} (seed {seed})",
                        **_style(method, seed))
        ax.set_xticks(range(len(budgets)))
        ax.set_xticklabels(budgets)
        ax.set_xlabel("labels")
        ax.set_ylabel("worst-case accuracy (%)")
        ax.set_title(f"{_eps_label(e)}", fontsize=9)
        ax.grid(alpha=0.3)
    # beside the panels, not over them: with two seeds the legend covers the 8/255 panel's 1000-label points
    axes[-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle("CIFAR-10, CPU scale: worst case over every attack against the label budget (95% intervals)",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("study", help="the study's output folder (OUT of scripts/cifar10_cpu_study.sh)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--budgets", nargs="+", default=["all", "5000", "1000"])
    p.add_argument("--out", required=True, help="folder for table.md, summary.json and the plots")
    p.add_argument("--prior", help="an earlier report's summary.json: the cells this study folder lacks are filled "
                                   "from it (marked †), for --prior-methods only")
    p.add_argument("--prior-methods", nargs="+", default=list(REPRESENTATION + SUPERVISED),
                   choices=REPRESENTATION + SUPERVISED, metavar="METHOD",
                   help=f"the methods whose cells --prior may fill (default: all of {', '.join(REPRESENTATION + SUPERVISED)});"
                        f" leave out one whose earlier numbers a correction has superseded")
    a = p.parse_args(argv)
    out = Path(a.study)
    if not out.is_dir():
        print(f"error: {a.study} is not a folder (the study's OUT)", file=sys.stderr)
        return 2
    prior = None
    if a.prior:
        try:
            prior = json.loads(Path(a.prior).read_text())
            assert isinstance(prior, dict) and isinstance(prior.get("rows"), list)
        except (OSError, ValueError, AssertionError) as exc:
            print(f"error: --prior {a.prior}: not a report's summary.json ({exc or 'no rows'})", file=sys.stderr)
            return 2
    summary = collect(out, a.seeds, a.budgets)
    if prior is not None:
        try:
            n = fill_from_prior(summary, prior, a.prior_methods, a.prior)
        except ValueError as exc:
            print(f"error: --prior {a.prior}: {exc}", file=sys.stderr)
            return 2
        print(f"--prior: {n} row(s) filled from {a.prior}", file=sys.stderr)
    os.makedirs(a.out, exist_ok=True)
    for r in summary["rows"]:
        r.pop("folder", None)
    # the summary keeps the per-image bits (a few hundred bytes a cell): a later report given it as --prior can
    # still pair its rows with new ones after the study's folder is gone
    table = markdown(summary, a.budgets)
    Path(a.out, "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    Path(a.out, "table.md").write_text(table)
    plot(summary, os.path.join(a.out, "accuracy_vs_eps.png"))
    if len(a.budgets) > 1:
        plot_budgets(summary, a.budgets, os.path.join(a.out, "worst_vs_labels.png"))
    print(Path(a.out, "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
