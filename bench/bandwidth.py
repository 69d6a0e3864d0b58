"""Copy bandwidth of the device, the roofline for the memory-bound ops (KL, PGD).

    python bench/bandwidth.py [--device cpu|cuda] [--mib 1024]

Times ``dst.copy_(src)`` of a large uint8 tensor (CUDA events on the GPU, perf_counter on the CPU) and
prints a markdown table; GB/s counts the bytes read plus the bytes written (2 x size).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def copy_gbps(device: str, nbytes: int, reps: int = 20) -> tuple[float, float]:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
    else:
        for _ in range(reps):
            t = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t)
    med, best = statistics.median(times), min(times)
    return 2 * nbytes / med / 1e9, 2 * nbytes / best / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    ap.add_argument("--mib", type=int, default=None, help="tensor size in MiB (default 2048 on CUDA, 256 on CPU)")
    args = ap.parse_args(argv)
    mib = args.mib or (2048 if args.device == "cuda" else 256)
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    med, best = copy_gbps(args.device, mib << 20)
    print(f"| device | copy size | GB/s (median) | GB/s (best) |\n|---|---:|---:|---:|\n"
          f"| {name} | {mib} MiB | {med:.1f} | {best:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
