"""Comparing providers of one op over a sweep of sizes, and reporting it: the scaffolding shared
by the kernel benchmarks (``bench_infonce``, ``bench_region_word``, ``bench_word_attention``,
``bench_modulation``), built on the measurement primitives of :mod:`benchmarks.common`.

- :class:`Row`: one (provider, mode) of a sweep, measured, skipped or failed;
  :func:`memory_skip` skips a provider whose estimated peak would not fit.
- :func:`mode_calls` / :func:`measure_mode` / :func:`run_provider`: fwd, bwd and full of one
  provider.
- :class:`GemmBaseline` (k matrix products per mode) and :class:`Baselines` (what later rows of a
  case are compared with: GEMM and reference medians, the reference's memory and loss).
- :func:`backend_reason` / :func:`default_backend` / :func:`select_providers`: which providers
  run.
- :func:`csv_row` / :func:`report` / :func:`print_table_row` and the header lines: each row
  printed and appended to the results CSV as soon as it is measured.
- :func:`argument_parser`, the ``add_*`` helpers, :func:`resolve_modes` and :func:`run_main`:
  the shared command line.
"""
from __future__ import annotations

import argparse
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch

from benchmarks.common import (MB, Measurement, RepPolicy, append_rows, available_memory_bytes,
                               load_average, measure, run_metadata, timestamp)

MODES = ("fwd", "bwd", "full")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "fp64": torch.float64}
MEMORY_SHARE = 0.7  # skip a provider whose estimated peak exceeds this share of available memory


# ---------------------------------------------------------------- rows of a sweep
@dataclass
class Row:
    """One (provider, mode) of a sweep: ``status`` "ok" with its measurement, else "skipped",
    "oom" or "error" with the reason in ``note``."""

    provider: str
    mode: str
    status: str
    result: Optional[Measurement] = None
    note: str = ""
    checksum: Optional[float] = None  # a scalar of the output, where providers are compared by one

    def __post_init__(self):
        # When it was measured, and how loaded the machine was then.
        self.timestamp, self.loadavg = timestamp(), load_average()

    @classmethod
    def failed(cls, provider: str, mode: str, err: BaseException) -> "Row":
        """The row of a call that raised: "oom" for an out-of-memory error, else "error"."""
        oom = isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()
        first_line = (str(err).splitlines() or [""])[0][:200]
        return cls(provider, mode, "oom" if oom else "error",
                   note=f"{type(err).__name__}: {first_line}")

    @classmethod
    def skipped(cls, provider: str, modes, why: str) -> list:
        """One "skipped" row per mode, saying ``why``."""
        return [cls(provider, mode, "skipped", note=why) for mode in modes]


def memory_skip(need_bytes: float, device: torch.device,
                share: float = MEMORY_SHARE) -> Optional[str]:
    """Why a call whose peak is estimated at ``need_bytes`` would not fit (None: it fits), i.e.
    when it exceeds ``share`` of the memory still available."""
    free = available_memory_bytes(device)
    if need_bytes <= share * free:
        return None
    return f"estimated peak {need_bytes / MB:.0f} MB > {share:.0%} of available {free / MB:.0f} MB"


# ---------------------------------------------------------------- timing one provider
def mode_calls(forward: Callable, params: list, mode: str, upstream=None,
               keep_output: bool = True) -> tuple:
    """(setup, timed call) of ``mode`` for :func:`measure`; ``params``' gradients are cleared
    before every call.

    ``forward()`` returns the output; ``upstream`` is its gradient (None: a scalar loss). Modes:
    ``fwd`` the forward with autograd recording, ``bwd`` the backward alone (the forward runs
    untimed in the setup), ``full`` both. In ``full`` the call returns the detached output (for a
    scalar loss, what :func:`measure` records), so that it is freed after the timing;
    ``keep_output=False`` returns None and frees it inside the timed call.
    """
    def clear():
        for p in params:
            p.grad = None

    def forward_after_clear():
        clear()
        return forward()

    def full(_):
        out = forward()
        out.backward(upstream)
        return out.detach() if keep_output else None

    if mode == "fwd":
        return clear, lambda _: forward()
    if mode == "bwd":
        return forward_after_clear, lambda out: out.backward(upstream)
    return clear, full


def measure_mode(forward: Callable, params: list, mode: str, device: torch.device,
                 policy: RepPolicy, upstream=None, keep_output: bool = True) -> Measurement:
    """:func:`measure` of :func:`mode_calls`; the gradients are cleared afterwards (also when
    it raises)."""
    setup, call = mode_calls(forward, params, mode, upstream, keep_output)
    try:
        return measure(call, setup=setup, device=device, policy=policy)
    finally:
        for p in params:
            p.grad = None


def run_provider(name: str, forward: Callable, params: list, modes, device: torch.device,
                 policy: RepPolicy, upstream=None,
                 checksum: Optional[Callable] = None) -> Iterator[Row]:
    """Yields one Row per mode as soon as it is measured (see :func:`mode_calls`); a mode that
    raises gives a failed row and the next mode still runs. ``checksum()``, when given, is stored
    in the fwd row (computed after the timing)."""
    for mode in modes:
        try:
            res = measure_mode(forward, params, mode, device, policy, upstream)
            check = checksum() if checksum is not None and mode == "fwd" else None
            row = Row(name, mode, "ok", res, checksum=check)
        except Exception as err:  # noqa: BLE001 - report and go on with the other providers
            row = Row.failed(name, mode, err)
        yield row


@dataclass(frozen=True)
class GemmBaseline:
    """``per_mode[mode]`` matrix products (named e.g. "4mm") per mode: the work a fused kernel
    does at least, timed in the same run as the providers it bounds."""

    per_mode: dict  # mode -> k
    unit: str = "mm"

    def name(self, mode: str) -> str:
        return f"{self.per_mode[mode]}{self.unit}"

    def rows(self, gemm_calls: Callable, modes, device: torch.device,
             policy: RepPolicy) -> Iterator[Row]:
        """One Row per mode; ``gemm_calls(k)`` returns the timed call of k products."""
        for mode in modes:
            try:
                yield Row(self.name(mode), mode, "ok",
                          measure(gemm_calls(self.per_mode[mode]), device=device, policy=policy))
            except Exception as err:  # noqa: BLE001
                yield Row.failed(self.name(mode), mode, err)


@dataclass
class Baselines:
    """What later rows of one case are compared with, per mode: the medians of the GEMM baseline
    (rows named ``gemm_name(mode)``) and of the ``reference`` provider, the reference's peak extra
    memory, and its last loss (the scalar its calls returned)."""

    reference: str
    gemm_name: Optional[Callable] = None
    gemm_ms: dict = field(default_factory=dict)
    ref_ms: dict = field(default_factory=dict)
    ref_mb: dict = field(default_factory=dict)
    ref_loss: Optional[float] = None

    def record(self, row: Row) -> None:
        if row.status != "ok":
            return
        res = row.result
        if self.gemm_name is not None and row.provider == self.gemm_name(row.mode):
            self.gemm_ms[row.mode] = res.median_ms
        if row.provider == self.reference:
            self.ref_ms[row.mode] = res.median_ms
            self.ref_mb[row.mode] = res.peak_extra_mb
            self.ref_loss = res.result if res.result is not None else self.ref_loss

    def check_loss(self, row: Row, abs_tol: float, rel_tol: float = 2e-3) -> None:
        """Note a loss mismatch with the reference's in ``row`` (they must compute the same)."""
        value = row.result.result if row.result is not None else None
        if value is None or self.ref_loss is None or row.provider == self.reference:
            return
        if not math.isclose(value, self.ref_loss, rel_tol=rel_tol, abs_tol=abs_tol):
            row.note = (row.note + f" LOSS MISMATCH {value:.6g} vs {self.reference} "
                        f"{self.ref_loss:.6g}").strip()

    def recorded(self, rows: Iterable[Row], loss_abs_tol: Optional[float] = None) -> Iterator[Row]:
        """``rows`` as they come, each recorded (and loss-checked unless ``loss_abs_tol`` is
        None) before it is passed on, so that a row is compared with the baselines before it."""
        for row in rows:
            self.record(row)
            if loss_abs_tol is not None:
                self.check_loss(row, loss_abs_tol)
            yield row

    def ratio_to_gemm(self, row: Row) -> Optional[float]:
        gemm = self.gemm_ms.get(row.mode)
        return row.result.median_ms / gemm if gemm else None

    def speedup(self, row: Row) -> Optional[float]:
        """The reference's time / this row's (None: the reference was not measured)."""
        ref = self.ref_ms.get(row.mode)
        return ref / row.result.median_ms if ref else None

    def memory_ratio(self, row: Row) -> Optional[float]:
        """This row's peak extra memory / the reference's."""
        ref_mb, mb = self.ref_mb.get(row.mode), row.result.peak_extra_mb
        return mb / ref_mb if ref_mb and mb is not None else None


# ---------------------------------------------------------------- providers
def backend_reason(registry, backend: str, request) -> Optional[str]:
    """Why the fastxmc ``backend`` of ``registry`` cannot be timed on ``request`` (None: it can).
    GPU-only backends are not timed on CPU: Triton's interpreter is for tests."""
    if (backend == "cuda" or backend.startswith("triton")) and request.device.type != "cuda":
        return "GPU-only backend (on CPU, Triton's interpreter is for tests, not timing)"
    why = registry.reasons(request).get(backend)
    return "; ".join(why) if why else None


def default_backend(registry, request) -> str:
    """The backend the op picks for ``request`` without ``impl=`` (the one targets are about)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return registry.select(request, None)


def select_providers(every: dict, requested: Optional[list], why_not: Callable, first: str,
                     what: str = "providers", gemm_baseline: bool = True) -> list:
    """The providers of ``requested`` (None: all of ``every``, name -> provider) that can run,
    ``first`` first so that every later row can print its ratio to it. ``why_not(provider)``
    says why one cannot run (printed as a skip). With ``gemm_baseline``, names ending in "mm"
    are accepted and dropped: the GEMM baseline always runs. An unknown name exits."""
    names = requested or list(every)
    unknown = [n for n in names if n not in every and not (gemm_baseline and n.endswith("mm"))]
    if unknown:
        raise SystemExit(f"unknown {what}: {unknown}; choose from {list(every)}")
    chosen = []
    for name in names:
        if name not in every:
            continue  # a GEMM baseline name
        why = why_not(every[name])
        if why:
            print(f"# skip {name}: {why}", flush=True)
        else:
            chosen.append(every[name])
    return sorted(chosen, key=lambda p: p.name != first)


# ---------------------------------------------------------------- reporting
def cell(value, fmt: str) -> str:
    """``value`` in ``fmt``, or "-" when it is None."""
    return format(value, fmt) if value is not None else "-"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def csv_row(row: Row, meta: dict, case: dict, **columns) -> dict:
    """The CSV dict of ``row``: run metadata, the case's columns, the row's own, ``columns``,
    and the measurement's statistics when it was measured."""
    out = dict(meta, **case, timestamp=row.timestamp, loadavg=row.loadavg, provider=row.provider,
               mode=row.mode, status=row.status, note=row.note, **columns)
    res = row.result
    if res is not None:
        out.update(median_ms=res.median_ms, p20_ms=res.p20_ms, p80_ms=res.p80_ms, reps=res.reps,
                   peak_extra_mb=res.peak_extra_mb)
    return out


def report(rows: Iterable[Row], to_csv: Callable, print_row: Callable, path: Path,
           columns: list) -> list:
    """Each row as it comes: ``to_csv(row)`` printed by ``print_row`` and appended to ``path``;
    returns the CSV dicts."""
    out = []
    for row in rows:
        csv_dict = to_csv(row)
        print_row(csv_dict)
        append_rows(path, [csv_dict], columns)
        out.append(csv_dict)
    return out


def print_table_row(lead: str, row: dict, ratios: list, median_fmt: str = ">10.1f",
                    spread_width: int = 19) -> None:
    """One table line: ``lead`` (the case and provider cells), then the status and note of a row
    that was not measured, or its median, p20-p80, reps, extra MB, the ``ratios`` cells
    ((column, format) pairs) and its note."""
    if row["status"] != "ok":
        print(f"{lead} {row['status'].upper():>10}  {row['note']}", flush=True)
        return
    spread = f"{row['p20_ms']:.1f}-{row['p80_ms']:.1f}"
    cells = " ".join([cell(row["peak_extra_mb"], "9.1f")]
                     + [cell(row[column], fmt) for column, fmt in ratios])
    print(f"{lead} {format(row['median_ms'], median_fmt)} {spread:>{spread_width}} "
          f"{row['reps']:>4} {cells}  {row['note']}", flush=True)


def print_run_header(title: str, meta: dict) -> None:
    """The first line of a run: ``title`` (what is swept), then where and on what it runs."""
    print(f"# {title}, device {meta['device']}, {meta['machine']}, torch {meta['torch']}, "
          f"{meta['threads']} threads, commit {meta['commit']}, load average {load_average()}",
          flush=True)


def print_table_start(names: list, out: Path, header: str, gemm_baseline: bool = True) -> None:
    """The providers that run, where their rows go, and the table header."""
    extra = " + GEMM baseline" if gemm_baseline else ""
    print(f"# providers: {names}{extra}; results -> {out}", flush=True)
    print(header, flush=True)


# ---------------------------------------------------------------- command line
def csv_list(text: str, cast=str) -> list:
    """"a,b,,c" -> [cast("a"), cast("b"), cast("c")]."""
    return [cast(v) for v in text.split(",") if v.strip()]


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of a benchmark's docstring."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_device_args(p: argparse.ArgumentParser, dtypes: dict = DTYPES) -> None:
    p.add_argument("--dtype", choices=list(dtypes), default="fp32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")


def add_modes_arg(p: argparse.ArgumentParser,
                  help_text: str = "comma list of fwd,bwd,full (default all three; --quick: full)"):
    p.add_argument("--modes", type=csv_list, default=None, help=help_text)


def resolve_modes(p: argparse.ArgumentParser, modes: Optional[list], default: list) -> list:
    """``modes`` (``default`` when not given), each one of :data:`MODES` (else a usage error)."""
    modes = modes or default
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"unknown modes {bad}; choose from {list(MODES)}")
    return modes


def add_output_args(p: argparse.ArgumentParser, quick_help: str, default_out: Path) -> None:
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out", type=Path, default=default_out)


def open_device(args) -> Optional[torch.device]:
    """The torch device of ``--device``, after ``torch.set_num_threads(--threads)`` when given;
    None, with the reason on stderr, when CUDA is asked for and missing."""
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch.cuda is not available on this machine", file=sys.stderr)
        return None
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device)


def run_main(args, sweep: Callable, dtypes: dict = DTYPES) -> int:
    """A benchmark's exit status: 2 when CUDA is asked for and missing, else 0 once
    ``sweep(args, device, dtype, meta)`` has run (``meta``: :func:`run_metadata`)."""
    device = open_device(args)
    if device is None:
        return 2
    sweep(args, device, dtypes[args.dtype], run_metadata(device))
    return 0
