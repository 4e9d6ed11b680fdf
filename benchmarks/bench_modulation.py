"""Benchmark of the fused modulated batch norm against the PyTorch composition.

    python -m benchmarks.bench_modulation [--batches 8,56] [--stages 1536x8,...,96x128]
        [--modulation channel,pixel] [--relu 0,1] [--modes fwd,bwd,full] [--layout nchw|nhwc]
        [--device cpu|cuda] [--dtype fp32] [--providers ...] [--reps K] [--quick]
        [--out benchmarks/results/modulation.csv]

Op: ``modulated_batch_norm(x, gamma, beta, running_mean, running_var, training=True, relu=...)``
= ``BN_noaffine(x) * (1 + gamma) + beta`` (+ ReLU), gamma / beta per channel (B, C) or per pixel
(B, C, H, W). Shapes: the XMC-GAN generator at 128 px, C x H (= W) per stage 1536x8, 768x16,
384x32, 192x64, 96x128, at batch sizes 8 .. 56.

Providers: ``composition`` (the baseline: ``F.batch_norm`` + mul + add (+ relu) in plain PyTorch,
the reference backend) and the fused fastxmc backends that can run on the device, timed in
alternating rounds (``--rounds``) whose calls are pooled per provider. Modes: ``fwd``
(with autograd recording), ``bwd`` (the backward alone; its forward runs untimed before each
call), ``full`` (both). ``speedup`` = time of the composition / time, measured in the same run
(these machines are noisy). Before timing a case, every provider's output is checked against the
composition's (a mismatch is noted in the row). At the end the design target is judged:
per-pixel + ReLU, full, B = 8, C = 192, 64 x 64, fp32, CPU: the default fused backend >= 2x the
composition.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from benchmarks import common
from fastxmc.ops import modulated_batch_norm
from fastxmc.ops.modulated_bn import registry
from fastxmc.ops.registry import Request

DEFAULT_OUT = Path("benchmarks/results/modulation.csv")
COLUMNS = ["timestamp", "run_id", "commit", "machine", "device", "torch", "python", "threads",
           "loadavg", "op", "provider", "mode", "b", "c", "h", "w", "modulation", "relu", "layout",
           "dtype", "median_ms", "p20_ms", "p80_ms", "reps", "peak_extra_mb", "baseline",
           "baseline_ms", "speedup_vs_composition", "status", "note"]
MODES = ("fwd", "bwd", "full")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "fp64": torch.float64}
# The generator's 128 px stages as (C, H = W).
STAGES = [(1536, 8), (768, 16), (384, 32), (192, 64), (96, 128)]
BASELINE = "composition"
# design/kernels.md section 3 (CPU, one run).
TARGET = dict(b=8, c=192, h=64, modulation="pixel", relu=1, dtype="fp32", layout="nchw",
              mode="full", speedup=2.0)
MEMORY_SHARE = 0.7  # skip a provider whose estimated peak exceeds this share of available memory


# ---------------------------------------------------------------- setup
@dataclass(frozen=True)
class Case:
    b: int
    c: int
    h: int
    modulation: str  # "channel" | "pixel"
    relu: bool

    @property
    def numel(self) -> int:
        return self.b * self.c * self.h * self.h


@dataclass
class Inputs:
    x: torch.Tensor       # (B, C, H, W), requires grad
    gamma: torch.Tensor   # (B, C) or (B, C, H, W), requires grad
    beta: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    upstream: torch.Tensor  # the gradient of y, like x

    def params(self):
        return [self.x, self.gamma, self.beta]


def setup_inputs(case: Case, dtype, device, layout, seed: int = 0) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    shape = (case.b, case.c, case.h, case.h)
    mod_shape = shape if case.modulation == "pixel" else shape[:2]
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format

    def rand(s, scale=1.0):
        t = (torch.randn(s, generator=gen) * scale).to(device=device, dtype=dtype)
        return t.contiguous(memory_format=fmt) if len(s) == 4 else t

    return Inputs(rand(shape).requires_grad_(), rand(mod_shape, 0.3).requires_grad_(),
                  rand(mod_shape).requires_grad_(), torch.zeros(case.c, device=device),
                  torch.ones(case.c, device=device), rand(shape))


# ---------------------------------------------------------------- providers
@dataclass
class Provider:
    """``run(inputs, relu) -> y``; ``reason(device, dtype)`` says why it cannot run (None: it can);
    ``tensors`` estimates the peak extra memory of a full call in tensors of x's size."""

    name: str
    impl: str
    reason: Callable
    tensors: float

    def run(self, x: Inputs, relu: bool) -> torch.Tensor:
        return modulated_batch_norm(x.x, x.gamma, x.beta, x.running_mean, x.running_var,
                                    training=True, relu=relu, impl=self.impl)


def _fastxmc_reason(backend: str, device, dtype) -> Optional[str]:
    if backend in ("triton", "cuda") and device.type != "cuda":
        return "GPU-only backend (on CPU, Triton's interpreter is for tests, not timing)"
    why = registry.reasons(Request(device, dtype)).get(backend)
    return "; ".join(why) if why else None


def providers() -> dict:
    """Every provider; memory factors from full-mode peaks (composition: ~9 x-sized tensors)."""
    every = [Provider(BASELINE, "reference", lambda *_: None, 10.0)]
    every += [Provider(f"fastxmc-{b}", b, lambda d, t, b=b: _fastxmc_reason(b, d, t), 5.0)
              for b in ("cpu", "triton", "cuda")]
    return {p.name: p for p in every}


def default_backend(device, dtype) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return registry.select(Request(device, dtype), None)


def select_providers(requested: Optional[list], device, dtype) -> list:
    every = providers()
    names = requested or list(every)
    unknown = [n for n in names if n not in every]
    if unknown:
        raise SystemExit(f"unknown providers {unknown}; choose from {list(every)}")
    chosen = []
    for name in names:
        why = every[name].reason(device, dtype)
        if why:
            print(f"# skip {name}: {why}", flush=True)
        else:
            chosen.append(every[name])
    # The baseline first, so that every later row can print its speedup.
    return sorted(chosen, key=lambda p: p.name != BASELINE)


# ---------------------------------------------------------------- one measurement
def _mode_calls(provider: Provider, x: Inputs, relu: bool, mode: str):
    """(setup, timed call) for ``mode``; gradients are cleared before every call."""
    def clear():
        for p in x.params():
            p.grad = None

    def forward(_):
        return provider.run(x, relu)

    def forward_for_backward():
        clear()
        return provider.run(x, relu)

    def full(_):
        y = provider.run(x, relu)
        y.backward(x.upstream)
        return None

    if mode == "fwd":
        return clear, forward
    if mode == "bwd":
        return forward_for_backward, lambda y: y.backward(x.upstream)
    return clear, full


def _output_check(provider: Provider, x: Inputs, relu: bool, want: torch.Tensor) -> str:
    """A note when the provider's forward differs from the composition's (they compute one thing)."""
    with torch.no_grad():
        got = provider.run(x, relu)
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    tol = 1e-4 if got.dtype in (torch.float32, torch.float64) else 2e-2
    return "" if err <= tol * max(scale, 1.0) else f"OUTPUT MISMATCH max|diff| {err:.3g}"


@dataclass
class Row:
    provider: str
    mode: str
    status: str
    result: Optional[common.Measurement] = None
    note: str = ""

    def __post_init__(self):
        self.timestamp, self.loadavg = common.timestamp(), common.load_average()


def _failed(provider: str, mode: str, err: BaseException) -> Row:
    oom = isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()
    first_line = (str(err).splitlines() or [""])[0][:200]
    return Row(provider, mode, "oom" if oom else "error", note=f"{type(err).__name__}: {first_line}")


def _memory_skip(provider: Provider, case: Case, dtype, device) -> Optional[str]:
    need = provider.tensors * case.numel * torch.finfo(dtype).bits // 8
    free = common.available_memory_bytes(device)
    if need <= MEMORY_SHARE * free:
        return None
    return (f"estimated peak {need / common.MB:.0f} MB > {MEMORY_SHARE:.0%} of available "
            f"{free / common.MB:.0f} MB")


def _pooled(parts: list) -> common.Measurement:
    """One measurement from the rounds of one provider: all timed calls, the largest peak."""
    peaks = [m.peak_extra_bytes for m in parts if m.peak_extra_bytes is not None]
    return common.Measurement([t for m in parts for t in m.times_ms],
                              max(peaks) if peaks else None, parts[0].warmup_ms)


def _ready(provider: Provider, case: Case, x: Inputs, want, args, device, dtype):
    """(note, None) when the provider can be timed on this case, else (None, rows saying why)."""
    why = _memory_skip(provider, case, dtype, device)
    if why:
        return None, [Row(provider.name, mode, "skipped", note=why) for mode in args.modes]
    try:
        return (_output_check(provider, x, case.relu, want) if provider.name != BASELINE
                else ""), None
    except Exception as err:  # noqa: BLE001 - report and go on with the other providers
        return None, [_failed(provider.name, mode, err) for mode in args.modes]


def run_case(case: Case, args, device, dtype, chosen: list):
    """Yields one Row per (provider, mode), the composition first.

    The providers are timed in ``args.rounds`` alternating rounds (composition, fused, ...,
    composition, fused, ...) whose calls are pooled, so that a change of the machine's load
    during the case does not fall on one provider only.
    """
    x = setup_inputs(case, dtype, device, args.layout)
    with torch.no_grad():
        want = providers()[BASELINE].run(x, case.relu)
    notes, timed = {}, []
    for provider in chosen:
        note, rows = _ready(provider, case, x, want, args, device, dtype)
        if rows is None:
            notes[provider.name] = note
            timed.append(provider)
        else:
            yield from rows
    for mode in args.modes:
        parts, failed = {p.name: [] for p in timed}, {}
        for _ in range(args.rounds):
            for provider in timed:
                if provider.name in failed:
                    continue
                setup, call = _mode_calls(provider, x, case.relu, mode)
                try:
                    parts[provider.name].append(
                        common.measure(call, setup=setup, device=device, policy=args.policy))
                except Exception as err:  # noqa: BLE001
                    failed[provider.name] = _failed(provider.name, mode, err)
                finally:
                    for p in x.params():
                        p.grad = None
        for provider in timed:
            yield failed.get(provider.name) or Row(provider.name, mode, "ok",
                                                   _pooled(parts[provider.name]),
                                                   notes[provider.name])


# ---------------------------------------------------------------- reporting
HEADER = (f"{'B':>3} {'C':>5} {'HxW':>7} {'mod':<7} {'relu':>4} {'provider':<16} {'mode':<4} "
          f"{'median ms':>10} {'p20-p80 ms':>17} {'reps':>4} {'extra MB':>9} {'speedup':>7}  note")


def _cell(value, fmt):
    return format(value, fmt) if value is not None else "-"


def print_row(row: dict) -> None:
    lead = (f"{row['b']:>3} {row['c']:>5} {str(row['h']) + 'x' + str(row['w']):>7} "
            f"{row['modulation']:<7} {row['relu']:>4} {row['provider']:<16} {row['mode']:<4}")
    if row["status"] != "ok":
        print(f"{lead} {row['status'].upper():>10}  {row['note']}", flush=True)
        return
    spread = f"{row['p20_ms']:.1f}-{row['p80_ms']:.1f}"
    print(f"{lead} {row['median_ms']:>10.1f} {spread:>17} {row['reps']:>4} "
          f"{_cell(row['peak_extra_mb'], '9.1f')} {_cell(row['speedup_vs_composition'], '7.2f')}"
          f"  {row['note']}", flush=True)


def to_csv_row(row: Row, meta: dict, case: Case, args, baselines: dict) -> dict:
    out = dict(meta, op="modulated_batch_norm", provider=row.provider, mode=row.mode, b=case.b,
               c=case.c, h=case.h, w=case.h, modulation=case.modulation, relu=int(case.relu),
               layout=args.layout, dtype=args.dtype, timestamp=row.timestamp,
               loadavg=row.loadavg, baseline=BASELINE, status=row.status, note=row.note)
    res = row.result
    if res is None:
        return out
    base = baselines.get(row.mode)
    out.update(median_ms=res.median_ms, p20_ms=res.p20_ms, p80_ms=res.p80_ms, reps=res.reps,
               peak_extra_mb=res.peak_extra_mb, baseline_ms=base,
               speedup_vs_composition=base / res.median_ms if base else None)
    return out


def measure_case(case: Case, args, device, dtype, chosen, meta) -> list:
    baselines, out = {}, []
    for row in run_case(case, args, device, dtype, chosen):
        if row.status == "ok" and row.provider == BASELINE:
            baselines[row.mode] = row.result.median_ms
        csv_row = to_csv_row(row, meta, case, args, baselines)
        print_row(csv_row)
        common.append_rows(args.out, [csv_row], COLUMNS)
        out.append(csv_row)
    return out


def _at_target(row: dict, args, device) -> bool:
    return (row["b"] == TARGET["b"] and row["c"] == TARGET["c"] and row["h"] == TARGET["h"]
            and row["modulation"] == TARGET["modulation"] and row["relu"] == TARGET["relu"]
            and args.dtype == TARGET["dtype"] and args.layout == TARGET["layout"]
            and device.type == "cpu")


def print_summary(rows: list, args, device, dtype) -> None:
    """PASS/FAIL of the design target for the default fused backend (full mode)."""
    backend = f"fastxmc-{default_backend(device, dtype)}"
    full = [r for r in rows if r["mode"] == TARGET["mode"] and r["provider"] == backend
            and r["status"] == "ok" and r.get("speedup_vs_composition") is not None]
    if not full:
        print(f"summary: no full-mode measurement of {backend} beside the composition", flush=True)
        return
    speedups = sorted(r["speedup_vs_composition"] for r in full)
    print(f"summary: {backend} (default backend), full mode, {args.layout}, {args.dtype} on "
          f"{device.type}: speedup vs the composition over {len(full)} cases: min "
          f"{speedups[0]:.2f}x, median {speedups[len(speedups) // 2]:.2f}x, max {speedups[-1]:.2f}x;"
          f" load average {common.load_average()}", flush=True)
    target_rows = [r for r in full if _at_target(r, args, device)]
    if not target_rows:
        print(f"  target (B={TARGET['b']}, C={TARGET['c']}, {TARGET['h']}x{TARGET['h']}, per-pixel "
              f"+ ReLU, fp32, NCHW, cpu) not measured in this run: not judged", flush=True)
        return
    value = target_rows[0]["speedup_vs_composition"]
    verdict = "PASS" if value >= TARGET["speedup"] else "FAIL"
    print(f"  target B={TARGET['b']} C={TARGET['c']} {TARGET['h']}x{TARGET['h']} per-pixel + ReLU "
          f"fwd+bwd: speedup {value:.2f}x  target >= {TARGET['speedup']:g}x  {verdict}", flush=True)


# ---------------------------------------------------------------- command line
def _csv_list(text: str, cast=str) -> list:
    return [cast(v) for v in text.split(",") if v.strip()]


def _stage(text: str) -> tuple:
    c, h = text.lower().split("x")
    return int(c), int(h)


def cases_of(args) -> list:
    return [Case(b, c, h, mod, bool(relu)) for b in args.batches for c, h in args.stages
            for mod in args.modulation for relu in args.relu]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=lambda s: _csv_list(s, int), default=None,
                   help="batch sizes (default 8,56; --quick: 8)")
    p.add_argument("--stages", type=lambda s: _csv_list(s, _stage), default=None,
                   help="CxH list (default the 128 px generator: "
                        "1536x8,768x16,384x32,192x64,96x128; --quick: 192x64)")
    p.add_argument("--modulation", type=_csv_list, default=None,
                   help="channel,pixel (default both; --quick: pixel)")
    p.add_argument("--relu", type=lambda s: _csv_list(s, int), default=None,
                   help="0,1 (default both; --quick: 1)")
    p.add_argument("--modes", type=_csv_list, default=None,
                   help="comma list of fwd,bwd,full (default full; --quick: full)")
    p.add_argument("--layout", choices=["nchw", "nhwc"], default="nchw",
                   help="memory format of x, per-pixel gamma / beta and the gradient")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--providers", type=_csv_list, default=None,
                   help=f"comma list (default: every available one: {list(providers())})")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's choice, one per core)")
    p.add_argument("--reps", type=int, default=None,
                   help="maximum timed repetitions over all rounds (default 21; --quick: 9)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds per (case, provider, mode) that set the repetitions "
                        "(default 6; --quick: 3)")
    p.add_argument("--rounds", type=int, default=3,
                   help="alternating rounds per case; each provider's calls are pooled (default 3)")
    p.add_argument("--quick", action="store_true",
                   help="the target case only (B=8, C=192, 64x64, per-pixel + ReLU, full)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    quick = args.quick
    args.batches = args.batches or ([8] if quick else [8, 56])
    args.stages = args.stages or ([(192, 64)] if quick else STAGES)
    args.modulation = args.modulation or (["pixel"] if quick else ["channel", "pixel"])
    args.relu = args.relu if args.relu is not None else ([1] if quick else [0, 1])
    args.modes = args.modes or ["full"]
    bad = [m for m in args.modes if m not in MODES]
    bad += [m for m in args.modulation if m not in ("channel", "pixel")]
    if bad:
        p.error(f"unknown modes / modulations {bad}")
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    # Per round: the repetitions and budget are shared out over the rounds.
    reps = args.reps or (9 if quick else 21)
    args.policy = common.RepPolicy(warmup=1, min_reps=max(1, 3 // args.rounds),
                                   max_reps=max(1, reps // args.rounds),
                                   budget_s=(args.budget or (3.0 if quick else 6.0)) / args.rounds,
                                   max_s=(20.0 if quick else 40.0) / args.rounds)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch.cuda is not available on this machine", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    meta = common.run_metadata(device)
    print(f"# modulated_batch_norm: batches {args.batches}, stages {args.stages}, "
          f"{args.modulation}, relu {args.relu}, {args.layout}, {args.dtype}, modes {args.modes}, "
          f"device {meta['device']}, {meta['machine']}, torch {meta['torch']}, "
          f"{meta['threads']} threads, commit {meta['commit']}, load average "
          f"{common.load_average()}", flush=True)
    chosen = select_providers(args.providers, device, dtype)
    print(f"# providers: {[p.name for p in chosen]}; results -> {args.out}", flush=True)
    print(HEADER, flush=True)
    rows = []
    for case in cases_of(args):
        rows += measure_case(case, args, device, dtype, chosen, meta)
    print_summary(rows, args, device, dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
