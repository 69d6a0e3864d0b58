"""bench/report.py: one pytest-benchmark JSON or several read as one (bench/gpu_check.sh merges one file per
suite as each ends, so that a stage's time limit keeps what finished), the merged file written atomically."""

import importlib.util
import json
from pathlib import Path

import pytest

# loaded by path: putting bench/ on sys.path would let its conftest.py shadow the tests' own
_spec = importlib.util.spec_from_file_location("bench_report", Path(__file__).resolve().parents[1] / "bench" / "report.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)


def _bench_file(path, op, medians, date):
    benchmarks = [dict(name=f"{op}[{v}]", stats=dict(median=m, min=m, iqr=0.0, rounds=5),
                       extra_info=dict(op=op, mode="fwd", case="c", variant=v, device_name="dev", torch="t"))
                  for v, m in medians.items()]
    path.write_text(json.dumps(dict(machine_info=dict(python_version="3.11"), datetime=date, benchmarks=benchmarks)))
    return str(path)


def test_several_files_merge_into_one_table_and_json(tmp_path, capsys):
    a = _bench_file(tmp_path / "a.json", "nt_xent", dict(fused=0.001, eager=0.004, compiled=0.002), "first")
    b = _bench_file(tmp_path / "b.json", "gaussian_kl", dict(fused=0.003, eager=0.006), "second")
    merged = tmp_path / "merged.json"
    assert report.main([a, b, "--write-json", str(merged)]) == 0
    table = capsys.readouterr().out
    assert "| nt_xent | fwd | c | 1.000 | 4.000 | 2.000 | 0.25 | 0.50 |" in table
    assert "| gaussian_kl | fwd | c | 3.000 | 6.000 | - | 0.50 | - |" in table  # compiled did not run
    assert "run first." in table  # the first file's date
    data = json.loads(merged.read_text())
    assert [x["extra_info"]["op"] for x in data["benchmarks"]] == ["nt_xent"] * 3 + ["gaussian_kl"] * 2
    assert not (tmp_path / "merged.json.tmp").exists()
    # merging into the file that is being read (gpu_check.sh: bench.json + the next suite -> bench.json)
    c = _bench_file(tmp_path / "c.json", "pgd", dict(fused=0.002), "third")
    assert report.main([str(merged), c, "--write-json", str(merged)]) == 0
    assert len(json.loads(merged.read_text())["benchmarks"]) == 6


def test_a_missing_file_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        report.main([str(tmp_path / "nope.json")])
    assert exc.value.code == 2
    assert "json: no such file:" in capsys.readouterr().err
