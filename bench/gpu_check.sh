#!/usr/bin/env bash
# One script for a lent GPU machine (torch 2.11, triton 3.6, no DALI, nothing installable, no network).
#
#   OUT=/some/dir bash bench/gpu_check.sh [STAGE...]      (from anywhere; it cds to the repository root)
#
# A session gets 15 minutes of GPU time in all, machine start-up included. So: two calls of at most 6 minutes
# each, the most important results first (device tool: timeout_s 400 each, on the same warm machine; the
# in-place build stays between calls):
#
#   OUT=$OUT bash bench/gpu_check.sh env build tests amp        # call 1: the GPU test suite and item 1's check
#   OUT=$OUT bash bench/gpu_check.sh bench train bandwidth      # call 2: op benchmarks, one trainer run
#
# Stages (default: all of them, in this order):
#   env        versions, GPU, nvcc
#   build      python setup.py build_ext --inplace (CUDA kernels when nvcc is there)
#   tests      pytest -m gpu tests/                        (+ $OUT/tests.xml)
#   amp        the Urkle KL under bf16 autocast vs float32 (the Gaussian head stays float32;
#              GPU_CHECK_DEVICE=cpu dry-runs it)
#   bench      pytest bench/bench_<suite>.py --benchmark-only, one suite at a time (nt_xent first), merged
#              as each ends: fused vs eager vs torch.compile   (+ $OUT/bench.json)
#   train      the trainer on CUDA (compile, bf16, channels_last), whole batch and --micro-batch
#              (run folders under /tmp; GPU_CHECK_DEVICE=cpu dry-runs it)
#   bandwidth  big tensor copy, GB/s
# Each stage runs under its own time limit (LIMIT_<stage> seconds; defaults below, chosen so that each call
# above fits in 6 minutes) and, as soon as it ends, appends its table and a summary line to $OUT/report.md
# and its log to $OUT/logs.tar: a call cut short still returns everything measured before the cut. At most
# five files come back (report.md, tests.xml, bench.json, logs.tar, and nothing else), within the device
# tool's limits. The exit status is non-zero when any stage failed or ran out of time (exit 124).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python}
OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT"

export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export TRITON_INTERPRET=0  # tests/conftest.py defaults it to 1 for CPU-only machines
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$ROOT/.torchinductor}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}  # nothing is pip-installed there: import from the tree

STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(env build tests amp bench train bandwidth)
declare -A LIMIT=([env]=${LIMIT_env:-30} [build]=${LIMIT_build:-150} [tests]=${LIMIT_tests:-150} [amp]=${LIMIT_amp:-40}
                  [bench]=${LIMIT_bench:-210} [train]=${LIMIT_train:-100} [bandwidth]=${LIMIT_bandwidth:-30})
export BENCH_MAX_TIME=${BENCH_MAX_TIME:-0.2}  # seconds of timing per benchmark (pytest-benchmark's --benchmark-max-time)
status=0
[ -f "$OUT/report.md" ] || printf '# GPU check\n\n' > "$OUT/report.md"

run_stage() {  # run_stage NAME: its function under its limit, then its table, summary line and log are kept
  local name=$1 t0=$SECONDS rc
  echo "== $name (limit ${LIMIT[$name]} s)"
  timeout --kill-after=10 "${LIMIT[$name]}" bash -c "$(declare -f "stage_$name"); stage_$name" > "$OUT/$name.log" 2>&1
  rc=$?
  [ $rc -ne 0 ] && status=1
  {
    echo "### stage $name: exit $rc after $((SECONDS - t0)) s$([ $rc -eq 124 ] && echo " (time limit ${LIMIT[$name]} s)")"
    echo
    [ -f "$OUT/$name.md" ] && cat "$OUT/$name.md" && echo
  } >> "$OUT/report.md"
  rm -rf "$OUT/$name.md" "$OUT/.${name}_tmp"  # a stage's temporaries, also when its time limit cut it
  (cd "$OUT" && tar rf logs.tar "$name.log" && rm -f "$name.log")
  echo "   exit $rc after $((SECONDS - t0)) s"
  return $rc
}
export PY OUT ROOT

stage_env() {
  {
    echo "## Environment"
    echo
    echo '```'
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1
    "$PY" - <<'PYEOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton: not importable:", exc)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("GPU", p.name, f"{p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, cc {p.major}.{p.minor}")
PYEOF
    "$CUDA_HOME/bin/nvcc" --version 2>&1 | tail -2
    echo '```'
  } > "$OUT/env.md" 2>&1
}

stage_build() {
  "$PY" setup.py build_ext --inplace && "$PY" - <<'PYEOF'
from urkle_fast import _C
print("urkle_fast._C: WITH_CUDA =", _C.WITH_CUDA, "| CPU_CAPABILITY =", getattr(_C, "CPU_CAPABILITY", "?"))
PYEOF
}

stage_tests() {
  "$PY" -m pytest -m gpu tests/ -q -rfEs -p no:cacheprovider --junitxml="$OUT/tests.xml"
  local rc=$?
  "$PY" - "$OUT/tests.xml" > "$OUT/tests.md" <<'PYEOF'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
print("## GPU tests (pytest -m gpu tests/)\n")
print("| tests | passed | failed | errors | skipped |\n|---:|---:|---:|---:|---:|")
passed = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
print(f"| {tot['tests']} | {passed} | {tot['failures']} | {tot['errors']} | {tot['skipped']} |\n")
bad = [(c.get("classname"), c.get("name"), (c.find("failure") if c.find("failure") is not None else c.find("error")))
       for s in suites for c in s.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
for cls, name, el in bad:
    msg = (el.get("message") or "").splitlines()[0][:200] if el is not None else ""
    print(f"- FAILED {cls}::{name}: {msg}")
PYEOF
  return $rc
}

stage_bandwidth() {
  "$PY" bench/bandwidth.py --device cuda > "$OUT/bandwidth.md"
}

stage_bench() {
  # one pytest per suite, most important first, each merged into bench.json and bench.md as it ends:
  # pytest-benchmark writes its JSON only when a session ends, so one session under the stage's time limit
  # would lose every table to a cut. Temporaries live in $OUT/.bench_tmp (the same filesystem: each mv is
  # an atomic rename), which run_stage removes however the stage ended.
  local rc=0 suite tmp="$OUT/.bench_tmp" order=(nt_xent gaussian_kl pgd train_step) f
  rm -rf "$tmp" "$OUT/bench.json" "$OUT/bench.md" && mkdir -p "$tmp"  # an earlier run's tables are not merged in
  for f in bench/bench_*.py; do  # then any other suite, so that a new one is not left out
    f=${f#bench/bench_}; f=${f%.py}
    [[ " ${order[*]} " == *" $f "* ]] || order+=("$f")
  done
  for suite in "${order[@]}"; do
    rm -f "$tmp/part.json"
    "$PY" -m pytest "bench/bench_$suite.py" --benchmark-only --benchmark-json "$tmp/part.json" -q \
      --benchmark-max-time="$BENCH_MAX_TIME" || rc=$?
    [ -f "$tmp/part.json" ] || continue  # a suite that ran nothing (e.g. CPU-only) or died before writing
    local merged=("$tmp/part.json")
    [ -f "$OUT/bench.json" ] && merged=("$OUT/bench.json" "$tmp/part.json")
    if "$PY" bench/report.py "${merged[@]}" --write-json "$tmp/bench.json" --title "GPU benchmarks" > "$tmp/bench.md"; then
      mv "$tmp/bench.json" "$OUT/bench.json" && mv "$tmp/bench.md" "$OUT/bench.md"
    else
      rc=1
    fi
  done
  return $rc
}

stage_train() {
  local runs=${TMPDIR:-/tmp}/urkle_gpu_train rc=0
  rm -rf "$runs"
  for variant in "whole:" "micro:--micro-batch 64"; do
    local name=${variant%%:*} extra=${variant#*:}
    # shellcheck disable=SC2086
    "$PY" -m urkle_fast.train --dataset digits --device "${GPU_CHECK_DEVICE:-cuda}" --batch 256 --epochs 4 --max-steps 20 --log-every 5 \
      --num-workers 0 --no-progress --out-dir "$runs/$name" $extra || rc=$?
  done
  "$PY" - "$runs" > "$OUT/train.md" <<'PYEOF'
import json, pathlib, sys
print("## Trainer on CUDA (digits, batch 256, 20 steps, compile + bf16 + channels_last)\n")
print("| run | steps | last loss | img/s (last log window) |\n|---|---:|---:|---:|")
for d in sorted(pathlib.Path(sys.argv[1]).iterdir()):
    recs = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if l.strip()] \
        if (d / "metrics.jsonl").exists() else []
    if recs:
        print(f"| {d.name} | {recs[-1]['step']} | {recs[-1]['loss']:.4f} | {recs[-1]['img_per_s']:.0f} |")
    else:
        print(f"| {d.name} | - | - | - |")
PYEOF
  return $rc
}

stage_amp() {
  "$PY" - "${GPU_CHECK_DEVICE:-cuda}" > "$OUT/amp.md" <<'PYEOF'
import sys, torch
from urkle_fast.attack import pgd, urkle_kl
from urkle_fast.ops import gaussian_kl
from urkle_fast.train import TrainConfig, resolve_config
from urkle_fast.models import build_model

dev = sys.argv[1]
torch.manual_seed(0)
cfg = resolve_config(TrainConfig(dataset="cifar10", method="simclr_urkle"))
cfg.num_classes = 10
model = build_model(vars(cfg)).to(dev).eval()
with torch.no_grad():  # |mu| of several units, sigma at its 0.01 floor: where bf16 mu would break the KL
    model.head.fc.weight.mul_(20)
    model.head.fc.bias[model.d_z:].fill_(-8.0)
x = torch.rand(256, 3, 32, 32, device=dev)
x_adv = pgd(urkle_kl(model, x), x, eps=8 / 255, alpha=2 / 255, steps=3, model=model, seed=0)
rows = []
for amp in (False, True):
    with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
        mu, lv = model.encode(x)
        mu_a, lv_a = model.encode(x_adv)
        rows.append((amp, str(mu.dtype).replace("torch.", ""), gaussian_kl(mu, lv, mu_a, lv_a).item()))
ref = rows[0][2]
print(f"## Urkle KL, bf16 autocast vs float32 ({dev}, ResNet-18 CIFAR stem, 256 images, sigma at its floor)\n")
print("| autocast | mu dtype | mean KL | relative to float32 |\n|---|---|---:|---:|")
for amp, dt, kl in rows:
    print(f"| {'bf16' if amp else 'off'} | {dt} | {kl:.4f} | {kl / ref:.4f} |")
PYEOF
}

for s in "${STAGES[@]}"; do
  case $s in
    env | build | tests | bandwidth | bench | amp | train) run_stage "$s" ;;
    *) echo "unknown stage $s (env build tests amp bench train bandwidth)" >&2; status=2 ;;
  esac
done
echo "report: $OUT/report.md"
cat "$OUT/report.md"
exit $status
