"""What a run reports: ``metrics.jsonl``, TensorBoard scalars and images, a progress bar.

Only rank 0 writes (other ranks get a logger with ``enabled=False`` that does nothing).

``DIR/metrics.jsonl`` holds one JSON object per logged step: ``step``, ``loss_d``, ``loss_g``,
every unweighted loss term (``d_hinge``, ``d_sentence``, ``g_word``, ...), ``images_per_s`` (real
images consumed per second over all ranks), ``data_wait_s`` (mean seconds per step spent waiting
for batches), ``step_time_s`` and ``elapsed_s``. TensorBoard event files (``DIR/tensorboard``) get
the same scalars under ``train/`` and the sample grids under ``samples``.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from fastxmc.atomic import append_line, atomic_write_text

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _records(text: str) -> list:
    """Parse metrics lines; a last line cut short (the process was killed mid-write) is dropped."""
    lines = [line for line in text.splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise
    return records


def truncate_metrics(run_dir, last_step: int) -> None:
    """Drop logged steps after ``last_step`` (a resumed run logs them again)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    kept = [r for r in _records(path.read_text()) if r["step"] <= last_step]
    atomic_write_text("".join(json.dumps(r) + "\n" for r in kept), path)


def read_metrics(run_dir) -> list:
    """The logged records of a run, in order."""
    return _records((Path(run_dir) / METRICS_FILE).read_text())


def _format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _json_value(value):
    value = float(value)
    return value if math.isfinite(value) else str(value)  # JSON has no nan/inf


class RunLogger:
    """Writes metrics and images of the run in ``run_dir`` and drives the progress bar.

    Args:
        run_dir: the run directory.
        enabled: False on every rank but 0.
        total_steps / start_step: for the progress bar's ETA.
        tensorboard: write TensorBoard event files.
        quiet: no progress bar (it is also off when stderr is not a terminal).
    """

    def __init__(self, run_dir, *, enabled: bool, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, quiet: bool = False):
        self.enabled, self.quiet = enabled, quiet
        self.run_dir = Path(run_dir)
        self.total_steps, self._start = total_steps, (start_step, time.perf_counter())
        self._writer = self._bar = None
        self._metrics = self.run_dir / METRICS_FILE
        if not enabled:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR), purge_step=start_step + 1)
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log_metrics(self, step: int, values: dict) -> None:
        """One ``metrics.jsonl`` record and the TensorBoard scalars of ``step``."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _json_value(v) for k, v in values.items()}}
        append_line(self._metrics, json.dumps(record))
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(f"train/{key}", float(value), step)

    def log_scalar(self, tag: str, value: float, step: int) -> None:
        """One TensorBoard scalar outside the per-step metrics record."""
        if self.enabled and self._writer is not None:
            self._writer.add_scalar(tag, float(value), step)

    def log_image(self, tag: str, image: np.ndarray, step: int) -> None:
        """An (H, W, 3) uint8 image to TensorBoard."""
        if self.enabled and self._writer is not None:
            self._writer.add_image(tag, image, step, dataformats="HWC")

    def advance(self, step: int, losses: dict | None = None) -> None:
        """Move the progress bar to ``step``; ``losses`` (name -> float) go in its postfix."""
        if self._bar is None:
            return
        self._bar.update(step - self._bar.n)
        if losses:
            self._bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()}, refresh=False)

    def print_progress(self, step: int, losses: dict) -> None:
        """Without a progress bar (not a terminal) and unless quiet: one line with the losses and
        the ETA; call it at logged steps."""
        if not self.enabled or self.quiet or self._bar is not None:
            return
        first, t0 = self._start
        done, left = step - first, self.total_steps - step
        eta = (time.perf_counter() - t0) / done * left if done > 0 else float("nan")
        parts = " ".join(f"{k} {v:.4f}" for k, v in losses.items())
        self.message(f"step {step}/{self.total_steps} {parts} eta {_format_seconds(eta)}")

    def restart_clock(self) -> None:
        """Measure the ETA from now: call it before the first step, after work such as D's warm-up."""
        self._start = (self._start[0], time.perf_counter())
        if self._bar is not None:
            self._bar.reset(total=self.total_steps)
            self._bar.update(self._start[0])

    def message(self, text: str) -> None:
        """A line on stderr (through the bar when there is one, so it is not garbled)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        for handle in (self._bar, self._writer):
            if handle is not None:
                handle.close()
        self._writer = self._bar = None
