"""Markdown tables (rows = models and prediction paths; columns = clean / each epsilon) and JSON."""

from __future__ import annotations

import json
import os
from typing import Any


def eps_label(eps: float) -> str:
    """"8/255" when eps is a multiple of 1/255 without a short decimal form (CIFAR), else the decimal."""
    k = eps * 255
    if eps > 0 and round(eps, 3) != eps and abs(k - round(k)) < 1e-6:
        return f"{int(round(k))}/255"
    return f"{eps:g}"


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def _with_ci(v, ci) -> str:
    return "n/a" if v is None else f"{100 * v:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


NAMES = {"pgd": "PGD", "apgd": "APGD-CE", "apgd-dlr": "APGD-DLR", "apgd-t": "APGD-T", "square": "Square",
         "transfer": "transfer from z=mu"}


def _settings_text(s: dict) -> str:
    eot = s.get("eot_iter", 1)
    return (f"Attacks per prediction path, l_inf, model in eval mode, per-image worst case (an image counts only if "
            f"it survives every attack that ran; 95% Wilson intervals). z = mu path and classifiers (deterministic): "
            f"PGD-{s['attack_steps']} (step {s['alpha_desc']}, random start"
            + (f", {s['pgd_restarts']} restarts: correct only if every run fails" if s.get("pgd_restarts", 1) > 1 else "")
            + f"), APGD-CE and APGD-T "
            f"({s.get('apgd_targets', 0)} targets) with {s['apgd_steps']} iterations, Square with "
            f"{s.get('square_queries', 0)} queries (AutoAttack's standard ensemble without FAB-T, plus PGD). S-sample prediction "
            f"(S = {s['samples']}, paper Eq. 1): PGD, APGD-CE and APGD-DLR with EOT over {eot} forwards per step "
            f"(AutoAttack's rand version), Square, and every adversary of the z = mu path (transfer); an adversary "
            f"of a stochastic prediction fools only if most of {s.get('redraws', 1)} fresh predictions are wrong "
            f"(redraw avg: the share of fresh predictions still right under each image's worst attack). "
            f"APGD-DLR needs 3 classes and APGD-T 4: a 2-class task runs without them (its attack columns say which "
            f"ran)."
            + (" Run as AutoAttack runs it (--cascade): each attack only on the images every earlier attack of the "
               "path left correct, so each attack column is the accuracy left after it (on the S-sample path after "
               "the z = mu path's adversaries as well, which are scored on it first) and the last equals the worst "
               "case; no transfer column and no redraw average (an image stops being attacked once fooled)."
               if s.get("cascade") else "")
            + (f" Bounded softmax M = {s['bounded_M']}." if s.get("bounded_M") is not None else ""))


def _entries(results: dict, task: str, budget: str):
    """(model name, budget entry or None, why not) for every model."""
    for name, m in results["models"].items():
        t = m.get("tasks", {}).get(task) if "tasks" in m else ({"budgets": m.get("budgets", {})}
                                                                 if task == results.get("tasks", [task])[0] else None)
        if t is None or t.get("skipped"):
            yield name, None, (t or {}).get("skipped", "not evaluated")
            continue
        b = t["budgets"].get(str(budget))
        if b is None and m.get("kind") == "supervised" and len(t["budgets"]) == 1:
            continue  # a classifier trained on another label budget: reported in that budget's table only
        yield name, (None if b is None or b.get("skipped") else b), (b or {}).get("skipped", "not evaluated")


def markdown_table(results: dict[str, Any]) -> str:
    """Per task and label budget: the headline table (clean and worst case with its interval per eps, both
    prediction paths), then every attack's accuracy (the columns the worst case is taken over)."""
    eps_list, s = results["eps_list"], results["settings"]
    lines = [f"# Robust accuracy on {results['dataset']} (%, n_test = {s['n_test']})", "", _settings_text(s), ""]
    budgets = list(results["label_budgets"])
    for m in results["models"].values():  # classifiers trained on a label budget the command did not list
        for t in m.get("tasks", {}).values():
            budgets += [b for b in t.get("budgets", {}) if b not in budgets and m.get("kind") == "supervised"]
    for task in results.get("tasks") or [None]:
        for budget in budgets:
            rows = list(_entries(results, task, budget))
            if not rows:
                continue
            lines += [f"## Task {task}, labels {budget}: worst case over every attack", ""]
            head = ["model", "path", "clean"] + [f"worst {eps_label(e)}" for e in eps_list] + \
                [f"redraw avg {eps_label(e)}" for e in eps_list]
            lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
            for name, b, why in rows:
                if b is None:
                    lines.append("| " + " | ".join([name, why] + ["n/a"] * (len(head) - 2)) + " |")
                    continue
                single = "note" in b["paths"]["samples"]  # a classifier, or a deterministic encoder: one prediction
                for path in (("mu",) if single else ("mu", "samples")):
                    r = b["paths"][path]
                    label = "z = mu" if path == "mu" else f"S = {s['samples']}"
                    if single:
                        supervised = results["models"][name].get("kind") == "supervised"
                        label = "classifier" if supervised else "z = mu (deterministic)"
                    row = [name, label, _with_ci(r["clean"], r.get("clean_ci", (r["clean"],) * 2))]
                    row += [_with_ci(r.get("worst", {}).get(str(e)), r.get("worst_ci", {}).get(str(e), (0, 0)))
                            for e in eps_list]
                    row += [_pct(r.get("redraw_avg", {}).get(str(e))) for e in eps_list]
                    lines.append("| " + " | ".join(row) + " |")
            lines += ["", f"Every attack (task {task}, labels {budget}):", ""]
            attacks = [a for a in NAMES if any(b and a in p for _, b, _ in rows if b for p in b["paths"].values())]
            head = ["model", "path"] + [f"{NAMES[a]} {eps_label(e)}" for a in attacks for e in eps_list]
            lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
            for name, b, _ in rows:
                if b is None:
                    continue
                for path in ("mu", "samples"):
                    r = b["paths"][path]
                    if path == "samples" and "note" in r:
                        continue
                    label = "z = mu" if path == "mu" else f"S = {s['samples']}"
                    if "note" in b["paths"]["samples"]:
                        label = "classifier" if results["models"][name].get("kind") == "supervised" else "z = mu"
                    row = [name, label]
                    row += [_pct(r.get(a, {}).get(str(e))) if a in r else "-" for a in attacks for e in eps_list]
                    lines.append("| " + " | ".join(row) + " |")
            lines.append("")
            lines += _bound_table(rows, task, budget)
    return "\n".join(lines)


def _bound_table(rows, task, budget) -> list[str]:
    """Proposition 1 per model and eps (losses in nats; RHS = term1 + M / sqrt(2) * sqrt(term2))."""
    found = [(name, b["bound"]) for name, b, _ in rows if b and b.get("bound")]
    if not found:
        return []
    lines = [f"Proposition 1 (task {task}, labels {budget}; bounded loss, M = {found[0][1][next(iter(found[0][1]))]['M']:g}):",
             "", "| model | eps | term1 E[-log p~(y|z)] | term2 max KL | RHS | LHS (attacks) | LHS <= RHS | vacuous "
             "(RHS >= M) | per-example violations |", "|" + " --- |" * 9]
    for name, per_eps in found:
        for e, r in per_eps.items():
            lines.append(f"| {name} | {eps_label(float(e))} | {r['term1']:.3f} | {r['term2']:.3f} | {r['rhs']:.3f} | "
                         f"{r['lhs']:.3f} | {'yes' if r['holds'] else 'NO'} | {'yes' if r['vacuous'] else 'no'} | "
                         f"{r['violations']} of {r['checked_pairs']} |")
    return lines + [""]


def write_outputs(results: dict[str, Any], out_dir: str) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    md = markdown_table(results)
    md_path = os.path.join(out_dir, "table.md")
    with open(md_path, "w") as f:
        f.write(md + "\n")
    js_path = os.path.join(out_dir, "results.json")
    with open(js_path, "w") as f:
        json.dump(results, f, indent=2, default=str)
    return md_path, js_path
