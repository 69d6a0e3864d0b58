"""Markdown tables shaped like the paper's (rows = models; columns = clean / each epsilon) and JSON."""

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


def markdown_table(results: dict[str, Any]) -> str:
    """One table per (label budget, prediction path). Columns: clean, PGD at each eps, APGD at each eps."""
    eps_list = results["eps_list"]
    s = results["settings"]
    lines = [f"# Robust accuracy on {results['dataset']} (%, n_test = {s['n_test']})", ""]
    lines.append(
        f"White-box l_inf PGD: {s['attack_steps']} steps of {s['alpha_desc']}, random start"
        + (f" ({s['pgd_restarts']} restarts: correct only if every run fails)" if s.get("pgd_restarts", 1) > 1 else "")
        + ", model in eval mode, "
        f"cross-entropy of the averaged prediction over S = {s['samples']} z samples (EOT x{s['eot_iter']}). "
        + (f"APGD-CE: {s['apgd_steps']} steps; PGD&APGD: correct under both (per sample). " if s["apgd_steps"]
           else "APGD-CE: not run. ")
        + (f"Square (gradient-free): {s['square_queries']} queries; worst: correct under every attack. "
           if s.get("square_queries") else "")
        + (f"Bounded softmax M = {s['bounded_M']}. " if s.get("bounded_M") is not None else "")
        + "Supervised baselines have no head and no z: their row is the same in every table."
    )
    lines.append("")
    attacks = ["pgd"] + (["apgd", "both"] if s["apgd_steps"] else []) + \
        (["square", "worst"] if s.get("square_queries") else [])
    names = {"pgd": "PGD", "apgd": "APGD", "both": "PGD&APGD", "square": "Square", "worst": "worst"}
    for budget in results["label_budgets"]:
        for path, title in (("samples", f"prediction averaged over S = {s['samples']} samples"), ("mu", "z = mu")):
            lines.append(f"## Labels: {budget}; {title}")
            lines.append("")
            head = ["model", "clean"] + [f"{names[a]} {eps_label(e)}" for a in attacks for e in eps_list]
            lines.append("| " + " | ".join(head) + " |")
            lines.append("|" + " --- |" * len(head))
            for name, m in results["models"].items():
                b = m["budgets"].get(str(budget))
                if b is None or b.get("skipped"):
                    why = (b or {}).get("skipped", "not evaluated")
                    lines.append("| " + " | ".join([name] + ["n/a"] * (len(head) - 1)) + f" |")
                    continue
                r = b["paths"][path]
                row = [name, _pct(r["clean"])]
                for a in attacks:
                    row += [_pct(r.get(a, {}).get(str(e))) for e in eps_list]
                lines.append("| " + " | ".join(row) + " |")
            lines.append("")
    skipped = [(n, bb, v["skipped"]) for n, m in results["models"].items() for bb, v in m["budgets"].items() if v.get("skipped")]
    if skipped:
        lines.append("Skipped: " + "; ".join(f"{n} labels={bb}: {w}" for n, bb, w in skipped))
        lines.append("")
    return "\n".join(lines)


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
