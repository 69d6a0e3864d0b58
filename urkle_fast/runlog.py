"""What a training run tells the outside world: metrics.jsonl, TensorBoard, the progress bar, curves.png.

One object so that the loop makes one call per step. Every rank calls ``step``: on logging steps the
metrics are averaged over ranks (a collective); only rank 0 writes.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from urkle_fast import distributed as udist
from urkle_fast.checkpoint import write_text_atomic


class RunLog:
    def __init__(self, out_dir: Path, *, main_rank: bool, log_every: int, start_step: int, end_step: int,
                 desc: str, progress: bool = True, tensorboard: bool = False, resumed: bool = False):
        self.out_dir, self.main_rank, self.log_every, self.end_step = out_dir, main_rank, log_every, end_step
        self.metrics_path = out_dir / "metrics.jsonl"
        self.file = self.writer = None
        if main_rank:
            if resumed and self.metrics_path.exists():
                self._keep_until(start_step)
            # a fresh start never appends to another run's records (train.setup refuses or --overwrite clears them)
            self.file = open(self.metrics_path, "a" if resumed else "w")
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                    self.writer = SummaryWriter(str(out_dir / "tb"))
                except ImportError:
                    print("tensorboard is not installed; metrics go to metrics.jsonl only", file=sys.stderr)
        from tqdm.auto import tqdm

        self.pbar = tqdm(total=end_step, initial=start_step, disable=not (progress and main_rank), unit="step",
                         dynamic_ncols=True, desc=desc)
        self.t_last, self.n_images = time.perf_counter(), 0

    def _keep_until(self, step: int) -> None:
        """Drop the records logged after the checkpoint we resume from (they are about to be redone) and
        any line a kill -9 or a full disk left torn."""
        keep, torn = [], 0
        for ln in self.metrics_path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(ln)
            except ValueError:
                torn += bool(ln.strip())
                continue
            if isinstance(rec, dict) and rec.get("step", step + 1) <= step:
                keep.append(ln)
        if torn:
            print(f"{self.metrics_path}: dropped {torn} torn line(s)", file=sys.stderr)
        write_text_atomic(self.metrics_path, "".join(ln + "\n" for ln in keep))

    def step(self, step: int, epoch: int, loss: float, lr: float, metrics: dict, images: int) -> None:
        """After optimiser step ``step`` (1-based): every ``log_every`` steps and at the end, one record."""
        self.n_images += images
        if step % self.log_every == 0 or step == self.end_step:
            names = sorted(metrics)
            values = udist.all_reduce_mean(torch.stack([metrics[k].detach().float() for k in names])) if names else []
            dt = time.perf_counter() - self.t_last
            rec = {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "img_per_s": self.n_images / max(dt, 1e-9),
                   **{k: float(v) for k, v in zip(names, values)}}
            self.t_last, self.n_images = time.perf_counter(), 0
            if self.main_rank:
                self.file.write(json.dumps(rec) + "\n")
                self.file.flush()
                if self.writer is not None:
                    for k, v in rec.items():
                        if k not in ("step", "epoch"):
                            self.writer.add_scalar(k, v, step)
                self.pbar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rec['img_per_s']:.0f}")
        self.pbar.update(1)

    def chunk(self, done: int, total: int, images: int) -> None:
        """Inside a micro-batched step (urkle_fast.microbatch's on_chunk): "chunk done/total" and the images per
        second of the backward chunks so far, so that a step of minutes is not a frozen bar."""
        if self.pbar.disable:
            return
        now = time.perf_counter()
        if done == 1 or not hasattr(self, "_chunk_t0"):
            self._chunk_t0, self._chunk_images = now, 0
        self._chunk_images += images
        rate = self._chunk_images / max(now - self._chunk_t0, 1e-9)
        self.pbar.set_postfix_str(f"chunk {done}/{total}" + (f", {rate:.1f} img/s" if self._chunk_images else ""))

    def write(self, text: str) -> None:
        """A line above the progress bar (stderr), not in the metrics."""
        self.pbar.write(text, file=sys.stderr)

    def close(self, title: Optional[str] = None, label: str = "") -> None:
        """Flush and close; with a title, draw <out_dir>/curves.png (rank 0), the curves labelled ``label``."""
        self.pbar.close()
        if self.file is not None:
            self.file.close()
            self.file = None
            if title is not None:
                plot_curves({label: str(self.metrics_path)}, str(self.out_dir / "curves.png"), title)
        if self.writer is not None:
            self.writer.close()


def plot_curves(runs: dict, path: str, title: str) -> Optional[str]:
    """Training curves PNG (urkle_fast.evaluation.plots); skipped with a note when nothing is logged yet
    or matplotlib is missing - a plot never fails a run."""
    try:
        from urkle_fast.evaluation.plots import plot_training_curves

        return plot_training_curves(runs, path, title)
    except Exception as exc:  # noqa: BLE001 - matplotlib, a full disk, no records yet: the run's result stands
        print(f"training curves not plotted: {exc}", file=sys.stderr)
        return None
