"""bench/gpu_check.sh's bench stage, run here with a stand-in for `python -m pytest bench/bench_<suite>.py` (the
GPU suites cannot run on this machine; report.py and the shell logic are the real ones): one pytest per suite,
most important first, each merged into bench.json and the report as it ends, an earlier run's tables not
merged in, a failed suite failing the stage, a time limit keeping what finished, and nothing else left in $OUT
(the device tool sends back every file there)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Stands in for `python -m pytest bench/bench_<suite>.py ... --benchmark-json F`: writes one benchmark row for
# the suite (fused and eager variants); `pgd` dies before writing (exit 1), `gaussian_kl` writes and fails,
# $SLOW_SUITE sleeps past the stage's limit. Anything else is the real python (report.py).
FAKE = r"""#!/usr/bin/env bash
if [ "$1" = "-m" ] && [ "$2" = "pytest" ]; then
  suite=$(basename "$3" .py); suite=${suite#bench_}
  echo "$suite" >> "$CALLS"
  [ "$suite" = "pgd" ] && exit 1
  [ "$suite" = "${SLOW_SUITE:-}" ] && exec sleep 30
  prev=""; json=""
  for a in "$@"; do [ "$prev" = "--benchmark-json" ] && json=$a; prev=$a; done
  row() { printf '{"name": "%s[%s]", "stats": {"median": %s, "min": %s, "iqr": 0, "rounds": 5}, "extra_info": {"op": "%s", "mode": "fwd", "case": "c", "variant": "%s", "device_name": "fake GPU", "torch": "t"}}' "$suite" "$1" "$2" "$2" "$suite" "$1"; }
  printf '{"machine_info": {}, "datetime": "now", "benchmarks": [%s, %s]}' "$(row fused 0.001)" "$(row eager 0.004)" > "$json"
  [ "$suite" = "gaussian_kl" ] && exit 1
  exit 0
fi
exec "$REAL_PY" "$@"
"""


def _run(tmp_path, **env):
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE)
    fake.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    (out / "bench.json").write_text(json.dumps({"benchmarks": [{"name": "stale", "stats": {}, "extra_info": {
        "op": "stale_from_an_earlier_run"}}]}))
    calls = tmp_path / "calls"
    full_env = dict(os.environ, PYTHON=str(fake), REAL_PY=sys.executable, OUT=str(out), CALLS=str(calls), **env)
    t0 = time.time()
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "bench"], env=full_env, capture_output=True,
                          text=True, timeout=120)
    return proc, out, calls.read_text().split(), time.time() - t0


def _ops(out):
    return [b["extra_info"]["op"] for b in json.loads((out / "bench.json").read_text())["benchmarks"]]


def test_each_suite_is_merged_as_it_ends_and_a_failure_fails_the_stage(tmp_path):
    proc, out, calls, _ = _run(tmp_path)
    suites = sorted(p.stem[len("bench_"):] for p in (ROOT / "bench").glob("bench_*.py"))
    assert calls[:4] == ["nt_xent", "gaussian_kl", "pgd", "train_step"] and sorted(calls) == suites
    assert proc.returncode != 0  # pgd and gaussian_kl failed
    # every suite that wrote its JSON, in order, twice (fused, eager); not pgd's, not the stale run's
    expected = [s for s in calls if s != "pgd"]
    assert _ops(out) == [s for s in expected for _ in range(2)]
    report = (out / "report.md").read_text()
    assert "### stage bench: exit 1" in report
    for s in expected:
        assert f"| {s} | fwd | c | 1.000 | 4.000 | - | 0.25 | - |" in report
    assert "stale_from_an_earlier_run" not in report
    assert sorted(os.listdir(out)) == ["bench.json", "logs.tar", "report.md"]


def test_a_time_limit_keeps_the_suites_that_finished(tmp_path):
    proc, out, calls, seconds = _run(tmp_path, SLOW_SUITE="train_step", LIMIT_bench="4")
    assert seconds < 25
    assert proc.returncode != 0
    assert calls == ["nt_xent", "gaussian_kl", "pgd", "train_step"]
    assert _ops(out) == ["nt_xent", "nt_xent", "gaussian_kl", "gaussian_kl"]
    report = (out / "report.md").read_text()
    assert "exit 124" in report and "| nt_xent | fwd | c |" in report and "| gaussian_kl | fwd | c |" in report
    assert sorted(os.listdir(out)) == ["bench.json", "logs.tar", "report.md"]
