#!/usr/bin/env bash
# Reproduce the paper's MNIST Tables 1-3 (Standard, AT, TRADES, AE+TRADES, VAE+Urkle at l_inf eps = 0.1, all
# labels and the 5000 / 1000 label budgets) with urkle_fast.train and urkle_fast.eval, on the CPU.
#
#   scripts/reproduce_mnist.sh                 # train every model, then evaluate (RESULTS.md records the times)
#   PHASE=train scripts/reproduce_mnist.sh     # only the trainings; PHASE=eval only the evaluations
#   N_TEST=500 BUDGETS=all TASKS= BOUND= BUDGET_RUNS= PHASE=eval scripts/reproduce_mnist.sh   # Table 1 only
#   N_TEST=300 BUDGETS="5000 1000" EVAL_RUNS="vae_urkle ae_trades" TASKS= BOUND= PHASE=eval \
#     scripts/reproduce_mnist.sh                                                           # label budgets only
#   N_TEST=300 TASKS="parity gt4" TASK_RUNS=vae_urkle EVAL_RUNS= BUDGET_RUNS= BOUND= PHASE=eval \
#     scripts/reproduce_mnist.sh                                                           # the tasks table
#
# The evaluations: eval_<run> (the digit task, heads on each of BUDGETS for the representation models, the
# all-label classifiers), eval_<run>_<b> (the classifiers trained on b labels), tasks_<run> (the other TASKS, heads
# on all labels, representation models only), bound_vae_urkle (Proposition 1 at M = BOUND); then merged/ joins
# the eval_* tables (one column per label budget).
#
# Every step resumes: a training with --resume if-exists, an evaluation is skipped when its results.json
# exists. So an interrupted run is continued by running the same command again, and nothing is overwritten.
# Logs: $LOG_DIR/<run>.log; wall times (s): OUT/times.tsv.
#
# The budget (a 2-core CPU): the representation models and AT / TRADES train 2 epochs on the first 30,000
# images; Standard trains 3 epochs on all 60,000 (so that its clean accuracy reaches the paper's ~99% and its
# robustness can be compared with the paper's 1.0); the label-budget classifiers train about as many steps
# on their 5000 / 1000 images only. AdamW, lr 3e-3, cosine, no warm-up; training attack PGD-5 at eps 0.1.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/mnist}
LOG_DIR=${LOG_DIR:-$OUT/logs}
DATA_ROOT=${DATA_ROOT:-../shared/data}
PHASE=${PHASE:-all}
N_TEST=${N_TEST:-1000}          # class-balanced, seeded test subset for the attacks
SQUARE=${SQUARE:-5000}          # AutoAttack's Square queries
TASKS=${TASKS-"parity gt4"}    # the other downstream tasks of the representation models ("" = skip)
BUDGETS=${BUDGETS:-"all 5000 1000"}  # label budgets of their digit heads
BOUND=${BOUND-10}               # Proposition 1 at this M for VAE+Urkle ("" = skip)
EVAL_RUNS=${EVAL_RUNS-"vae_urkle ae_trades standard at trades"}
BUDGET_RUNS=${BUDGET_RUNS-"standard at trades"}  # classifiers trained on 5000 / 1000 labels ("" = skip)
TRAIN_RUNS=${TRAIN_RUNS:-}      # train only these runs of RUNS below ("" = all of them)
THREADS=${THREADS:-1}
mkdir -p "$OUT" "$LOG_DIR"
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
touch "$OUT/times.tsv"

COMMON=(--dataset mnist --data-root "$DATA_ROOT" --batch-size 128 --optimizer adamw --base-lr 0.006 --warmup-epochs 0
        --eps 0.1 --pgd-steps 5 --seed 0 --threads "$THREADS" --no-progress --log-every 20 --resume if-exists)
# run name | method | extra flags
RUNS=(
  "vae_urkle|vae_urkle|--train-subset 30000 --epochs 2"
  "ae_trades|ae_trades|--train-subset 30000 --epochs 2"
  "standard|standard|--epochs 3"
  "trades|trades|--train-subset 30000 --epochs 2"
  "at|at|--train-subset 30000 --epochs 2"
  "standard_5000|standard|--label-budget 5000 --epochs 12"
  "at_5000|at|--label-budget 5000 --epochs 12"
  "trades_5000|trades|--label-budget 5000 --epochs 12"
  "standard_1000|standard|--label-budget 1000 --epochs 60"
  "at_1000|at|--label-budget 1000 --epochs 60"
  "trades_1000|trades|--label-budget 1000 --epochs 60"
)
REPRESENTATION="vae_urkle ae_trades"
TASK_RUNS=${TASK_RUNS-$REPRESENTATION}  # the representation models evaluated on the other TASKS
declare -A NAME=([standard]=Standard [at]=AT [trades]=TRADES [ae_trades]="AE+TRADES" [vae_urkle]="VAE+Urkle")

timed() {  # timed <phase> <run> <command...>
  local t0; t0=$(date +%s)
  "${@:3}" > "$LOG_DIR/$1_$2.log" 2>&1
  printf '%s\t%s\t%s\n' "$1" "$2" "$(( $(date +%s) - t0 ))" >> "$OUT/times.tsv"
}

if [ "$PHASE" = all ] || [ "$PHASE" = train ]; then
  for spec in "${RUNS[@]}"; do
    IFS='|' read -r run method extra <<< "$spec"
    [ -n "$TRAIN_RUNS" ] && [[ " $TRAIN_RUNS " != *" $run "* ]] && continue
    # shellcheck disable=SC2086
    timed train "$run" "$PY" -m urkle_fast.train --method "$method" "${COMMON[@]}" $extra --out-dir "$OUT/$run"
  done
fi

if [ "$PHASE" = all ] || [ "$PHASE" = eval ]; then
  # the representation models (digit heads on each label budget) and the all-label classifiers: the full attack
  # ensemble
  for run in $EVAL_RUNS; do
    [ -f "$OUT/eval_$run/results.json" ] && continue
    budgets=all
    [[ " $REPRESENTATION " == *" $run "* ]] && budgets=$BUDGETS
    # shellcheck disable=SC2086
    timed eval "$run" "$PY" -m urkle_fast.eval --checkpoint "$OUT/$run/checkpoint.pt" --name "${NAME[$run]}" \
      --dataset mnist --data-root "$DATA_ROOT" --eps 0.1 --label-budgets $budgets --n-test "$N_TEST" \
      --square-queries "$SQUARE" --out "$OUT/eval_$run"
  done
  # one representation, other tasks (no adversarial training of any head): all labels
  for run in $TASK_RUNS; do
    [ -z "$TASKS" ] || [ -f "$OUT/tasks_$run/results.json" ] && continue
    # shellcheck disable=SC2086
    timed tasks "$run" "$PY" -m urkle_fast.eval --checkpoint "$OUT/$run/checkpoint.pt" --name "${NAME[$run]}" \
      --dataset mnist --data-root "$DATA_ROOT" --eps 0.1 --tasks $TASKS --label-budgets all --n-test "$N_TEST" \
      --square-queries "$SQUARE" --no-plots --out "$OUT/tasks_$run"
  done
  # Proposition 1 for the Gaussian encoder: heads trained on the bounded loss, PGD-50 and APGD-CE-50 on the bounded
  # S = 64 prediction (the left-hand side), the Urkle attack with restarts for the KL term
  if [ -n "$BOUND" ] && [ ! -f "$OUT/bound_vae_urkle/results.json" ]; then
    timed bound vae_urkle "$PY" -m urkle_fast.eval --checkpoint "$OUT/vae_urkle/checkpoint.pt" --name "VAE+Urkle" \
      --dataset mnist --data-root "$DATA_ROOT" --eps 0.05 0.1 0.2 --bound "$BOUND" --head-loss bounded \
      --bound-samples 64 --apgd-steps 0 --square-queries 0 --n-test "$N_TEST" --no-plots --out "$OUT/bound_vae_urkle"
  fi
  for b in 5000 1000; do  # the classifiers trained on a label budget: reported in their own column only
    for m in $BUDGET_RUNS; do
      run=${m}_$b
      [ -f "$OUT/eval_$run/results.json" ] && continue
      timed eval "$run" "$PY" -m urkle_fast.eval --checkpoint "$OUT/$run/checkpoint.pt" --name "${NAME[$m]}" \
        --dataset mnist --data-root "$DATA_ROOT" --eps 0.1 --label-budgets "$b" --n-test "$N_TEST" \
        --square-queries "$SQUARE" --out "$OUT/eval_$run"
    done
  done
  "$PY" -m urkle_fast.evaluation.merge "$OUT"/eval_*/results.json --order Standard AT TRADES AE+TRADES VAE+Urkle \
    --out "$OUT/merged"
fi
cat "$OUT/times.tsv"
