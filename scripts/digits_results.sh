#!/usr/bin/env bash
# The digits numbers of RESULTS.md: the default job (python -m urkle_fast.train: SimCLR+Urkle vs SimCLR, the
# full attack ensemble), then the same two encoders on three tasks (digit, parity, digit > 4) with 1437 and
# 100 labels, and Proposition 1 at M = 5 (heads trained on the bounded loss). Every step resumes or is skipped
# when its output exists. About 25 minutes on one CPU core.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/digits-demo}
export OMP_NUM_THREADS=${THREADS:-1} MKL_NUM_THREADS=${THREADS:-1}
mkdir -p "$OUT"
touch "$OUT/times.tsv"

t0=$(date +%s)
"$PY" -m urkle_fast.train --demo --out-dir "$OUT" --no-progress > "$OUT/demo.log" 2>&1
printf 'demo\t%s\n' "$(( $(date +%s) - t0 ))" >> "$OUT/times.tsv"

CKPTS=(--checkpoint "$OUT/simclr_urkle/checkpoint.pt" --name SimCLR+Urkle --checkpoint "$OUT/simclr/checkpoint.pt"
       --name SimCLR)
if [ ! -f "$OUT/tasks/results.json" ]; then
  t0=$(date +%s)
  "$PY" -m urkle_fast.eval "${CKPTS[@]}" --dataset digits --eps 0.1 0.2 --tasks digit parity gt4 \
    --label-budgets all 100 --square-queries 1000 --out "$OUT/tasks" > "$OUT/tasks.log" 2>&1
  printf 'tasks\t%s\n' "$(( $(date +%s) - t0 ))" >> "$OUT/times.tsv"
fi
if [ ! -f "$OUT/bound/results.json" ]; then
  t0=$(date +%s)
  "$PY" -m urkle_fast.eval --checkpoint "$OUT/simclr_urkle/checkpoint.pt" --name SimCLR+Urkle --dataset digits \
    --eps 0.05 0.1 0.2 --bound 5 --head-loss bounded --bound-samples 64 --apgd-steps 0 --square-queries 0 \
    --no-plots --out "$OUT/bound" > "$OUT/bound.log" 2>&1
  printf 'bound\t%s\n' "$(( $(date +%s) - t0 ))" >> "$OUT/times.tsv"
fi
cat "$OUT/times.tsv"
