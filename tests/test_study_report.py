"""scripts/cifar10_study_report.py: the CIFAR-10 study's table reads the study's results.json files, marks every
cell that has not run with the reason, states the ordering of the representations from their intervals, and
flags the held-out beta choice. The files here have the layout and keys urkle_fast.eval writes (the study's
own run is what RESULTS.md reports)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

E8, E16 = "0.031372549", "0.062745098"


def _report():
    path = Path(__file__).resolve().parents[1] / "scripts" / "cifar10_study_report.py"
    spec = importlib.util.spec_from_file_location("cifar10_study_report", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _path(clean, w8, w16, half=0.02, note=None):
    p = {"clean": clean, "clean_ci": [clean - half, clean + half], "worst": {E8: w8, E16: w16},
         "worst_ci": {E8: [w8 - half, w8 + half], E16: [w16 - half, w16 + half]}}
    return dict(p, note=note) if note else p


def _write(folder: Path, name: str, kind: str, paths: dict, beta=None, budget="all"):
    folder.mkdir(parents=True)
    model = {"kind": kind, "config": {"beta_robust": beta, "train_subset": 8000, "epochs": 4, "pgd_steps": 3},
             "tasks": {"class": {"budgets": {budget: {"paths": paths}}}}, "wall_s": 12.0,
             "sweep": {"z = mu, labels all": {"eps": [0.0, 0.03], "acc": [paths["mu"]["clean"], 0.1]}}}
    settings = {"n_test": 2000, "attack_steps": 20, "apgd_steps": 100, "apgd_targets": 3, "square_queries": 1000,
                "eot_iter": 20, "samples": 10, "redraws": 5, "cascade": True, "head": "linear", "head_epochs": 30}
    (folder / "results.json").write_text(json.dumps({"models": {name: model}, "settings": settings}))


@pytest.fixture
def study(tmp_path):
    out = tmp_path / "study"
    det = lambda *a: {"mu": _path(*a), "samples": _path(*a, note="deterministic encoder")}  # noqa: E731
    for b, w in (("0.003", 0.2), ("0.01", 0.3)):
        _write(out / f"select_b{b}_s0", f"beta={b}", "representation",
               {"mu": _path(0.5, w, 0.01), "samples": _path(0.5, w, 0.01)}, beta=float(b))
    (out / "select_s0").mkdir()
    (out / "select_s0" / "chosen.txt").write_text("urkle_b0.01_s0\n")
    _write(out / "eval_urkle_b0.01_s0", "SimCLR+Urkle", "representation",
           {"mu": _path(0.55, 0.28, 0.05), "samples": _path(0.56, 0.30, 0.06)}, beta=0.01)
    _write(out / "eval_rocl_s0", "RoCL", "representation", det(0.6, 0.20, 0.02))
    _write(out / "eval_simclr_s0", "SimCLR", "representation", det(0.65, 0.19, 0.0))
    _write(out / "eval_standard_s0", "Standard", "supervised", det(0.7, 0.0, 0.0))
    # 5000 labels: RoCL ahead of SimCLR+Urkle with overlapping intervals, SimCLR far behind
    _write(out / "eval_urkle_b0.01_s0_5000", "SimCLR+Urkle", "representation",
           {"mu": _path(0.5, 0.22, 0.04), "samples": _path(0.5, 0.23, 0.05)}, beta=0.01, budget="5000")
    _write(out / "eval_rocl_s0_5000", "RoCL", "representation", det(0.55, 0.24, 0.02), budget="5000")
    _write(out / "eval_simclr_s0_5000", "SimCLR", "representation", det(0.6, 0.01, 0.0), budget="5000")
    (out / "eval_at_s0").mkdir(parents=True)  # started (eval makes its --out first), never finished
    (out / "times.tsv").write_text("train_rocl_s0\t600\t1\ntrain_at_s0\t9\t0\ntrain_rocl_s0\t50\t0\n"
                                   "eval_trades_s0\t30\t1\n")
    return out


def test_table_marks_what_did_not_run_and_states_the_ordering(study, tmp_path):
    rep = _report()
    assert rep.main([str(study), "--seeds", "0", "1", "--budgets", "all", "5000", "--out", str(tmp_path / "r")]) == 0
    table = (tmp_path / "r" / "table.md").read_text()
    rows = {(r["name"], r["seed"], r["budget"]): r for r in
            json.loads((tmp_path / "r" / "summary.json").read_text())["rows"]}
    # every (method, seed, budget) cell is there: filled, or with the reason it is not
    assert len(rows) == 6 * 2 * 2
    assert rows[("Standard", 0, "5000")]["missing"] == "not run yet"
    assert rows[("AT", 0, "all")]["missing"] == "evaluation started, not finished"
    assert rows[("TRADES", 0, "all")]["missing"] == "failed (exit 1): logs/eval_trades_s0.log"
    assert rows[("TRADES", 0, "5000")]["missing"] == "not run yet"
    assert rows[("SimCLR+Urkle", 1, "all")]["missing"] == "the held-out beta choice has not run"
    assert rows[("SimCLR+Urkle", 0, "all")]["headline"]["worst"][E8] == 0.30  # the S = 10 path is the headline
    assert rows[("SimCLR+Urkle", 0, "all")]["z_mu"]["worst"][E8] == 0.28
    assert "z_mu" not in rows[("RoCL", 0, "all")]  # a deterministic encoder has one prediction
    assert "82.31 / 42.56 / 14.29" in table and "83.71 / 40.27 / 9.55" in table
    # 0.30 +- 0.02 vs 0.20 +- 0.02: apart; 0.20 vs 0.19: overlapping
    assert "seed 0, labels all, 8/255: SimCLR+Urkle > RoCL; RoCL ≈ SimCLR" in table
    assert "seed 0, labels 5000, 8/255: RoCL ≈ SimCLR+Urkle; SimCLR+Urkle > SimCLR" in table
    assert "seed 0, labels 5000, 16/255: SimCLR+Urkle ≈ RoCL; RoCL ≈ SimCLR" in table
    assert rows[("RoCL", 0, "5000")]["headline"]["worst"][E8] == 0.24
    for b in ("all", "5000"):  # once per budget when not evaluated, not once per eps
        assert table.count(f"seed 1, labels {b}: not all three representation models are evaluated yet") == 1
    assert "| 0 | 0.01 | 2000 |" in table and table.count("| yes |") == 1
    assert "| train_rocl_s0 | 650 |" in table and "| train_at_s0 | 9 |" in table  # an interrupted try counts
    assert (tmp_path / "r" / "accuracy_vs_eps.png").stat().st_size > 1000
    assert (tmp_path / "r" / "worst_vs_labels.png").stat().st_size > 1000


def test_report_refuses_a_missing_study(tmp_path, capsys):
    assert _report().main([str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    assert "is not a folder" in capsys.readouterr().err
