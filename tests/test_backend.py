"""Backend dispatch: the env override, use_backend(), and a missing backend as a warning plus a
fallback to the reference (never a crash)."""

import subprocess
import sys
import warnings

import pytest
import torch

from urkle_fast import _backend, gaussian_kl, gaussian_kl_reference


def test_use_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match=r"backend: expected one of \('triton', 'native', 'reference'\) or None, "
                                         r"got 'cuda'"):
        with _backend.use_backend("cuda"):
            pass


def test_env_override_bad_value_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("URKLE_FAST_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"URKLE_FAST_BACKEND: expected one of .* got 'fast'"):
        _backend.select("gaussian_kl", torch.device("cpu"))


def test_env_override_selects_reference(monkeypatch):
    monkeypatch.setenv("URKLE_FAST_BACKEND", "reference")
    assert _backend.select("nt_xent", torch.device("cpu")) == "reference"


def test_missing_native_backend_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(_backend, "_C", None)
    monkeypatch.setattr(_backend, "_C_ERROR", "ImportError: simulated")
    monkeypatch.setattr(_backend, "_warned", set())
    with _backend.use_backend("native"):
        with pytest.warns(RuntimeWarning, match=r"backend 'native' unavailable on cpu \(urkle_fast._C failed to "
                                                r"import \(ImportError: simulated\)"):
            assert _backend.select("gaussian_kl", torch.device("cpu")) == "reference"
        x = [torch.randn(3, 4) for _ in range(4)]
        torch.testing.assert_close(gaussian_kl(*x), gaussian_kl_reference(*x))
        # once: a second choice, even after the cache is cleared, is silent
        _backend._select_cached.cache_clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _backend.select("gaussian_kl", torch.device("cpu")) == "reference"


def test_missing_native_backend_warns_on_cpu_without_forcing(monkeypatch):
    # the default CPU choice, nothing forced: a build without the extension says so once per op
    monkeypatch.setattr(_backend, "_C", None)
    monkeypatch.setattr(_backend, "_C_ERROR", "ImportError: simulated")
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.delenv("URKLE_FAST_BACKEND", raising=False)
    _backend._select_cached.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"urkle_fast.nt_xent: backend 'native' unavailable on cpu"):
            assert _backend.select("nt_xent", torch.device("cpu")) == "reference"
        _backend._select_cached.cache_clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _backend.select("nt_xent", torch.device("cpu")) == "reference"
    finally:
        _backend._select_cached.cache_clear()


def test_import_never_crashes_without_extension(tmp_path):
    # a package directory without the compiled extension still imports and runs the reference
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'urkle_fast._C': raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, urkle_fast\n"
        "from urkle_fast import _backend\n"
        "assert not _backend.native_ops_present()\n"
        "x=[torch.randn(3,4) for _ in range(4)]\n"
        "print(float(urkle_fast.gaussian_kl(*x)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) > 0


def test_finite_checks_default_to_cpu_only(monkeypatch):
    from urkle_fast.ops._checks import check_finite_enabled

    monkeypatch.delenv("URKLE_FAST_CHECK_FINITE", raising=False)
    assert check_finite_enabled(torch.device("cpu")) and not check_finite_enabled(torch.device("cuda"))
    monkeypatch.setenv("URKLE_FAST_CHECK_FINITE", "1")
    assert check_finite_enabled(torch.device("cuda"))
    monkeypatch.setenv("URKLE_FAST_CHECK_FINITE", "0")
    assert not check_finite_enabled(torch.device("cpu"))
    # off: a NaN passes through to the kernel instead of raising
    x = [torch.randn(3, 4) for _ in range(4)]
    x[0][0, 0] = float("nan")
    assert torch.isnan(gaussian_kl(*x))
