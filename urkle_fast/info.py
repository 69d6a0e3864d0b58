"""``python -m urkle_fast.info``: versions, devices, and which backend runs each op on each device
(and why a missing one is missing)."""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys

import torch

from urkle_fast import __version__, _backend

OPS = ("gaussian_kl", "pgd", "nt_xent")


def _version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
        return getattr(mod, "__version__", "present")
    except Exception as exc:  # an absent optional package is information, not an error
        return f"absent ({type(exc).__name__})"


def _distributed() -> str:
    import torch.distributed as dist

    if not dist.is_available():
        return "unavailable in this torch build"
    have = [name for name, ok in (("nccl", dist.is_nccl_available()), ("gloo", dist.is_gloo_available())) if ok]
    return "backends " + (", ".join(have) or "none")


def _dali() -> str:
    from urkle_fast.data.dali import dali_available

    ok, why = dali_available()
    return "usable (--loader dali)" if ok else why


def collect() -> dict:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {
        "urkle_fast": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "torchvision": _version("torchvision"),
        "nvidia.dali": _version("nvidia.dali"),
        "numpy": _version("numpy"),
        "cpu_threads": torch.get_num_threads(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "triton_interpret": _backend.interpreting(),
        "extension": "loaded" if _backend.native_ops_present() else f"missing: {_backend._C_ERROR}",
        "extension_cuda_kernels": _backend.cuda_native_built(),
        "distributed": _distributed(),
        "dali_loader": _dali(),
        "selected": {op: {d: _backend.select(op, torch.device(d)) for d in devices} for op in OPS},
        "backends": _backend.table(),
    }


def render(info: dict) -> str:
    lines = ["urkle_fast " + info["urkle_fast"], ""]
    for key in ("python", "platform", "torch", "torch_cuda", "triton", "torchvision", "nvidia.dali", "numpy",
                "cpu_threads", "cuda_devices", "triton_interpret", "extension", "extension_cuda_kernels",
                "distributed", "dali_loader"):
        lines.append(f"{key:>22}: {info[key]}")
    lines += ["", "selected backend per op and device:"]
    for op, per_dev in info["selected"].items():
        lines.append(f"  {op:<12} " + ", ".join(f"{d}: {b}" for d, b in per_dev.items()))
    lines += ["", "| op | device | backend | present | why not |", "| --- | --- | --- | --- | --- |"]
    for r in info["backends"]:
        lines.append(f"| {r['op']} | {r['device']} | {r['backend']} | {'yes' if r['present'] else 'no'} | "
                     f"{r['reason']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m urkle_fast.info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
