"""scripts/cifar10_cpu_study.sh end to end, at toy size: every stage (trainings, the held-out beta choice, the
all-label and label-budget evaluations, Proposition 1, the task, the report) on a small ImageFolder tree of real
CIFAR-10 JPEGs, then the resume contract: a study interrupted in its trainings continues without redoing a
finished step, a finished study reruns nothing, and a lost result is redone alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "cifar10_cpu_study.sh"


def _tree(src: Path, dst: Path, n_train: int, n_test: int) -> None:
    """<dst>/train and /test with the first images of each class (links to the real files, nothing copied)."""
    for split, n in (("train", n_train), ("test", n_test)):
        for cls in sorted(p.name for p in (src / split).iterdir()):
            (dst / split / cls).mkdir(parents=True)
            for f in sorted((src / split / cls).iterdir())[:n]:
                (dst / split / cls / f.name).symlink_to(f)


def _env(out: Path, data: Path) -> dict:
    return dict(PY=sys.executable, OUT=str(out), REPORT=str(out / "report"), DATA_ROOT=str(data), SEEDS="0",
                LANES="2", TRAIN_SUBSET="256", EPOCHS="1", PGD_STEPS="1", BETAS="0.01 0.03", HOLDOUT="64",
                N_TEST="40", BUDGETS="all 300", APGD="2", TARGETS="1", SQUARE="8", EOT="1", BOUND="10",
                BOUND_N="20", SWEEP_N="20", CKPT_EVERY="1")


def _study(out: Path, data: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT)], env={**os.environ, **_env(out, data), **env}, capture_output=True,
                          text=True, timeout=1500)


def _steps(out: Path) -> list[str]:
    return [line.split("\t")[0] for line in (out / "times.tsv").read_text().splitlines()]


@pytest.mark.slow
def test_study_runs_every_stage_and_resumes(tmp_path, data_root):
    data = tmp_path / "cifar10"
    _tree(data_root / "cifar10-jpeg", data, n_train=40, n_test=6)
    out = tmp_path / "study"

    # interrupted: SIGTERM to the script once its first training is done (the others are running or queued);
    # it passes the signal on to its steps and stops
    small_env = dict(os.environ, **_env(out, data))
    log = tmp_path / "interrupted.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(["bash", str(SCRIPT)], env=small_env, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 900
    while not ((out / "times.tsv").is_file() and (out / "times.tsv").read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 130
    assert not (out / "select_s0").exists()  # stopped in the trainings

    # the same command again finishes the study: no step that finished runs twice
    r = _study(out, data)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    tries = [line.split("\t") for line in (out / "times.tsv").read_text().splitlines()]
    steps = [t[0] for t in tries]
    done = [t[0] for t in tries if t[2] == "0"]
    assert len(done) == len(set(done))
    trained = {s for s in done if s.startswith("train_")}
    assert trained == {"train_urkle_b0.01_s0", "train_urkle_b0.03_s0", "train_rocl_s0", "train_trades_s0",
                       "train_at_s0", "train_simclr_s0", "train_standard_s0", "train_trades_300_s0",
                       "train_at_300_s0", "train_standard_300_s0"}
    # the rows of Table 2 first (the representations' label budgets, then the supervised budget models), then
    # Proposition 1 and the task
    chosen = (out / "select_s0" / "chosen.txt").read_text().strip()
    assert chosen in ("urkle_b0.01_s0", "urkle_b0.03_s0")
    assert max(steps.index(s) for s in ("eval_rocl_s0_300", f"eval_{chosen}_300", "eval_simclr_s0_300")) < \
        steps.index("train_trades_300_s0") < steps.index("eval_trades_300_s0") < \
        min(steps.index(s) for s in (f"bound_{chosen}", f"tasks_{chosen}", "tasks_rocl_s0", "tasks_simclr_s0"))
    for d in [f"eval_{chosen}", "eval_rocl_s0", "eval_simclr_s0", "eval_trades_s0", "eval_at_s0",
              "eval_standard_s0", f"eval_{chosen}_300", "eval_rocl_s0_300", "eval_simclr_s0_300",
              "eval_trades_300_s0", "eval_at_300_s0", "eval_standard_300_s0", f"bound_{chosen}",
              f"tasks_{chosen}", "tasks_rocl_s0", "tasks_simclr_s0"]:
        assert (out / d / "results.json").is_file(), d
    summary = json.loads((out / "report" / "summary.json").read_text())
    # every cell of the table is filled: 6 methods x 2 budgets, none missing
    assert len(summary["rows"]) == 12 and not [r for r in summary["rows"] if "missing" in r]
    assert {r["budget"] for r in summary["rows"]} == {"all", "300"}
    assert summary["bound"] and summary["tasks"] and len(summary["select"]) == 2
    table = (out / "report" / "table.md").read_text()
    assert "seed 0, labels 300, 8/255:" in table and "(paired, same 40 images:" in table
    for png in ("accuracy_vs_eps.png", "worst_vs_labels.png"):
        assert (out / "report" / png).stat().st_size > 1000

    # finished: a rerun runs nothing and rebuilds the same table
    r = _study(out, data)
    assert r.returncode == 0 and _steps(out) == steps
    assert (out / "report" / "table.md").read_text() == table

    # one result lost: only that step runs again
    (out / "eval_rocl_s0_300" / "results.json").unlink()
    r = _study(out, data)
    assert r.returncode == 0 and _steps(out) == steps + ["eval_rocl_s0_300"]


def test_study_refuses_a_bad_lane_count_and_phase_before_any_work(tmp_path):
    for env, msg in (({"LANES": "0"}, "LANES must be an integer >= 1"), ({"PHASE": "nope"}, "PHASE must be")):
        r = _study(tmp_path / "s", tmp_path, **env)
        assert r.returncode == 2 and msg in r.stderr
        assert not (tmp_path / "s").exists()


def test_the_label_budget_models_train_at_least_the_all_label_steps_with_the_same_warm_up(tmp_path):
    """The study's own settings, its trainings only, with `echo` for Python (each step's log holds the command).
    RoCL trains with its official similarity.
    8000 images x 4 epochs of batch 256 = 124 steps with a 15-step warm-up; 5000 labels (19 batches an epoch)
    7 epochs = 133 steps, 1000 labels (3 batches) 42 = 126, each warm-up 15 steps. Epochs scaled by images
    alone (6 and 32) gave 114 and 96 steps: less training for fewer labels."""
    out = tmp_path / "s"
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PY": "echo", "OUT": str(out), "SEEDS": "0", "PHASE": "train",
                            "BUDGETS": "all 5000 1000"})
    assert r.returncode == 0, r.stderr

    def flags(step):  # the last value of each flag: argparse's
        argv = (out / "logs" / f"{step}.log").read_text().split()
        return {k: argv[len(argv) - argv[::-1].index(k)] for k in ("--epochs", "--warmup-epochs")}

    assert flags("train_at_s0") == {"--epochs": "4", "--warmup-epochs": "0.5"}
    # RoCL with its official code's column-detached similarity, and no other method
    detached = {p.stem for p in (out / "logs").glob("train_*.log") if "--detach-columns" in p.read_text().split()}
    assert detached == {"train_rocl_s0"}
    for b, batches, epochs in ((5000, 19, 7), (1000, 3, 42)):
        for m in ("at", "trades", "standard"):
            f = flags(f"train_{m}_{b}_s0")
            assert int(f["--epochs"]) == epochs and batches * epochs >= 124 > batches * (epochs - 1)
            assert int(float(f["--warmup-epochs"]) * batches) == int(0.5 * 31) == 15
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PY": "echo", "OUT": str(tmp_path / "t"), "BUDGETS": "all 100"})
    assert r.returncode == 2 and "BUDGETS: each one 'all' or a label count >= 256" in r.stderr
    assert not (tmp_path / "t").exists()


def test_methods_runs_only_the_named_methods_steps(tmp_path):
    """METHODS=<some>: only their trainings and evaluations are queued (SimCLR+Urkle's still wait for the beta
    choice); a name outside the study's six, or a partial study writing into the committed report, is refused
    before any work. `echo` stands in for Python: each step's log holds its command."""
    out = tmp_path / "s"
    env = {**os.environ, "PY": "echo", "OUT": str(out), "SEEDS": "0", "BUDGETS": "all 5000", "METHODS": "urkle at"}
    for phase in ("train", "eval"):
        r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120,
                           env={**env, "PHASE": phase})
        assert r.returncode == 0, r.stderr
    assert set(_steps(out)) == {"train_urkle_b0.003_s0", "train_urkle_b0.01_s0", "train_urkle_b0.03_s0",
                                "train_at_s0", "train_at_5000_s0", "eval_at_s0", "eval_at_5000_s0"}
    assert "eval_urkle_unchosen_s0 waits for the beta choice" in r.stderr
    assert not [w for w in ("rocl", "simclr", "trades", "standard") if w in r.stderr + r.stdout]

    for methods, msg in (("urkle foo", "METHODS: each one of urkle rocl simclr trades at standard, got 'foo'"),
                         (" ", "METHODS: at least one of")):
        r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60,
                           env={**env, "OUT": str(tmp_path / "t"), "METHODS": methods})
        assert r.returncode == 2 and msg in r.stderr and not (tmp_path / "t").exists()
    # the committed report (results/cifar10_cpu, however it is spelled) is of every method, seeds 0 1 and every
    # budget: a partial study is refused before any work; with PRIOR some methods may come from an earlier report,
    # but seeds and budgets may not. The order of a list does not matter. OUT is a temporary folder throughout.
    full = {**env, "OUT": str(tmp_path / "r"), "PHASE": "report", "REPORT": "results/cifar10_cpu",
            "SEEDS": "0 1", "BUDGETS": "all 5000 1000", "METHODS": "urkle rocl simclr trades at standard"}
    prior = {"PRIOR": "results/cifar10_cpu/summary.json"}
    refused = "would report into results/cifar10_cpu"
    for change, msg in (({"METHODS": "urkle"}, refused), ({"SEEDS": "0"}, refused), ({"BUDGETS": "all"}, refused),
                        ({"METHODS": "urkle", "REPORT": "./results/cifar10_cpu/"}, refused),
                        ({"SEEDS": "0", **prior}, refused),
                        ({"METHODS": "urkle", "PRIOR": str(tmp_path / "nope.json")}, "PRIOR: no such file"),
                        ({"METHODS": "urkle", **prior, "PRIOR_METHODS": "urkle"}, "PRIOR_METHODS: each one of"),
                        ({"METHODS": "urkle", "PHASE": "bogus"}, "PHASE must be")):
        r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60, env={**full, **change})
        assert r.returncode == 2 and msg in r.stderr, (change, r.stderr)
        assert not (tmp_path / "r").exists()
    for change in ({"SEEDS": " 1  0 ", "METHODS": "standard at trades simclr rocl urkle"},
                   {"METHODS": "urkle", **prior, "PRIOR_METHODS": "rocl simclr"}):
        r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60, env={**full, **change})
        assert r.returncode == 0, (change, r.stderr)
    # the cells OUT lacks come from PRIOR, for PRIOR_METHODS only
    assert ("--out results/cifar10_cpu --prior results/cifar10_cpu/summary.json --prior-methods rocl simclr"
            in r.stdout), r.stdout


def test_a_step_another_study_finished_after_it_was_queued_is_not_run_again(tmp_path):
    """Two studies on the same OUT each queue the steps not finished when they start. A step the other study
    ran to the end while this one waited in its queue is skipped when its turn comes (before: run again,
    rewriting its results). The stand-in for Python, run for the first training, records the second one as
    finished by another process; `echo` is each step's command, so a step that ran has it in its log."""
    out = tmp_path / "s"
    stub = tmp_path / "py"
    stub.write_text('#!/bin/bash\necho "$@"\n'
                    'case "$*" in *at_s0*) printf "train_standard_s0\\t1\\t0\\n" >> "$OUT/times.tsv" ;; esac\n')
    stub.chmod(0o755)
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PY": str(stub), "OUT": str(out), "SEEDS": "0", "PHASE": "train",
                            "BUDGETS": "all", "METHODS": "at standard", "LANES": "1"})
    assert r.returncode == 0, r.stderr
    assert _steps(out) == ["train_standard_s0", "train_at_s0"]  # the other study's line, written during at_s0
    assert "train_standard_s0 was finished by another process: not run again" in r.stderr
    assert "--out-dir" in (out / "logs" / "train_at_s0.log").read_text()
    assert not (out / "logs" / "train_standard_s0.log").exists()
