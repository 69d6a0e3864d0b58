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
    _write(out / "tasks_rocl_s0", "RoCL", "representation", det(0.8, 0.7, 0.6))  # the other task's head
    res = json.loads((out / "tasks_rocl_s0" / "results.json").read_text())
    model = res["models"]["RoCL"]
    model["tasks"] = {"animal_vehicle": model["tasks"]["class"]}
    (out / "tasks_rocl_s0" / "results.json").write_text(json.dumps(res))
    (out / "rocl_s0").mkdir()  # a training: its config and its log's images/s
    (out / "rocl_s0" / "config.json").write_text(json.dumps({"method": "rocl", "arch": "resnet18_w16", "pgd_steps": 3}))
    (out / "rocl_s0" / "metrics.jsonl").write_text(
        "".join(json.dumps(m) + "\n" for m in ({"step": 10, "img_per_s": 40.0}, {"step": 15, "loss": 1.0},
                                               {"step": 20, "img_per_s": 60.0}, {"step": 30, "img_per_s": 50.0})))
    (out / "times.tsv").write_text("train_rocl_s0\t600\t1\ntrain_at_s0\t9\t0\ntrain_rocl_s0\t50\t0\n"
                                   "eval_trades_s0\t30\t1\ntrain_trades_5000_s0\t40\t0\ntrain_simclr_s1\t5\t0\n"
                                   "superseded_train_rocl_s0\t70\t0\n")
    return out


def test_table_marks_what_did_not_run_and_states_the_ordering(study, tmp_path):
    rep = _report()
    assert rep.main([str(study), "--seeds", "0", "1", "--budgets", "all", "5000", "--out", str(tmp_path / "r")]) == 0
    table = (tmp_path / "r" / "table.md").read_text()
    rows = {(r["name"], r["seed"], r["budget"]): r for r in
            json.loads((tmp_path / "r" / "summary.json").read_text())["rows"]}
    # every (method, seed, budget) cell is there: filled, or with the reason it is not
    assert len(rows) == 6 * 2 * 2
    assert rows[("Standard", 0, "5000")]["missing"] == "model not trained yet"
    assert rows[("RoCL", 1, "5000")]["missing"] == "model not trained yet"
    assert rows[("SimCLR", 1, "5000")]["missing"] == "trained; evaluation not run yet"  # its head's budget
    assert rows[("AT", 0, "all")]["missing"] == "evaluation started, not finished"
    assert rows[("TRADES", 0, "all")]["missing"] == "failed (exit 1): logs/eval_trades_s0.log"
    assert rows[("TRADES", 0, "5000")]["missing"] == "trained; evaluation not run yet"
    assert rows[("SimCLR+Urkle", 1, "all")]["missing"] == "the held-out beta choice has not run"
    assert rows[("SimCLR+Urkle", 0, "all")]["headline"]["worst"][E8] == 0.30  # the S = 10 path is the headline
    assert rows[("SimCLR+Urkle", 0, "all")]["z_mu"]["worst"][E8] == 0.28
    assert "z_mu" not in rows[("RoCL", 0, "all")]  # a deterministic encoder has one prediction
    assert "82.31 / 42.56 / 14.29" in table and "83.71 / 40.27 / 9.55" in table
    # no per-image results: Newcombe's interval from the two Wilson intervals, e.g. 0.30 - 0.20 +- sqrt(2) 0.02
    assert ("seed 0, labels all, 8/255: SimCLR+Urkle > RoCL (unpaired: +10.0 [+7.2, +12.8] points); RoCL ≈ SimCLR "
            "(unpaired: +1.0 [-1.8, +3.8] points)") in table
    assert ("seed 0, labels 5000, 8/255: RoCL ≈ SimCLR+Urkle (unpaired: +1.0 [-1.8, +3.8] points); SimCLR+Urkle > "
            "SimCLR") in table
    # 0.05 [0.03, 0.07] against 0.02 [0.00, 0.04]: the intervals overlap, yet the difference's interval excludes 0
    assert ("seed 0, labels 5000, 16/255: SimCLR+Urkle > RoCL (unpaired: +3.0 [+0.2, +5.8] points); RoCL ≈ SimCLR "
            "(unpaired: +2.0 [-0.8, +4.8] points)") in table
    assert "## Across seeds" in table and "labels all, 8/255: 1 seed(s) with all three representations" in table
    assert rows[("RoCL", 0, "5000")]["headline"]["worst"][E8] == 0.24
    for b in ("all", "5000"):  # once per budget when not evaluated, not once per eps
        assert table.count(f"seed 1, labels {b}: not all three representation models are evaluated yet") == 1
    assert "| 0 | 0.01 | 2000 |" in table and table.count("| yes |") == 1
    # one representation, two heads: the class headline beside the task's
    assert ("| RoCL | 0 | 60.0 [58.0, 62.0] | 20.0 [18.0, 22.0] | 2.0 [0.0, 4.0] | 80.0 [78.0, 82.0] | "
            "70.0 [68.0, 72.0] | 60.0 [58.0, 62.0] |") in table
    assert table.count("seed 0, animal vs vehicle: not all three representation models are evaluated yet") == 1
    assert "| rocl_s0 | rocl | resnet18_w16 | 3 | 50.0 | 3 |" in table  # the median of the logged steps
    assert "| train_rocl_s0 | 650 |" in table and "| train_at_s0 | 9 |" in table  # an interrupted try counts
    # a replaced run's tries stay apart from the step that replaced it, and say why
    assert "| superseded_train_rocl_s0 | 70 |" in table and "superseded_*: the tries of runs" in table
    assert (tmp_path / "r" / "accuracy_vs_eps.png").stat().st_size > 1000
    assert (tmp_path / "r" / "worst_vs_labels.png").stat().st_size > 1000


def test_report_refuses_a_missing_study(tmp_path, capsys):
    assert _report().main([str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_ordering_uses_the_paired_difference_when_both_kept_per_image_results(tmp_path):
    """Two models on the same 2000 images whose unpaired intervals overlap (14 % vs 12 %), but every image RoCL
    gets right SimCLR+Urkle gets right too, plus 40 more: the paired interval excludes 0, so '>'. With another
    test subset's fingerprint the pairing is refused and the unpaired rule ('≈') holds."""
    import torch

    from urkle_fast.eval import ok_bits, unpack_ok

    rep, n = _report(), 2000
    urkle, rocl, simclr = (torch.zeros(n, dtype=torch.bool) for _ in range(3))
    urkle[:280], rocl[:240], simclr[:5] = True, True, True

    def paths(ok, clean, fp):
        p = _path(clean, ok.float().mean().item(), 0.01, half=0.015)
        p["ok_bits"] = {"clean": ok_bits(ok), "worst": {E8: ok_bits(ok), E16: ok_bits(ok[:0].new_zeros(n))}}
        return {"mu": p, "samples": dict(p, note="deterministic encoder")}, fp

    for fp_rocl, expect in (("f" * 16, "SimCLR+Urkle > RoCL (paired, same 2000 images: +2.0 [+1.4, +2.6] points; "
                                        "40 right only for SimCLR+Urkle, 0 only for RoCL)"),
                            ("0" * 16, "SimCLR+Urkle ≈ RoCL (unpaired: +2.0 [-0.1, +4.1] points); RoCL > SimCLR "
                                       "(unpaired")):
        out = tmp_path / fp_rocl[0]
        (out / "select_s0").mkdir(parents=True)
        (out / "select_s0" / "chosen.txt").write_text("urkle_b0.01_s0\n")
        for folder, name, ok, fp in (("eval_urkle_b0.01_s0", "SimCLR+Urkle", urkle, "f" * 16),
                                     ("eval_rocl_s0", "RoCL", rocl, fp_rocl),
                                     ("eval_simclr_s0", "SimCLR", simclr, "f" * 16)):
            p, fp = paths(ok, 0.4, fp)
            _write(out / folder, name, "representation", p, beta=0.01 if "urkle" in folder else None)
            res = json.loads((out / folder / "results.json").read_text())
            res["settings"]["test_fingerprint"] = fp
            (out / folder / "results.json").write_text(json.dumps(res))
        assert rep.main([str(out), "--seeds", "0", "--budgets", "all", "--out", str(out / "r")]) == 0
        table = (out / "r" / "table.md").read_text()
        assert f"seed 0, labels all, 8/255: {expect}" in table, table
        assert '"bits"' in (out / "r" / "summary.json").read_text()  # kept: a later --prior can still pair
    # the helper against eval's own packing, and the interval by hand: 40.5 vs 0.5 of 2002 (Agresti-Min)
    assert rep._unpack(ok_bits(urkle[:13]), 13) == unpack_ok(ok_bits(urkle[:13]), 13).tolist()
    d, lo, hi, a, b = rep.paired_difference(urkle.tolist(), rocl.tolist())
    half = 1.959964 * (41 - 40 ** 2 / 2002) ** 0.5 / 2002
    assert (d, a, b) == (0.02, 40, 0)
    assert lo == pytest.approx(40 / 2002 - half) and hi == pytest.approx(40 / 2002 + half)
    with pytest.raises(ValueError, match="paired images"):
        rep.paired_difference([True], [True, False])
    d, lo, hi, _, _ = rep.paired_difference([True] * 3, [False] * 3)  # few images: the interval stays in [-1, 1]
    assert d == 1.0 and 0 < lo < 1 and hi == 1.0

    # the summary keeps the bits: with RoCL's folder gone, a report given it as --prior still pairs RoCL's row
    import shutil

    shutil.rmtree(out / "eval_rocl_s0")
    assert rep.main([str(out), "--seeds", "0", "--budgets", "all", "--out", str(out / "r2"),
                     "--prior", str(out / "r" / "summary.json")]) == 0
    assert "seed 0, labels all, 8/255: SimCLR+Urkle ≈ RoCL (unpaired: +2.0 [-0.1, +4.1] points)" in \
        (out / "r2" / "table.md").read_text()  # this fingerprint was another subset's: unpaired, as before
    out = tmp_path / "f"
    shutil.rmtree(out / "eval_rocl_s0")
    assert rep.main([str(out), "--seeds", "0", "--budgets", "all", "--out", str(out / "r2"),
                     "--prior", str(out / "r" / "summary.json")]) == 0
    assert "SimCLR+Urkle > RoCL (paired, same 2000 images: +2.0 [+1.4, +2.6] points" in \
        (out / "r2" / "table.md").read_text()


def test_prior_fills_the_cells_a_lost_study_folder_held_for_the_methods_named(study, tmp_path, capsys):
    """A machine that lost part of the study's folder: --prior (the committed summary) fills those cells, marked
    †, and the ordering still reads them; a method left out of --prior-methods (its earlier numbers superseded)
    says what is missing instead. A file that is not a summary is refused."""
    import shutil

    rep = _report()
    args = [str(study), "--seeds", "0", "--budgets", "all", "5000"]
    assert rep.main(args + ["--out", str(tmp_path / "before")]) == 0
    before = tmp_path / "before" / "summary.json"
    for d in ("eval_rocl_s0", "eval_urkle_b0.01_s0", "select_b0.003_s0", "select_b0.01_s0", "select_s0",
              "tasks_rocl_s0"):
        shutil.rmtree(study / d)
    assert rep.main(args + ["--out", str(tmp_path / "lost")]) == 0
    lost = json.loads((tmp_path / "lost" / "summary.json").read_text())
    assert sum("missing" in r for r in lost["rows"]) == 5 + 3 and not lost["select"] and not lost["tasks"]

    assert rep.main(args + ["--out", str(tmp_path / "r"), "--prior", str(before)]) == 0
    assert "--prior: 3 row(s) filled" in capsys.readouterr().err  # RoCL all; SimCLR+Urkle all, 5000 (its choice)
    table = (tmp_path / "r" / "table.md").read_text()
    rows = {(r["name"], r["seed"], r["budget"]): r for r in json.loads((tmp_path / "r" / "summary.json").read_text())["rows"]}
    assert rows[("RoCL", 0, "all")]["prior"] and rows[("RoCL", 0, "all")]["headline"]["worst"][E8] == 0.20
    assert "prior" not in rows[("SimCLR", 0, "all")] and rows[("Standard", 0, "5000")]["missing"]
    assert "| RoCL † | 0 | all |" in table and "| SimCLR+Urkle (beta 0.01, S = 10) † | 0 | all |" in table
    assert f"† from {before}, an earlier report" in table
    assert "seed 0, labels all, 8/255: SimCLR+Urkle > RoCL (unpaired: +10.0 [+7.2, +12.8] points)" in table
    assert "| 0 † | 0.01 | 2000 |" in table and "| RoCL † | 0 | 60.0" in table  # the choice and the task too

    # SimCLR+Urkle's earlier numbers superseded: its cells say what is missing, RoCL's come back
    assert rep.main(args + ["--out", str(tmp_path / "r3"), "--prior", str(before), "--prior-methods", "rocl"]) == 0
    rows = {(r["name"], r["seed"], r["budget"]): r for r in json.loads((tmp_path / "r3" / "summary.json").read_text())["rows"]}
    assert rows[("SimCLR+Urkle", 0, "all")]["missing"] == "the held-out beta choice has not run"
    assert rows[("RoCL", 0, "all")]["prior"] and "| 0 † | 0.01" not in (tmp_path / "r3" / "table.md").read_text()

    # an earlier report of another evaluation protocol is refused, naming what differs
    other = json.loads(before.read_text())
    other["settings"]["square_queries"] = 5000
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert rep.main(args + ["--out", str(tmp_path / "r5"), "--prior", str(tmp_path / "other.json")]) == 2
    assert "square_queries (1000 here, 5000 there)" in capsys.readouterr().err and not (tmp_path / "r5").exists()
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert rep.main(args + ["--out", str(tmp_path / "r4"), "--prior", str(tmp_path / "bad.json")]) == 2
    assert "--prior" in capsys.readouterr().err and not (tmp_path / "r4").exists()

def test_ordering_says_so_when_a_model_was_not_evaluated_at_an_eps():
    rep = _report()
    rows = [dict(seed=0, budget="all", method=m, name=n, n_test=2000,
                 headline=rep._cell({"mu": _path(0.5, w, 0.1)}, "mu"))
            for m, n, w in (("simclr_urkle", "SimCLR+Urkle", 0.3), ("rocl", "RoCL", 0.2), ("simclr", "SimCLR", 0.0))]
    del rows[1]["headline"]["worst"][E16]
    rows[1]["headline"]["worst"][E16] = None
    assert rep._ordering(rows, 0, E16) == "seed 0, labels all, 16/255: not every model was evaluated at this eps"
    assert rep._ordering(rows, 0, E8).startswith("seed 0, labels all, 8/255: SimCLR+Urkle > RoCL (unpaired: +10.0 "
                                                 "[+7.2, +12.8] points); RoCL > SimCLR (unpaired: +20.0")
    assert rep._across_seeds(rows, [0, 1], E16, "all") == \
        "labels all, 16/255: 0 seed(s) with all three representations evaluated; needs 2"


def test_newcombe_interval_matches_the_published_examples():
    """Newcombe (1998), Stat. Med. 17:873, Table II, method 10 (the hybrid score interval from Wilson's)."""
    from urkle_fast.evaluation.attacks import wilson_interval

    rep = _report()
    for (a, n, b, m), (lo, hi) in (((56, 70, 48, 80), (0.0524, 0.3339)), ((9, 10, 3, 10), (0.1705, 0.8090))):
        d, got_lo, got_hi = rep.newcombe_difference(a / n, wilson_interval(a, n), b / m, wilson_interval(b, m))
        assert d == pytest.approx(a / n - b / m)
        assert (got_lo, got_hi) == (pytest.approx(lo, abs=5e-5), pytest.approx(hi, abs=5e-5))


def test_across_seeds_says_whether_every_seed_agrees():
    """Two seeds: SimCLR+Urkle ahead of RoCL in both at 8/255; at 16/255 ahead in seed 0, behind in seed 1."""
    rep = _report()
    worst = {0: {"SimCLR+Urkle": (0.30, 0.10), "RoCL": (0.20, 0.02), "SimCLR": (0.0, 0.0)},
             1: {"SimCLR+Urkle": (0.28, 0.02), "RoCL": (0.20, 0.10), "SimCLR": (0.01, 0.0)}}
    method = {"SimCLR+Urkle": "simclr_urkle", "RoCL": "rocl", "SimCLR": "simclr"}
    rows = [dict(seed=s, budget="all", method=method[n], name=n, n_test=2000,
                 headline=rep._cell({"mu": _path(0.5, w8, w16)}, "mu"))
            for s, got in worst.items() for n, (w8, w16) in got.items()]
    line8 = rep._across_seeds(rows, [0, 1], E8, "all")
    assert line8.startswith("labels all, 8/255: SimCLR+Urkle - RoCL: seed 0 +10.0 [+7.2, +12.8] unpaired, seed 1 "
                            "+8.0 [+5.2, +10.8] unpaired; mean +9.0 points; '>' in every seed; RoCL - SimCLR:")
    line16 = rep._across_seeds(rows, [0, 1], E16, "all")
    assert "SimCLR+Urkle - RoCL: seed 0 +8.0 [+5.2, +10.8] unpaired, seed 1 -8.0 [-10.8, -5.2] unpaired; mean " \
        "+0.0 points; the seeds disagree (seed 0 '>', seed 1 '<')" in line16
    table = rep.markdown(dict(rows=rows, settings={}, select=[], bound=[], tasks=[], times={}), ["all"])
    assert f"- {line8}" in table and f"- {line16}" in table
    one_seed = rep.markdown(dict(rows=rows[:3], settings={}, select=[], bound=[], tasks=[], times={}), ["all"])
    assert "## Across seeds" not in one_seed


def test_across_seeds_pairs_a_seed_whose_evaluations_kept_per_image_results():
    """Seed 0's three evaluations kept per-image bits on the same images (paired, Agresti-Min); seed 1's RoCL did
    not (unpaired, Newcombe): each seed's difference says which it is, and the paired one is the sharper."""
    rep = _report()
    n = 16
    right = {"SimCLR+Urkle": [True] * 8 + [False] * 8, "RoCL": [True] * 4 + [False] * 12, "SimCLR": [False] * n}

    def bits(ok):
        return bytes(sum(b << (7 - i) for i, b in enumerate(ok[k:k + 8])) for k in range(0, n, 8)).hex()

    method = {"SimCLR+Urkle": "simclr_urkle", "RoCL": "rocl", "SimCLR": "simclr"}
    rows = []
    for s in (0, 1):
        for name, ok in right.items():
            w = sum(ok) / n
            p = dict(_path(0.5, w, w), ok_bits={"worst": {E8: bits(ok), E16: bits(ok)}})
            if s == 1 and name == "RoCL":
                del p["ok_bits"]
            rows.append(dict(seed=s, budget="all", method=method[name], name=name, n_test=n,
                             headline=rep._cell({"mu": p}, "mu", fingerprint="same images")))
    line = rep._across_seeds(rows, [0, 1], E8, "all")
    d, lo, hi, only_a, only_b = rep.paired_difference(right["SimCLR+Urkle"], right["RoCL"])
    assert (d, only_a, only_b) == (0.25, 4, 0)
    paired = f"seed 0 +25.0 [{100 * lo:+.1f}, {100 * hi:+.1f}]"
    _, ulo, uhi = rep.newcombe_difference(0.5, [0.48, 0.52], 0.25, [0.23, 0.27])
    unpaired = f"seed 1 +25.0 [{100 * ulo:+.1f}, {100 * uhi:+.1f}] unpaired"
    assert f"SimCLR+Urkle - RoCL: {paired}, {unpaired}; mean +25.0 points" in line, line
    assert f"{paired} unpaired" not in line
    # RoCL - SimCLR: paired in seed 0 (4 images only RoCL gets right), unpaired in seed 1
    assert "RoCL - SimCLR: seed 0 +25.0 [" in line and line.count("unpaired") == 2


def test_simclr_urkle_z_mu_is_compared_with_rocl():
    """The deterministic-only comparison: SimCLR+Urkle's z = mu cell (not its S-sample headline) against RoCL,
    paired when both kept per-image results on the same images."""
    rep = _report()
    u_paths = {"mu": _path(0.5, 0.25, 0.06), "samples": _path(0.5, 0.20, 0.04)}
    bits = {E8: ("f0" * 25, "c0" * 25), E16: ("80" * 25, "00" * 25)}  # 200 images: 4 vs 2 of 8, 1 vs 0 of 8
    u = dict(seed=0, budget="all", method="simclr_urkle", name="SimCLR+Urkle", n_test=200,
             headline=rep._cell(u_paths, "samples"), z_mu=rep._cell(u_paths, "mu"))
    rocl = dict(seed=0, budget="all", method="rocl", name="RoCL", n_test=200,
                headline=rep._cell({"mu": _path(0.5, 0.20, 0.02)}, "mu"))
    line = rep._mu_vs_rocl([u, rocl], 0, E8, "all")
    d, lo, hi = rep.newcombe_difference(0.25, [0.23, 0.27], 0.20, [0.18, 0.22])
    assert line == (f"seed 0, labels all, 8/255: SimCLR+Urkle (z = mu) - RoCL +5.0 [{100 * lo:+.1f}, {100 * hi:+.1f}] "
                    f"'>' (unpaired; 25.0 [23.0, 27.0] against 20.0 [18.0, 22.0])")
    # paired: per-image bits on the same images
    u["z_mu"]["paired"] = dict(fingerprint="f", bits={e: b[0] for e, b in bits.items()})
    rocl["headline"]["paired"] = dict(fingerprint="f", bits={e: b[1] for e, b in bits.items()})
    paired = rep._mu_vs_rocl([u, rocl], 0, E8, "all")
    assert "(paired: 50 images right only for z = mu, 0 only for RoCL;" in paired
    assert rep._mu_vs_rocl([u], 0, E8, "all") is None and rep._mu_vs_rocl([u, rocl], 1, E8, "all") is None
    table = rep.markdown(dict(rows=[u, rocl], settings={}, select=[], bound=[], tasks=[], times={}), ["all"])
    assert "## SimCLR+Urkle's z = mu path against RoCL" in table and f"- {paired}" in table


def test_supervised_models_are_compared_with_simclr_urkle():
    """AT and TRADES against SimCLR+Urkle per seed, budget and eps; a model without a row is left out, and no line
    without SimCLR+Urkle's."""
    rep = _report()
    rows = [dict(seed=0, budget="all", method=m, name=n, n_test=2000, headline=rep._cell({"mu": _path(0.5, w8, w16)}, "mu"))
            for m, n, w8, w16 in (("simclr_urkle", "SimCLR+Urkle", 0.20, 0.05), ("at", "AT", 0.30, 0.06))]
    rows.append(dict(seed=0, budget="all", method="trades", name="TRADES", missing="model not trained yet"))
    line8 = rep._supervised_vs_urkle(rows, 0, E8, "all")
    d, lo, hi = rep.newcombe_difference(0.30, [0.28, 0.32], 0.20, [0.18, 0.22])
    assert line8 == f"seed 0, labels all, 8/255: AT - SimCLR+Urkle +10.0 [{100 * lo:+.1f}, {100 * hi:+.1f}] unpaired '>'"
    assert rep._supervised_vs_urkle(rows, 0, E16, "all").endswith("AT - SimCLR+Urkle +1.0 [-1.8, +3.8] unpaired '≈'")
    assert rep._supervised_vs_urkle(rows[1:], 0, E8, "all") is None  # no SimCLR+Urkle row
    assert rep._supervised_vs_urkle(rows, 1, E8, "all") is None  # no such seed
    table = rep.markdown(dict(rows=rows, settings={}, select=[], bound=[], tasks=[], times={}), ["all"])
    assert "## The supervised adversarial models against SimCLR+Urkle" in table and f"- {line8}" in table
    two = rows + [dict(r, seed=1) for r in rows]
    table = rep.markdown(dict(rows=two, settings={}, select=[], bound=[], tasks=[], times={}), ["all"])
    assert f"- {line8}" in table and "- seed 1, labels all, 8/255: AT - SimCLR+Urkle +10.0" in table
    no_urkle = rep.markdown(dict(rows=rows[1:], settings={}, select=[], bound=[], tasks=[], times={}), ["all"])
    assert "## The supervised adversarial models" not in no_urkle
