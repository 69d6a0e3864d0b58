#!/usr/bin/env bash
# Reproduce the paper's MNIST Table 1 (Standard, AT, TRADES, AE+TRADES, VAE+Urkle at l_inf eps = 0.1;
# clean / adversarial accuracy) with urkle_fast.train and urkle_fast.eval, on the CPU.
#
#   scripts/reproduce_mnist.sh                    # the CPU budget recorded in RESULTS.md (about 45 min)
#   SUBSET= EPOCHS=20 PGD_STEPS=40 N_TEST= APGD_STEPS=100 scripts/reproduce_mnist.sh   # a fuller run (GPU)
#
# Two queues run in parallel (one intra-op thread each: on a shared 2-core machine this is much
# faster than two threads per process). Each queue trains a method, evaluates it, goes on to the
# next; the last step merges the results.json files into one table (OUT/table.md, OUT/results.json).
# Logs: $LOG_DIR/<method>.log, $LOG_DIR/eval_<method>.log; wall times (s): OUT/times.tsv.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/mnist-table1}
LOG_DIR=${LOG_DIR:-/tmp/urkle_mnist_logs}
DATA_ROOT=${DATA_ROOT:-../shared/data}
SUBSET=${SUBSET-30000}         # first N training images for representation / classifier training ("" = all 60000)
EPOCHS=${EPOCHS:-2}
BS=${BS:-128}
LR=${LR:-0.006}               # AdamW, lr = LR * BS / 256 = 3e-3, cosine to 0, no warm-up (1e-3 left the AEs untrained)
PGD_STEPS=${PGD_STEPS:-5}     # training attack: PGD steps of 2.5 * eps / steps (trainer default alpha)
EPS=${EPS:-0.1}
N_TEST=${N_TEST-1000}         # class-balanced, seeded test subset for the attacks ("" = all 10000)
ATTACK_STEPS=${ATTACK_STEPS:-20}
APGD_STEPS=${APGD_STEPS:-50}
SAMPLES=${SAMPLES:-10}
SWEEP_N=${SWEEP_N:-100}
BUDGETS=${BUDGETS:-all}
THREADS=${THREADS:-1}
QUEUE_A=${QUEUE_A:-"ae_trades standard"}
QUEUE_B=${QUEUE_B:-"vae_urkle trades at"}

mkdir -p "$OUT" "$LOG_DIR"
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
SUBSET_ARG=()
[ -n "$SUBSET" ] && SUBSET_ARG=(--train-subset "$SUBSET")
NTEST_ARG=()
[ -n "$N_TEST" ] && NTEST_ARG=(--n-test "$N_TEST")

declare -A NAME=([standard]=Standard [at]=AT [trades]=TRADES [ae_trades]="AE+TRADES" [vae_urkle]="VAE+Urkle")

queue() {  # queue <methods...>: train then evaluate each method in turn (partial results appear early)
  for m in "$@"; do
    local t0=$(date +%s)
    "$PY" -m urkle_fast.train --method "$m" --dataset mnist --data-root "$DATA_ROOT" --epochs "$EPOCHS" \
      --batch-size "$BS" --optimizer adamw --base-lr "$LR" --warmup-epochs 0 --eps "$EPS" \
      --pgd-steps "$PGD_STEPS" "${SUBSET_ARG[@]}" --seed 0 --out-dir "$OUT/$m" --no-progress --log-every 20 \
      --resume if-exists \
      > "$LOG_DIR/$m.log" 2>&1
    printf 'train\t%s\t%s\n' "$m" "$(( $(date +%s) - t0 ))" >> "$OUT/times.tsv"
    t0=$(date +%s)
    "$PY" -m urkle_fast.eval --checkpoint "$OUT/$m/checkpoint.pt" --name "${NAME[$m]}" --dataset mnist \
      --data-root "$DATA_ROOT" --eps "$EPS" --label-budgets $BUDGETS --samples "$SAMPLES" \
      --attack-steps "$ATTACK_STEPS" --apgd-steps "$APGD_STEPS" "${NTEST_ARG[@]}" --sweep-n-test "$SWEEP_N" \
      --out "$OUT/eval_$m" > "$LOG_DIR/eval_$m.log" 2>&1
    printf 'eval\t%s\t%s\n' "$m" "$(( $(date +%s) - t0 ))" >> "$OUT/times.tsv"
  done
}

: > "$OUT/times.tsv"
T0=$(date +%s)
# shellcheck disable=SC2086
queue $QUEUE_A &
PID_A=$!
# shellcheck disable=SC2086
queue $QUEUE_B &
PID_B=$!
wait $PID_A
wait $PID_B
printf 'total\tall\t%s\n' "$(( $(date +%s) - T0 ))" >> "$OUT/times.tsv"

# merge the two evaluations into one table, rows in the paper's order
"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
from urkle_fast.evaluation.report import write_outputs, markdown_table
out = Path(sys.argv[1])
parts = [json.loads(p.read_text()) for p in sorted(out.glob("eval_*/results.json"))]
merged = dict(parts[0], models={})
for p in parts:
    merged["models"].update(p["models"])
order = ["Standard", "AT", "TRADES", "AE+TRADES", "VAE+Urkle"]
merged["models"] = {k: merged["models"][k] for k in sorted(merged["models"], key=lambda k: order.index(k) if k in order else 99)}
write_outputs(merged, str(out))
print(markdown_table(merged))
PYEOF
cat "$OUT/times.tsv"
