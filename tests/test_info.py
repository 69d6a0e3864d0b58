"""python -m urkle_fast.info reports versions and, per op and device, each backend and why it is missing."""

import json
import subprocess
import sys

import torch

from urkle_fast import _backend, info


def test_info_json_lists_every_op_device_backend():
    data = info.collect()
    assert data["torch"] == torch.__version__
    combos = {(r["op"], r["device"], r["backend"]) for r in data["backends"]}
    assert len(combos) == 3 * 2 * 3
    for r in data["backends"]:
        # a missing backend always says why; a present one says nothing
        assert r["present"] == (r["reason"] == ""), r
        if r["backend"] == "reference":
            assert r["present"]
    if not torch.cuda.is_available():
        assert all("no CUDA device" in r["reason"] for r in data["backends"]
                   if r["device"] == "cuda" and r["backend"] != "reference")
    native_cpu = next(r for r in data["backends"] if r[("op")] == "gaussian_kl" and r["device"] == "cpu"
                      and r["backend"] == "native")
    assert native_cpu["present"] == _backend.native_ops_present()
    import torch.distributed as dist

    assert ("gloo" in data["distributed"]) == dist.is_gloo_available()
    from urkle_fast.data.dali import dali_available

    assert data["dali_loader"].startswith("usable") == dali_available()[0]


def test_info_cli_prints_table():
    out = subprocess.run([sys.executable, "-m", "urkle_fast.info"], capture_output=True, text=True, check=True)
    assert "| op | device | backend | present | why not |" in out.stdout
    assert "selected backend per op and device" in out.stdout
    js = subprocess.run([sys.executable, "-m", "urkle_fast.info", "--json"], capture_output=True, text=True,
                        check=True)
    assert json.loads(js.stdout)["urkle_fast"]
