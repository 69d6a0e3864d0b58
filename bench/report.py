"""Markdown tables from a pytest-benchmark JSON file (``pytest bench/ --benchmark-only --benchmark-json F``).

    python bench/report.py F [F ...] [--title TITLE] [--stat median|min] [--write-json MERGED]

Several files (e.g. one pytest run per suite, as bench/gpu_check.sh does so that a time limit cannot take
every table with it) are read as one: their benchmarks concatenated, the first file's machine and date;
--write-json saves that merged file (atomically: a cut leaves the previous one whole).

One row per (op, mode, case): the median (or --stat min: the best) time of each variant (fused = the public op, eager = the
pure-torch reference, compiled = torch.compile of the reference), the ratios fused/eager and
fused/compiled of the medians (below 1: the fused op is faster), the fused op's GB/s or TFLOP/s and
each variant's peak extra memory of one call. A variant that did not run (skipped, e.g. out of memory)
shows "-".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import OrderedDict

VARIANTS = ("fused", "eager", "compiled")


def _ms(seconds):
    return "-" if seconds is None else f"{seconds * 1e3:.3f}"


def _mib(nbytes):
    return "-" if nbytes is None else f"{nbytes / 2**20:.1f}"


def _ratio(a, b):
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def load(*paths: str) -> dict:
    """One pytest-benchmark JSON, or several merged: benchmarks concatenated, the first file's other keys."""
    merged: dict = {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        if not merged:
            merged = data
        else:
            merged.setdefault("benchmarks", []).extend(data.get("benchmarks", []))
    return merged


def write_json(data: dict, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def rows(data: dict) -> "OrderedDict[tuple, dict]":
    """{(op, mode, case): {variant: {"median", "iqr", "rounds", "peak", "gbps", "tflops"}}}."""
    table: "OrderedDict[tuple, dict]" = OrderedDict()
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        key = (info.get("op", b.get("group", "?")), info.get("mode", ""), info.get("case", b.get("name", "")))
        variant = info.get("variant") or (b.get("params") or {}).get("variant", "?")
        st = b.get("stats", {})
        table.setdefault(key, {})[variant] = dict(
            median=st.get("median"), min=st.get("min"), iqr=st.get("iqr"), rounds=st.get("rounds"),
            peak=info.get("peak_mem_bytes"), gbps=info.get("gbps"), tflops=info.get("tflops"), img_per_s=info.get("img_per_s"),
            device_name=info.get("device_name"), torch=info.get("torch"))
    return table


def markdown(data: dict, title: str | None = None, stat: str = "median") -> str:
    table = rows(data)
    out = []
    if title:
        out += [f"### {title}", ""]
    devices = sorted({v["device_name"] for r in table.values() for v in r.values() if v.get("device_name")})
    torches = sorted({v["torch"] for r in table.values() for v in r.values() if v.get("torch")})
    machine = data.get("machine_info", {})
    out.append(f"Device: {', '.join(devices) or machine.get('cpu', {}).get('brand_raw', '?')}; "
               f"torch {', '.join(torches) or '?'}; python {machine.get('python_version', '?')}; "
               f"run {data.get('datetime', '?')}.")
    out.append("")
    out.append(f"Statistic: {stat} time per call.")
    out.append("")
    out.append("| op | mode | case | fused ms | eager ms | compiled ms | fused/eager | fused/compiled "
               "| fused throughput | peak MiB fused / eager / compiled |")
    out.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for (op, mode, case), r in table.items():
        med = {v: (r.get(v) or {}).get(stat) for v in VARIANTS}
        peak = {v: (r.get(v) or {}).get("peak") for v in VARIANTS}
        fused = r.get("fused") or {}
        # throughput was recorded over the median; rescale for another statistic
        rescale = (fused["median"] / med["fused"]) if fused.get("median") and med["fused"] else 1.0
        if fused.get("gbps") is not None:
            thr = f"{fused['gbps'] * rescale:.1f} GB/s"
        elif fused.get("img_per_s") is not None:
            thr = f"{fused['img_per_s'] * rescale:.0f} img/s"
        elif fused.get("tflops") is not None:
            tf = fused["tflops"] * rescale
            thr = f"{tf * 1e3:.1f} GFLOP/s" if tf < 1 else f"{tf:.2f} TFLOP/s"
        else:
            thr = "-"
        out.append(f"| {op} | {mode} | {case} | {_ms(med['fused'])} | {_ms(med['eager'])} | {_ms(med['compiled'])} "
                   f"| {_ratio(med['fused'], med['eager'])} | {_ratio(med['fused'], med['compiled'])} | {thr} "
                   f"| {_mib(peak['fused'])} / {_mib(peak['eager'])} / {_mib(peak['compiled'])} |")
    out.append("")
    out.append(f"Times: the {stat} over the rounds pytest-benchmark ran; ratios are of those (< 1: the fused "
               "op is faster). Peak memory: extra bytes of one call (outputs included), see bench/conftest.py.")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="pytest-benchmark JSON file(s), read as one")
    ap.add_argument("--title", default=None)
    ap.add_argument("--stat", default="median", choices=("median", "min"))
    ap.add_argument("--write-json", default=None, metavar="MERGED", help="also save the merged JSON there")
    args = ap.parse_args(argv)
    missing = [p for p in args.json if not os.path.isfile(p)]
    if missing:
        ap.error(f"json: no such file: {', '.join(missing)}")
    data = load(*args.json)
    table = markdown(data, args.title, args.stat)  # first: a file that cannot be tabulated is not written
    if args.write_json:
        write_json(data, args.write_json)
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
