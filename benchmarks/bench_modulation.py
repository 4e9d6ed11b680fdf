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

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from benchmarks import common, roofline
from benchmarks import sweep as sweeps
from fastxmc.ops import modulated_batch_norm
from fastxmc.ops.modulated_bn import registry
from fastxmc.ops.registry import Request

DEFAULT_OUT = Path("benchmarks/results/modulation.csv")
COLUMNS = ["timestamp", "run_id", "commit", "machine", "device", "torch", "python", "threads",
           "loadavg", "op", "provider", "mode", "b", "c", "h", "w", "modulation", "relu", "layout",
           "dtype", "median_ms", "p20_ms", "p80_ms", "reps", "peak_extra_mb", "baseline",
           "baseline_ms", "speedup_vs_composition", "status", "note"]
# The generator's 128 px stages as (C, H = W).
STAGES = [(1536, 8), (768, 16), (384, 32), (192, 64), (96, 128)]
BASELINE = "composition"
# design/kernels.md section 3 (CPU, one run).
TARGET = dict(b=8, c=192, h=64, modulation="pixel", relu=1, dtype="fp32", layout="nchw",
              mode="full", speedup=2.0)


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
    return sweeps.backend_reason(registry, backend, Request(device, dtype))


def providers() -> dict:
    """Every provider; memory factors from full-mode peaks (composition: ~9 x-sized tensors)."""
    every = [Provider(BASELINE, "reference", lambda *_: None, 10.0)]
    every += [Provider(f"fastxmc-{b}", b, lambda d, t, b=b: _fastxmc_reason(b, d, t), 5.0)
              for b in ("cpu", "triton", "cuda")]
    return {p.name: p for p in every}


def default_backend(device, dtype) -> str:
    return sweeps.default_backend(registry, Request(device, dtype))


def select_providers(requested: Optional[list], device, dtype) -> list:
    """The baseline first, so that every later row can print its speedup."""
    return sweeps.select_providers(providers(), requested, lambda p: p.reason(device, dtype),
                                   BASELINE, gemm_baseline=False)


# ---------------------------------------------------------------- one measurement
def _output_check(provider: Provider, x: Inputs, relu: bool, want: torch.Tensor) -> str:
    """A note when the provider's forward differs from the composition's (they compute one thing)."""
    with torch.no_grad():
        got = provider.run(x, relu)
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    tol = 1e-4 if got.dtype in (torch.float32, torch.float64) else 2e-2
    return "" if err <= tol * max(scale, 1.0) else f"OUTPUT MISMATCH max|diff| {err:.3g}"


def _memory_skip(provider: Provider, case: Case, dtype, device) -> Optional[str]:
    return sweeps.memory_skip(provider.tensors * case.numel * torch.finfo(dtype).bits // 8, device)


def _pooled(parts: list) -> common.Measurement:
    """One measurement from the rounds of one provider: all timed calls, the largest peak."""
    peaks = [m.peak_extra_bytes for m in parts if m.peak_extra_bytes is not None]
    return common.Measurement([t for m in parts for t in m.times_ms],
                              max(peaks) if peaks else None, parts[0].warmup_ms)


def _ready(provider: Provider, case: Case, x: Inputs, want, args, device, dtype):
    """(note, None) when the provider can be timed on this case, else (None, rows saying why)."""
    why = _memory_skip(provider, case, dtype, device)
    if why:
        return None, sweeps.Row.skipped(provider.name, args.modes, why)
    try:
        return (_output_check(provider, x, case.relu, want) if provider.name != BASELINE
                else ""), None
    except Exception as err:  # noqa: BLE001 - report and go on with the other providers
        return None, [sweeps.Row.failed(provider.name, mode, err) for mode in args.modes]


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
                try:
                    # keep_output=False: the timed call frees its output, as in the recorded
                    # results of this benchmark.
                    parts[provider.name].append(sweeps.measure_mode(
                        lambda: provider.run(x, case.relu), x.params(), mode, device,
                        args.policy, upstream=x.upstream, keep_output=False))
                except Exception as err:  # noqa: BLE001
                    failed[provider.name] = sweeps.Row.failed(provider.name, mode, err)
        for provider in timed:
            yield failed.get(provider.name) or sweeps.Row(provider.name, mode, "ok",
                                                          _pooled(parts[provider.name]),
                                                          notes[provider.name])


# ---------------------------------------------------------------- reporting
HEADER = (f"{'B':>3} {'C':>5} {'HxW':>7} {'mod':<7} {'relu':>4} {'provider':<16} {'mode':<4} "
          f"{'median ms':>10} {'p20-p80 ms':>17} {'reps':>4} {'extra MB':>9} {'speedup':>7}  note")


def print_row(row: dict) -> None:
    row = roofline.with_bound_note("modulated_bn", row, {
        "b": row["b"], "c": row["c"], "h": row["h"], "w": row["w"],
        "modulation": row["modulation"], "relu": bool(int(row["relu"]))})
    lead = (f"{row['b']:>3} {row['c']:>5} {str(row['h']) + 'x' + str(row['w']):>7} "
            f"{row['modulation']:<7} {row['relu']:>4} {row['provider']:<16} {row['mode']:<4}")
    sweeps.print_table_row(lead, row, [("speedup_vs_composition", "7.2f")], spread_width=17)


def to_csv_row(row: sweeps.Row, meta: dict, case: Case, args,
               baselines: sweeps.Baselines) -> dict:
    columns = dict(op="modulated_batch_norm", b=case.b, c=case.c, h=case.h, w=case.h,
                   modulation=case.modulation, relu=int(case.relu), layout=args.layout,
                   dtype=args.dtype)
    out = sweeps.csv_row(row, meta, columns, baseline=BASELINE)
    if row.result is not None:
        out.update(baseline_ms=baselines.ref_ms.get(row.mode),
                   speedup_vs_composition=baselines.speedup(row))
    return out


def measure_case(case: Case, args, device, dtype, chosen, meta) -> list:
    baselines = sweeps.Baselines(BASELINE)
    rows = baselines.recorded(run_case(case, args, device, dtype, chosen))
    return sweeps.report(rows, lambda row: to_csv_row(row, meta, case, args, baselines),
                         print_row, args.out, COLUMNS)


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
    verdict = sweeps.verdict(value >= TARGET["speedup"])
    print(f"  target B={TARGET['b']} C={TARGET['c']} {TARGET['h']}x{TARGET['h']} per-pixel + ReLU "
          f"fwd+bwd: speedup {value:.2f}x  target >= {TARGET['speedup']:g}x  {verdict}", flush=True)


# ---------------------------------------------------------------- command line
def _stage(text: str) -> tuple:
    c, h = text.lower().split("x")
    return int(c), int(h)


def cases_of(args) -> list:
    return [Case(b, c, h, mod, bool(relu)) for b in args.batches for c, h in args.stages
            for mod in args.modulation for relu in args.relu]


def parse_args(argv=None):
    p = sweeps.argument_parser(__doc__)
    p.add_argument("--batches", type=lambda s: sweeps.csv_list(s, int), default=None,
                   help="batch sizes (default 8,56; --quick: 8)")
    p.add_argument("--stages", type=lambda s: sweeps.csv_list(s, _stage), default=None,
                   help="CxH list (default the 128 px generator: "
                        "1536x8,768x16,384x32,192x64,96x128; --quick: 192x64)")
    p.add_argument("--modulation", type=sweeps.csv_list, default=None,
                   help="channel,pixel (default both; --quick: pixel)")
    p.add_argument("--relu", type=lambda s: sweeps.csv_list(s, int), default=None,
                   help="0,1 (default both; --quick: 1)")
    sweeps.add_modes_arg(p, "comma list of fwd,bwd,full (default full; --quick: full)")
    p.add_argument("--layout", choices=["nchw", "nhwc"], default="nchw",
                   help="memory format of x, per-pixel gamma / beta and the gradient")
    sweeps.add_device_args(p)
    p.add_argument("--providers", type=sweeps.csv_list, default=None,
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
    sweeps.add_output_args(p, "the target case only (B=8, C=192, 64x64, per-pixel + ReLU, full)",
                           DEFAULT_OUT)
    args = p.parse_args(argv)
    quick = args.quick
    args.batches = args.batches or ([8] if quick else [8, 56])
    args.stages = args.stages or ([(192, 64)] if quick else STAGES)
    args.modulation = args.modulation or (["pixel"] if quick else ["channel", "pixel"])
    args.relu = args.relu if args.relu is not None else ([1] if quick else [0, 1])
    args.modes = args.modes or ["full"]
    bad = [m for m in args.modes if m not in sweeps.MODES]
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


def sweep(args, device, dtype, meta) -> None:
    """Every case of the command line, then the verdict."""
    sweeps.print_run_header(f"modulated_batch_norm: batches {args.batches}, stages {args.stages}, "
                            f"{args.modulation}, relu {args.relu}, {args.layout}, {args.dtype}, "
                            f"modes {args.modes}", meta)
    chosen = select_providers(args.providers, device, dtype)
    sweeps.print_table_start([p.name for p in chosen], args.out, HEADER, gemm_baseline=False)
    rows = []
    for case in cases_of(args):
        rows += measure_case(case, args, device, dtype, chosen, meta)
    print_summary(rows, args, device, dtype)


def main(argv=None) -> int:
    return sweeps.run_main(parse_args(argv), sweep)


if __name__ == "__main__":
    sys.exit(main())
