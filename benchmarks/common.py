"""Measurement primitives shared by the benchmark programs (``benchmarks/bench_<op>.py``): timing,
peak memory, run metadata, the results CSV and its plots. Comparing providers over a sweep of
sizes, built on these, is :mod:`benchmarks.sweep`.

- :func:`measure`: warmup, adaptive repetitions, median and quantiles, and the peak *extra* memory
  of the timed call (CUDA: the caching allocator's peak; CPU: the process RSS high-water mark,
  reset through ``/proc/self/clear_refs`` before each call).
- :func:`run_metadata`: machine, versions and git commit, stored with every CSV row.
- :func:`append_rows`: the long-format results CSV (created with its header when missing).
- :func:`plot_time_vs_size`: one log-log PNG per op, one line per provider.

Ratios between providers must come from one run (these machines are noisy), so callers measure
their baselines next to the providers they compare.
"""
from __future__ import annotations

import csv
import ctypes
import datetime as _dt
import gc
import math
import os
import platform
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
MB = float(1 << 20)


# ---------------------------------------------------------------- statistics
def quantile(values: list, q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a non-empty list."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class Measurement:
    times_ms: list
    peak_extra_bytes: Optional[int]  # None: this platform cannot measure it
    warmup_ms: float
    result: object = None  # what the warmup call returned (e.g. the loss, for a sanity check)

    @property
    def reps(self) -> int:
        return len(self.times_ms)

    @property
    def median_ms(self) -> float:
        return quantile(self.times_ms, 0.5)

    @property
    def p20_ms(self) -> float:
        return quantile(self.times_ms, 0.2)

    @property
    def p80_ms(self) -> float:
        return quantile(self.times_ms, 0.8)

    @property
    def peak_extra_mb(self) -> Optional[float]:
        return None if self.peak_extra_bytes is None else self.peak_extra_bytes / MB


@dataclass
class RepPolicy:
    """How many timed calls: enough for ``budget_s`` of wall time (setup included), within
    [min_reps, max_reps], but never more than fit in ``max_s`` (at least one call is made).

    A call that takes ``long_call_s`` or more needs no warmup of its own (one-time costs are
    negligible beside it): the warmup call then counts as the first timed call.
    """

    warmup: int = 1
    min_reps: int = 3
    max_reps: int = 20
    budget_s: float = 20.0
    max_s: float = 40.0
    long_call_s: float = 5.0

    def timed_calls(self, seconds_per_call: float) -> int:
        per_call = max(seconds_per_call, 1e-6)
        wanted = max(self.min_reps, min(self.max_reps, int(self.budget_s / per_call)))
        return max(1, min(wanted, int(self.max_s / per_call)))

    def warmup_counts(self, seconds_per_call: float) -> bool:
        return seconds_per_call >= self.long_call_s


# ---------------------------------------------------------------- peak memory
class _CpuMemory:
    """RSS high-water mark of this process: reset via clear_refs, read from /proc/self/status."""

    def __init__(self):
        self.reason = None
        try:
            self._reset()
        except OSError as err:
            self.reason = f"cannot reset the RSS high-water mark (/proc/self/clear_refs: {err})"
        try:
            self._libc = ctypes.CDLL("libc.so.6")
        except OSError:
            self._libc = None

    @staticmethod
    def _status_kb(key: str) -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise OSError(f"{key} missing from /proc/self/status")

    @staticmethod
    def _reset() -> None:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # 5: reset the peak RSS to the current RSS

    def release_free_memory(self) -> None:
        """Return freed heap pages to the OS, so a reused heap chunk is not 'free' extra memory."""
        gc.collect()
        if self._libc is not None:
            self._libc.malloc_trim(0)

    def start(self) -> Optional[int]:
        if self.reason:
            return None
        self._reset()
        return self._status_kb("VmRSS")

    def extra_bytes(self, start_kb: Optional[int]) -> Optional[int]:
        if start_kb is None:
            return None
        return max(0, self._status_kb("VmHWM") - start_kb) * 1024


class _CudaMemory:
    reason = None

    def __init__(self, device: torch.device):
        self.device = device

    def release_free_memory(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()

    def start(self) -> int:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def extra_bytes(self, start: int) -> int:
        return max(0, torch.cuda.max_memory_allocated(self.device) - start)


_CPU_MEMORY: Optional[_CpuMemory] = None


def memory_probe(device: torch.device):
    global _CPU_MEMORY
    if device.type == "cuda":
        return _CudaMemory(device)
    if _CPU_MEMORY is None:
        _CPU_MEMORY = _CpuMemory()
        if _CPU_MEMORY.reason:
            warnings.warn(f"peak memory not measured: {_CPU_MEMORY.reason}")
    return _CPU_MEMORY


def available_memory_bytes(device: torch.device) -> int:
    """Memory a benchmark may still use: MemAvailable on CPU, free device memory on CUDA."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("MemAvailable missing from /proc/meminfo")


# ---------------------------------------------------------------- timing
class _Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def __call__(self, fn, arg):
        """(milliseconds, result) of ``fn(arg)``; device work is waited for."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(arg)
            stop.record()
            stop.synchronize()
            return start.elapsed_time(stop), out
        begin = time.perf_counter()
        out = fn(arg)
        return (time.perf_counter() - begin) * 1e3, out


def measure(fn: Callable, *, device: torch.device, setup: Optional[Callable] = None,
            policy: RepPolicy = RepPolicy(), memory: bool = True) -> Measurement:
    """Time ``fn(setup())``; ``setup`` (e.g. the forward before a timed backward) is not timed.

    The peak extra memory is the maximum over the timed calls of (peak during the call) minus
    (memory in use just before it, after ``setup``). Freed memory is handed back to the OS
    before the first timed call, so that it pays for every page it touches.
    """
    setup = setup or (lambda: None)
    timer = _Timer(device)
    probe = memory_probe(device) if memory else None

    def call():
        """(seconds of setup, ms of fn, fn's result, peak extra bytes or None)."""
        begin = time.perf_counter()
        arg = setup()
        setup_s = time.perf_counter() - begin
        start = probe.start() if probe is not None else None
        ms, out = timer(fn, arg)
        extra = probe.extra_bytes(start) if probe is not None and start is not None else None
        return setup_s, ms, out, extra

    warmups = max(1, policy.warmup)
    for i in range(warmups):
        if probe is not None and i == warmups - 1:
            probe.release_free_memory()  # the last warmup may count as a timed call
        setup_s, warm_ms, result, warm_extra = call()
    result = (result.detach().item()
              if isinstance(result, torch.Tensor) and result.numel() == 1 else None)
    per_call = setup_s + warm_ms / 1e3
    timed = policy.timed_calls(per_call)
    times, peaks = [], []
    if policy.warmup_counts(per_call):
        times, peaks, timed = [warm_ms], [warm_extra], timed - 1
    elif probe is not None:
        probe.release_free_memory()
    for _ in range(timed):
        _, ms, out, extra = call()
        del out
        times.append(ms)
        peaks.append(extra)
    peaks = [p for p in peaks if p is not None]
    return Measurement(times, max(peaks) if peaks else None, warm_ms, result)


# ---------------------------------------------------------------- metadata
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(root: Path = REPO_ROOT) -> str:
    """Short commit hash, '+dirty' when the work tree differs; 'none' before the first commit."""
    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=20)
    try:
        head = git("rev-parse", "--short=12", "HEAD")
        commit = head.stdout.strip() if head.returncode == 0 else "none"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def run_metadata(device: torch.device) -> dict:
    """Columns shared by every row of one run."""
    now = _dt.datetime.now().astimezone()
    return {
        "run_id": now.strftime("%Y%m%dT%H%M%S"),
        "commit": git_commit(),
        "machine": f"{cpu_model()} ({os.cpu_count()} cores)",
        "device": device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }


def load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return ""


def timestamp() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


# ---------------------------------------------------------------- CSV (long format)
def append_rows(path: Path, rows: list, columns: list) -> None:
    """Append ``rows`` (dicts) to ``path``, writing ``columns`` as the header if it is new.

    An existing file keeps its own header: values for unknown columns are dropped (with a
    warning) so older result files stay readable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = columns
    if path.exists() and path.stat().st_size > 0:
        with open(path, newline="") as existing:
            header = next(csv.reader(existing), columns)
        missing = [c for c in columns if c not in header]
        if missing:
            warnings.warn(f"{path} has an older header; not writing columns {missing}")
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=header, extrasaction="ignore")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(v) for k, v in row.items()})


def _fmt(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def read_rows(path: Path) -> list:
    with open(path, newline="") as src:
        return list(csv.DictReader(src))


# ---------------------------------------------------------------- plots
def _latest_per_point(rows: list, op: str, mode: str) -> list:
    """Rows of op/mode on the newest row's device, d and dtype; the newest per (provider, n)."""
    ok = [r for r in rows
          if r.get("op") == op and r.get("mode") == mode and r.get("status") == "ok"]
    if not ok:
        return []
    newest = max(ok, key=lambda r: r["timestamp"])
    same = [r for r in ok if all(r.get(k) == newest.get(k) for k in ("device", "d", "dtype"))]
    points = {}
    for row in sorted(same, key=lambda r: r["timestamp"]):
        points[(row["provider"], int(row["n"]))] = row
    return list(points.values())


def plot_time_vs_size(csv_path: Path, op: str, mode: str = "full", out_path: Optional[Path] = None,
                      baselines=("1mm", "3mm", "4mm")) -> Optional[Path]:
    """Median time vs N (log-log) for every provider of ``op``; returns the PNG path or None."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    csv_path = Path(csv_path)
    points = _latest_per_point(read_rows(csv_path), op, mode)
    if not points:
        return None
    out_path = Path(out_path or csv_path.with_name(f"{csv_path.stem}_{op}_{mode}.png"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for provider in sorted({p["provider"] for p in points}):
        mine = sorted((int(p["n"]), float(p["median_ms"]), float(p["p20_ms"]), float(p["p80_ms"]))
                      for p in points if p["provider"] == provider)
        n, med, lo, hi = zip(*mine)
        style = dict(color="black", linestyle="--") if provider in baselines else dict(marker="o")
        (line,) = ax.plot(n, med, label=provider, **style)
        ax.fill_between(n, lo, hi, alpha=0.15, color=line.get_color())
    sample = points[0]
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("N = M (rows of each embedding set)")
    ax.set_ylabel(f"{mode} time, median ms (band: p20-p80)")
    ax.set_title(f"{op} {mode}: D={sample['d']} {sample['dtype']} on {sample['device']}\n"
                 f"{sample['machine']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = out_path.with_name(out_path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    os.replace(tmp, out_path)
    return out_path


def ops_in(csv_path: Path) -> list:
    return sorted({r["op"] for r in read_rows(csv_path) if r.get("op")})
