#!/usr/bin/env bash
# The paper's CIFAR-10 comparison (Table 2: SimCLR, RoCL, SimCLR+Urkle, and the supervised Standard, AT, TRADES)
# at the scale a 2-core CPU allows. One command runs the whole study and continues where it stopped:
#
#   scripts/cifar10_cpu_study.sh                       # every stage, every seed (about 25 core-hours; RESULTS.md)
#   SEEDS=0 OUT=runs/seed0 scripts/cifar10_cpu_study.sh   # one seed (its own OUT: it reports into OUT/report)
#   PHASE=train SEEDS=0 scripts/cifar10_cpu_study.sh   # only the trainings (PHASE=select / eval / report: one stage)
#   METHODS=urkle OUT=runs/urkle scripts/cifar10_cpu_study.sh  # some methods only (the others' rows are "not run")
#   PRIOR=results/cifar10_cpu/summary.json PRIOR_METHODS="rocl simclr trades at standard" PHASE=report \
#     scripts/cifar10_cpu_study.sh   # the report, with the cells OUT lacks (a lost folder) from the committed one
#
# Stages, per seed:
#   train   every model on the same budget: the first TRAIN_SUBSET images of the trainer's fixed shuffle,
#           EPOCHS epochs, batch 256, AdamW, training attack PGD-$PGD_STEPS at eps 8/255 for every adversarial
#           method (RoCL with its official code's step and column-detached similarity); LANES trainings at a
#           time, one thread each (the 2 cores).
#   select  SimCLR+Urkle's beta (BETAS): each model's worst case at 8/255 on the last HOLDOUT images of the
#           training split (never trained on: TRAIN_SUBSET + HOLDOUT <= 50,000), PGD-20 and APGD-CE on both of
#           its prediction paths (APGD-DLR too on the S-sample one); the best worst case of the S-sample
#           prediction is the seed's SimCLR+Urkle (ties: clean accuracy, then the smaller beta). The test set is
#           not looked at.
#   eval    each model on N_TEST class-balanced test images at eps 8/255 and 16/255, the reduced AutoAttack
#           ensemble below run as AutoAttack runs it (--cascade: each attack only on the images every earlier one
#           left correct: the same per-image worst case); the representation models' linear heads on all /
#           5000 / 1000 labels, then Proposition 1 (M = BOUND) and the animal-vs-vehicle task.
#   report  scripts/cifar10_study_report.py: the Table-2 layout, the ordering, the beta choice, Proposition 1, the
#           task, wall times and the accuracy-vs-eps plot, into REPORT (results/cifar10_cpu/, committed).
#
# Every step resumes: a training with --resume if-exists (a killed one continues from its last checkpoint,
# written every CKPT_EVERY steps; Ctrl-C or SIGTERM to the script is passed on, so a training checkpoints),
# an evaluation is skipped when its results.json exists, and a killed one continues after its last finished
# attack (eval's <out>/progress) with its saved heads. A step is evaluated only after its training
# finished (times.tsv), a step runs in one process at a time (a lock per step), and a failed step is reported
# while the others go on (the script then exits 1). Nothing is overwritten.
# Logs: $OUT/logs/ (appended on every resume); wall times (s) and exit status: $OUT/times.tsv.
# The whole script is one { ... } group: bash reads and parses it before running any of it, so editing this file
# while a study runs (hours) cannot change what the running study executes next.
{
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/cifar10_cpu}
# the committed summary (table.md, summary.json, the plot) of the default study; another OUT reports into itself
REPORT=${REPORT:-$([ "$OUT" = runs/cifar10_cpu ] && echo results/cifar10_cpu || echo "$OUT/report")}
DATA_ROOT=${DATA_ROOT:-../shared/data/cifar10-jpeg}
PHASE=${PHASE:-all}
SEEDS=${SEEDS:-"0 1"}
ALL_METHODS="urkle rocl simclr trades at standard"
METHODS=${METHODS:-$ALL_METHODS}         # the methods whose steps run (urkle: SimCLR+Urkle's trainings, choice and rows)
PRIOR=${PRIOR:-}                         # an earlier report's summary.json: fills the cells OUT lacks (report --prior)
PRIOR_METHODS=${PRIOR_METHODS:-"simclr_urkle rocl simclr trades at standard"}  # the methods PRIOR may fill
LANES=${LANES:-2}
TRAIN_SUBSET=${TRAIN_SUBSET:-8000}
EPOCHS=${EPOCHS:-4}
PGD_STEPS=${PGD_STEPS:-3}
BETAS=${BETAS:-"0.003 0.01 0.03"}
HOLDOUT=${HOLDOUT:-1000}
N_TEST=${N_TEST:-2000}
BUDGETS=${BUDGETS:-"all 5000 1000"}      # label budgets of the representation heads and the supervised models
APGD=${APGD:-100}                        # APGD iterations (AutoAttack: 100)
TARGETS=${TARGETS:-3}                    # APGD-T target classes (AutoAttack: 9)
SQUARE=${SQUARE:-1000}                   # Square queries (AutoAttack: 5000)
EOT=${EOT:-5}                            # EOT forwards per gradient step on the S-sample prediction (AutoAttack rand: 20)
BOUND=${BOUND-10}                        # Proposition 1 at this M for SimCLR+Urkle ("" = skip)
BOUND_N=${BOUND_N:-500}                  # test images of the Proposition 1 table
TASKS=${TASKS-"animal_vehicle"}          # the other task of the representation models ("" = skip)
CKPT_EVERY=${CKPT_EVERY:-20}
EVAL_SEED=${EVAL_SEED:-0}                # test subset, label subsets, heads and attack draws of every seed's evaluation
BATCH=256 WARMUP=0.5                    # every training's batch and warm-up (epochs of the all-label models)
[ "$LANES" -ge 1 ] 2>/dev/null || { echo "LANES must be an integer >= 1, got '$LANES'" >&2; exit 2; }
for b in $BUDGETS; do  # a budget below one batch would give its supervised model no whole batch to train on
  [ "$b" = all ] || [ "$b" -ge "$BATCH" ] 2>/dev/null || {
    echo "BUDGETS: each one 'all' or a label count >= $BATCH (one batch), got '$b'" >&2; exit 2; }
done
case "$PHASE" in all|train|select|eval|report) ;;
  *) echo "PHASE must be all, train, select, eval or report, got '$PHASE'" >&2; exit 2 ;; esac
words() { tr -s ' \t' '\n' <<< "$1" | grep -v '^$' | sort | tr '\n' ' '; }  # a list, order and spacing aside
one_of() {  # one_of <variable> <allowed> <its value>: every word of the value is allowed
  local m; for m in $3; do
    [[ " $2 " == *" $m "* ]] || { echo "$1: each one of $2, got '$m'" >&2; exit 2; }
  done
}
one_of METHODS "$ALL_METHODS" "$METHODS"
[ -n "${METHODS// }" ] || { echo "METHODS: at least one of $ALL_METHODS" >&2; exit 2; }
# the report's names (urkle is simclr_urkle there)
one_of PRIOR_METHODS "simclr_urkle rocl simclr trades at standard" "$PRIOR_METHODS"
writes_report() { [ "$PHASE" = all ] || [ "$PHASE" = report ]; }
if writes_report && [ -n "$PRIOR" ] && [ ! -f "$PRIOR" ]; then
  echo "PRIOR: no such file '$PRIOR' (an earlier report's summary.json)" >&2; exit 2
fi
# the committed report is of every method, seeds 0 and 1 and every label budget: a partial study must not rewrite it
# with "not run" rows (some methods may come from PRIOR, an earlier report; seeds and budgets may not)
if writes_report && [ "$(realpath -m "$REPORT")" = "$(realpath -m results/cifar10_cpu)" ] &&
   { { [ -z "$PRIOR" ] && [ "$(words "$METHODS")" != "$(words "$ALL_METHODS")" ]; } ||
     [ "$(words "$SEEDS")" != "$(words "0 1")" ] || [ "$(words "$BUDGETS")" != "$(words "all 5000 1000")" ]; }; then
  echo "METHODS=\"$METHODS\" SEEDS=\"$SEEDS\" BUDGETS=\"$BUDGETS\" would report into results/cifar10_cpu, the committed" \
    "report of every method, seeds 0 1 and budgets all 5000 1000: set OUT or REPORT (or, for some methods, PRIOR to" \
    "fill the rest from an earlier report)" >&2; exit 2
fi
mkdir -p "$OUT/logs"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
touch "$OUT/times.tsv"
STUDY_START=$(wc -l < "$OUT/times.tsv")  # the steps finished before this study began
EPS="0.031372549 0.062745098"            # 8/255, 16/255

COMMON=(--dataset cifar10 --data-root "$DATA_ROOT" --arch resnet18_w16 --batch-size "$BATCH" --optimizer adamw
        --base-lr 0.004 --warmup-epochs "$WARMUP" --pgd-steps "$PGD_STEPS" --threads 1 --num-workers 0 --no-progress
        --log-every 10 --ckpt-every "$CKPT_EVERY" --resume if-exists)

timed() {  # timed <step> <command...>: log (appended: a resumed step keeps its history), wall time, exit status
  local t0 rc=0; t0=$(date +%s)
  # one copy of a step at a time: a second study started on the same OUT refuses it instead of running it twice
  exec 9>> "$OUT/logs/$1.lock"
  if ! flock -n 9; then
    echo "$1 is running in another process (lock $OUT/logs/$1.lock): not started twice" >&2
    return 75
  fi
  # queued before another study on the same OUT ran it to the end: done, not run again (only a finish since this
  # study began: an evaluation whose results.json was lost is queued again on purpose, and must run)
  if finished "$1" "$STUDY_START"; then echo "$1 was finished by another process: not run again" >&2; return 0; fi
  "${@:2}" >> "$OUT/logs/$1.log" 2>&1 || rc=$?
  printf '%s\t%s\t%s\n' "$1" "$(( $(date +%s) - t0 ))" "$rc" >> "$OUT/times.tsv"
  [ "$rc" = 0 ] || echo "$1 failed (exit $rc): $OUT/logs/$1.log" >&2
  return "$rc"
}

wanted() { [[ " $METHODS " == *" $1 "* ]]; }  # wanted <method>: its steps run in this study

finished() {  # finished <step> [n]: its last try (after times.tsv's first n lines) ended with exit status 0
  awk -F'\t' -v s="$1" -v n="${2:-0}" 'NR > n && $1 == s {rc = $3} END {exit !(rc == "0")}' "$OUT/times.tsv"
}

FAILED=0
pool() {  # pool <command file>: run its lines LANES at a time; a failed line is counted, the others go on
  local pids=() line rc=0
  # an interrupted study stops its steps too (a training checkpoints on SIGTERM; background jobs of a script
  # ignore Ctrl-C, so it is passed on as SIGTERM), and the next run resumes them
  # (|| true: set -e holds in a trap too, and pkill fails for a line that has already ended; jobs -rp: the
  # lines still running, not every PID this pool started, which the system may since have given to another process)
  trap 'for p in $(jobs -rp); do pkill -TERM -P "$p" || true; done; wait || true; exit 130' INT TERM
  while IFS= read -r line; do
    while [ "$(jobs -rp | wc -l)" -ge "$LANES" ]; do wait -n || rc=1; done
    bash -c "$line" & pids+=($!)
  done < "$1"
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  trap - INT TERM
  rm -f "$1"
  [ "$rc" = 0 ] || FAILED=1
}

# run name | method | flags: the costliest first so that the lanes finish together
runs_of_seed() {  # runs_of_seed <seed> <tier>: tier 1 the all-label models, tier 2 the label-budget classifiers
  local s=$1 b official
  if [ "$2" = 1 ]; then
    wanted urkle && for b in $BETAS; do
      echo "urkle_b${b}_s$s|simclr_urkle|--beta-robust $b --train-subset $TRAIN_SUBSET --epochs $EPOCHS"
    done
    for m in rocl trades at simclr standard; do
      wanted "$m" || continue
      # RoCL as its official code trains it: the column-detached similarity S = P P.detach()^T (docs/MATH.md sec. 5)
      case $m in rocl) official=" --detach-columns" ;; *) official="" ;; esac
      echo "${m}_s$s|$m|--train-subset $TRAIN_SUBSET --epochs $EPOCHS$official"
    done
    return
  fi
  # the supervised models of the label budgets, on their own labelled images: at least as many optimiser steps as
  # the all-label models and the same warm-up steps. An epoch is whole batches (the loader drops the last partial
  # one), so the epochs count steps: 8000 images x 4 epochs = 31 x 4 = 124 steps; 5000 labels 19 x 7 = 133 steps,
  # 1000 labels 3 x 42 = 126 (epochs scaled by images alone gave 114 and 96: fewer steps for fewer labels)
  local steps=$(( TRAIN_SUBSET / BATCH * EPOCHS )) spe ep warm
  for b in $BUDGETS; do
    [ "$b" = all ] && continue
    spe=$(( b / BATCH ))
    ep=$(( (steps + spe - 1) / spe )); [ "$ep" -ge 1 ] || ep=1
    warm=$(awk -v w="$WARMUP" -v a=$(( TRAIN_SUBSET / BATCH )) -v s="$spe" 'BEGIN {printf "%.6g", w * a / s}')
    for m in trades at standard; do
      wanted "$m" || continue
      echo "${m}_${b}_s$s|$m|--label-budget $b --epochs $ep --warmup-epochs $warm"
    done
  done
}

train_stage() {  # train_stage <tier>
  local cmds s run method extra
  cmds=$(mktemp)
  for s in $SEEDS; do
    while IFS='|' read -r run method extra; do
      finished "train_$run" && continue
      printf '%q ' timed "train_$run" "$PY" -m urkle_fast.train --method "$method" "${COMMON[@]}" --seed "$s" \
        --out-dir "$OUT/$run" >> "$cmds"
      echo "$extra" >> "$cmds"
    done < <(runs_of_seed "$s" "$1")
  done
  pool "$cmds"
}

EVAL=(--dataset cifar10 --data-root "$DATA_ROOT" --num-workers 0 --eot-iter "$EOT" --cascade)
# the accuracy-vs-eps curves (PGD-20, SWEEP_N test images) of the all-label evaluations; 0..16/255
SWEEP=(--sweep-eps 0 0.0078431 0.015686 0.031373 0.047059 0.062745 --sweep-n-test "${SWEEP_N:-300}" --fig2-images 0)
ATTACKS=(--apgd-steps "$APGD" --apgd-targets "$TARGETS" --square-queries "$SQUARE")
declare -A NAME=([standard]=Standard [at]=AT [trades]=TRADES [simclr]=SimCLR [rocl]=RoCL [urkle]=SimCLR+Urkle)

select_stage() {  # each beta on the held-out images (LANES at a time), then the choice per seed
  local cmds s b
  wanted urkle || return 0
  cmds=$(mktemp)
  for s in $SEEDS; do
    for b in $BETAS; do
      [ -f "$OUT/select_b${b}_s$s/results.json" ] && continue
      if ! finished "train_urkle_b${b}_s$s"; then echo "select_b${b}_s$s waits for its training" >&2; continue; fi
      printf '%q ' timed "select_b${b}_s$s" "$PY" -m urkle_fast.eval "${EVAL[@]}" --out "$OUT/select_b${b}_s$s" \
        --checkpoint "$OUT/urkle_b${b}_s$s/checkpoint.pt" --name "beta=$b" --holdout "$HOLDOUT" --eps 0.031372549 \
        --apgd-steps "$APGD" --apgd-targets 0 --square-queries 0 --no-plots --seed "$EVAL_SEED" >> "$cmds"
      echo >> "$cmds"
    done
  done
  pool "$cmds"
  for s in $SEEDS; do
    [ -f "$OUT/select_s$s/chosen.txt" ] && continue
    for b in $BETAS; do [ -f "$OUT/select_b${b}_s$s/results.json" ] || continue 2; done
    mkdir -p "$OUT/select_s$s"
    # the chosen beta: the best worst case of the S-sample prediction at 8/255 on the held-out images (ties: the
    # better clean accuracy, then the smaller beta)
    "$PY" - "$s" $(for b in $BETAS; do echo "$OUT/select_b${b}_s$s/results.json"; done) \
      > "$OUT/select_s$s/chosen.tmp" <<'PYEOF'
import json, sys
def key(path):
    name, m = next(iter(json.load(open(path))["models"].items()))
    p = m["tasks"]["class"]["budgets"]["all"]["paths"]["samples"]
    return (p["worst"]["0.031372549"], p["clean"], -float(name.split("=")[1])), name.split("=")[1]
best = max(key(p) for p in sys.argv[2:])
print(f"urkle_b{best[1]}_s{sys.argv[1]}")
PYEOF
    mv "$OUT/select_s$s/chosen.tmp" "$OUT/select_s$s/chosen.txt"
    echo "seed $s: SimCLR+Urkle is $(cat "$OUT/select_s$s/chosen.txt") (held-out choice)"
  done
}

eval_stage() {  # eval_stage <tier> [rep|sup|extra]: 1 the all-label headline of every model; 2 the label budgets,
  # bound and task (rep: only the representations' budget rows; sup: only the supervised ones; extra: only the
  # bound and the task)
  local cmds s u run m b common part=${2:-both}
  cmds=$(mktemp)
  qeval() {  # qeval <step> <out folder> <training step> <eval flags...>: queued unless done, its method is not
    # wanted, or its model is not trained
    local method=${1#*_}; method=${method%%_*}
    wanted "$method" || return 0
    [ -f "$2/results.json" ] && return 0
    if ! finished "$3"; then echo "$1 waits for ${3/train_urkle_unchosen_s*/the beta choice}" >&2; return 0; fi
    set -- "$1" "$2" "${@:4}"
    printf '%q ' timed "$1" "$PY" -m urkle_fast.eval "${EVAL[@]}" --out "$2" "${@:3}" >> "$cmds"
    echo >> "$cmds"
  }
  for s in $SEEDS; do
    u=urkle_unchosen_s$s  # its steps wait (as for an unfinished training) until the beta is chosen
    [ -f "$OUT/select_s$s/chosen.txt" ] && u=$(cat "$OUT/select_s$s/chosen.txt")
    # every seed is tested on the same images, label subsets and attack draws (--seed $EVAL_SEED): the label-budget
    # classifiers were trained on that seed's subsets, and the seeds then differ in their training alone
    common=(--eps $EPS --n-test "$N_TEST" --seed "$EVAL_SEED" "${ATTACKS[@]}")
    if [ "$1" = 1 ]; then  # the three rows of the paper's ordering first (costliest first), then the supervised ones
      for run in "$u" rocl_s$s simclr_s$s trades_s$s at_s$s standard_s$s; do
        m=${run%%_*}
        qeval "eval_$run" "$OUT/eval_$run" "train_$run" --checkpoint "$OUT/$run/checkpoint.pt" --name "${NAME[$m]}" \
          --label-budgets all "${SWEEP[@]}" "${common[@]}"
      done
      continue
    fi
    for b in $BUDGETS; do
      [ "$b" = all ] || [ "$part" = extra ] && continue
      [ "$part" = sup ] || for run in "$u" rocl_s$s simclr_s$s; do
        m=${run%%_*}
        qeval "eval_${run}_$b" "$OUT/eval_${run}_$b" "train_$run" --checkpoint "$OUT/$run/checkpoint.pt" \
          --name "${NAME[$m]}" --label-budgets "$b" --no-plots "${common[@]}"
      done
      [ "$part" = rep ] || for m in trades at standard; do
        qeval "eval_${m}_${b}_s$s" "$OUT/eval_${m}_${b}_s$s" "train_${m}_${b}_s$s" --checkpoint "$OUT/${m}_${b}_s$s/checkpoint.pt" \
          --name "${NAME[$m]}" --label-budgets "$b" --no-plots "${common[@]}"
      done
    done
    [ "$part" = sup ] || [ "$part" = rep ] && continue
    if [ -n "$BOUND" ]; then  # Proposition 1 for SimCLR+Urkle: heads on the bounded loss, the KL term's attacks
      qeval "bound_$u" "$OUT/bound_$u" "train_$u" --checkpoint "$OUT/$u/checkpoint.pt" --name SimCLR+Urkle \
        --eps $EPS --bound "$BOUND" --head-loss bounded --bound-samples 64 --apgd-steps 0 --square-queries 0 \
        --n-test "$BOUND_N" --no-plots --seed "$EVAL_SEED"
    fi
    if [ -n "$TASKS" ]; then
      for run in "$u" rocl_s$s simclr_s$s; do
        m=${run%%_*}
        qeval "tasks_$run" "$OUT/tasks_$run" "train_$run" --checkpoint "$OUT/$run/checkpoint.pt" --name "${NAME[$m]}" \
          --tasks $TASKS --label-budgets all --no-plots "${common[@]}"
      done
    fi
  done
  pool "$cmds"
}

export -f timed finished; export OUT PY STUDY_START
# in order of what the table needs most: the headline of every seed first, then the representations' label
# budgets (the ordering the paper claims), then the supervised models of the label budgets (the rest of Table 2),
# then Proposition 1 and the task (tables of their own)
case "$PHASE" in
  all) train_stage 1; select_stage; eval_stage 1; eval_stage 2 rep; train_stage 2; eval_stage 2 sup
       eval_stage 2 extra ;;
  train) train_stage 1; train_stage 2 ;;
  select) select_stage ;;
  eval) eval_stage 1; eval_stage 2 ;;
  report) ;;
esac

if [ "$PHASE" = all ] || [ "$PHASE" = report ]; then
  "$PY" scripts/cifar10_study_report.py "$OUT" --seeds $SEEDS --budgets $BUDGETS --out "$REPORT" \
    ${PRIOR:+--prior "$PRIOR" --prior-methods $PRIOR_METHODS}
fi
cat "$OUT/times.tsv"
[ "$FAILED" = 0 ] || { echo "some steps failed: see the messages above and $OUT/logs/" >&2; exit 1; }
exit 0
}
