"""Benchmark of the fused region-word loss (XMC-GAN's word loss) against the materialized oracle.

    python -m benchmarks.bench_region_word [--sizes 8,64,256] [--words 17] [--regions 256]
        [--dim 768] [--dtype fp32] [--device cpu|cuda] [--modes fwd,bwd,full] [--full-mask]
        [--providers ...] [--reps K] [--quick] [--out benchmarks/results/region_word.csv]

``region_word_loss(regions (B, R, d), words (B, T, d), word_mask (B, T))`` at the XMC-GAN 128px
shapes (T = 17 tokens, R = 16 x 16 = 256 regions, d = 768). Captions have random lengths, uniform
in [``--min-words``, T] (default 8: about 12.5 real tokens of 17, like COCO captions with CLS /
SEP), unless ``--full-mask`` makes every token real; the fused cpu backend skips padding words,
the reference does not.

Modes: ``fwd`` the forward with autograd recording, ``bwd`` the backward alone (its forward runs
untimed before each call), ``full`` both. Baselines measured in the same run: ``reference`` (the
materialized oracle: B x B x T x R attention and B x B x T x d contexts, differentiated by
autograd) and ``k``mm, k torch.mm of the similarity product (B T x d) x (d x B R) into a
preallocated output (k = 1 fwd, 3 bwd, 4 full: the fused backends compute this product k times,
plus smaller (B T x R x R) products). Ratios: ``speedup_vs_reference`` = reference time / time,
``memory_vs_reference`` = extra peak memory / the reference's, ``ratio_to_4mm`` = time / k mm.

A provider whose estimated peak memory exceeds 70% of the available memory is skipped with a CSV
row saying so (the reference at B = 256 needs about 20 GB). At the end the targets of the issue
are checked for the default fused backend: at B = 64, T = 17, R = 256, d = 768, fp32, full, CPU:
>= 3x faster than the reference and <= 1/10 of its extra peak memory; B = 256 within 2 GB.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from benchmarks import common, roofline
from benchmarks import sweep as sweeps
from fastxmc.losses import region_word_loss
from fastxmc.ops.region_word import registry, request_for
from fastxmc.ops.registry import Request

DEFAULT_OUT = Path("benchmarks/results/region_word.csv")
COLUMNS = ["timestamp", "run_id", "commit", "machine", "device", "torch", "python", "threads",
           "loadavg", "op", "provider", "mode", "n", "t", "r", "d", "dtype", "valid_frac",
           "median_ms", "p20_ms", "p80_ms", "reps", "peak_extra_mb", "baseline", "baseline_ms",
           "ratio_to_4mm", "speedup_vs_reference", "memory_vs_reference", "loss", "status", "note"]
OP = "region_word"
# k torch.mm of the (B T x d) x (d x B R) similarity product per mode.
GEMM = sweeps.GemmBaseline({"fwd": 1, "bwd": 3, "full": 4})
TARGET = dict(n=64, t=17, r=256, d=768, dtype="fp32", mode="full", speedup=3.0, memory_ratio=0.1,
              big_n=256, big_extra_mb=2048.0)
# Per judged batch size: (label, CSV column, sign, TARGET key, unit) of each check.
CHECKS = [(TARGET["n"], [("speedup vs reference", "speedup_vs_reference", ">=", "speedup", "x"),
                         ("extra memory / reference's", "memory_vs_reference", "<=",
                          "memory_ratio", "x")]),
          (TARGET["big_n"], [("extra peak memory", "peak_extra_mb", "<=", "big_extra_mb", " MB")])]
# The reference's full-mode peak, in units of B^2 T (R + d) values: measured 4.3 at B = 64.
REFERENCE_FACTOR = 4.5


# ---------------------------------------------------------------- inputs
@dataclass
class Inputs:
    regions: torch.Tensor  # (B, R, d), requires grad
    words: torch.Tensor    # (B, T, d), requires grad
    mask: torch.Tensor     # (B, T) bool

    def params(self):
        return [self.regions, self.words]


def setup_inputs(b: int, t: int, r: int, d: int, dtype, device, min_words: Optional[int],
                 seed: int = 0) -> Inputs:
    """Random features; caption lengths uniform in [min_words, t] (None: every token real)."""
    gen = torch.Generator().manual_seed(seed)

    def feats(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    if min_words is None:
        mask = torch.ones(b, t, dtype=torch.bool)
    else:
        lengths = torch.randint(min(min_words, t), t + 1, (b,), generator=gen)
        mask = torch.arange(t)[None, :] < lengths[:, None]
    regions = feats(b, r, d)
    return Inputs(regions, feats(b, t, d), mask.to(device))


# ---------------------------------------------------------------- providers
@dataclass
class Provider:
    """``loss(inputs)``; ``reason(device, dtype, r)`` says why it cannot run (None: it can)."""

    name: str
    loss: Callable
    reason: Callable
    materializes: bool  # peak memory grows like B^2 T (R + d)


def _request(device, dtype, r: int) -> Request:
    """The registry request of a call with R = r regions on ``device`` in ``dtype``."""
    return request_for(device, dtype, r)


def _fastxmc_reason(backend: str, device, dtype, r: int) -> Optional[str]:
    return sweeps.backend_reason(registry, backend, _request(device, dtype, r))


def _provider(backend: str) -> Provider:
    name = "reference" if backend == "reference" else f"fastxmc-{backend}"
    return Provider(name, lambda x: region_word_loss(x.regions, x.words, x.mask, impl=backend),
                    lambda device, dtype, r: _fastxmc_reason(backend, device, dtype, r),
                    backend == "reference")


def providers() -> dict:
    every = [_provider(b) for b in ("reference", "cpu", "torch", "triton", "cuda")]
    return {p.name: p for p in every}


def default_backend(device, dtype, r: int) -> str:
    """What ``region_word_loss`` picks without ``impl=`` (the backend the targets are about)."""
    return sweeps.default_backend(registry, _request(device, dtype, r))


def estimated_bytes(provider: Provider, b: int, t: int, r: int, d: int, dtype) -> int:
    linear = 6 * b * (r + t) * d * 4 + (256 << 20)  # normalized copies, gradients, workspaces
    if not provider.materializes:
        return linear
    return int(REFERENCE_FACTOR * b * b * t * (r + d) * 4 + linear)


# ---------------------------------------------------------------- one measurement
def _gemm_calls(x: Inputs, k: int):
    """k products (B T x d) x (d x B R) into one preallocated output."""
    w = x.words.detach().reshape(-1, x.words.shape[-1])
    r = x.regions.detach().reshape(-1, x.regions.shape[-1])
    out = torch.empty(w.shape[0], r.shape[0], device=w.device, dtype=w.dtype)

    def gemms(_):
        for _ in range(k):
            torch.mm(w, r.T, out=out)
    return gemms


# ---------------------------------------------------------------- reporting
HEADER = (f"{'B':>5} {'provider':<16} {'mode':<4} {'median ms':>10} {'p20-p80 ms':>19} "
          f"{'reps':>4} {'extra MB':>9} {'x mm':>6} {'speedup':>7} {'mem/ref':>7}  note")


def print_row(n, row: dict):
    row = roofline.with_bound_note("region_word", row, {"b": n, "t": row["t"], "r": row["r"],
                                                        "d": row["d"]})
    sweeps.print_table_row(f"{n:>5} {row['provider']:<16} {row['mode']:<4}", row,
                           [("ratio_to_4mm", "6.2f"), ("speedup_vs_reference", "7.2f"),
                            ("memory_vs_reference", "7.3f")])


def to_csv_row(row: sweeps.Row, meta: dict, case: dict, baselines: sweeps.Baselines) -> dict:
    out = sweeps.csv_row(row, meta, case, baseline=GEMM.name(row.mode))
    if row.result is not None:
        out.update(loss=row.result.result, baseline_ms=baselines.gemm_ms.get(row.mode),
                   ratio_to_4mm=baselines.ratio_to_gemm(row),
                   speedup_vs_reference=baselines.speedup(row),
                   memory_vs_reference=baselines.memory_ratio(row))
    return out


# ---------------------------------------------------------------- the sweep
def select_providers(requested: Optional[list], device, dtype, r: int) -> list:
    """The reference first (so that every later row can print its ratios)."""
    return sweeps.select_providers(providers(), requested, lambda p: p.reason(device, dtype, r),
                                   "reference")


def _rows_of_size(x: Inputs, args, device, dtype, chosen):
    n = x.mask.shape[0]
    product = n * args.words * n * args.regions * (torch.finfo(dtype).bits // 8)
    why = sweeps.memory_skip(product, device)
    if why:
        yield from (sweeps.Row(GEMM.name(m), m, "skipped", note=why) for m in args.modes)
    else:
        yield from GEMM.rows(lambda k: _gemm_calls(x, k), args.modes, device, args.policy)
    for provider in chosen:
        why = sweeps.memory_skip(
            estimated_bytes(provider, n, args.words, args.regions, args.dim, dtype), device)
        if why:
            yield from sweeps.Row.skipped(provider.name, args.modes, why)
        else:
            yield from sweeps.run_provider(provider.name, lambda: provider.loss(x), x.params(),
                                           args.modes, device, args.policy)


def run_size(n, args, device, dtype, chosen, meta) -> list:
    """Measures every provider at batch size n; prints and appends each row as it is measured."""
    x = setup_inputs(n, args.words, args.regions, args.dim, dtype, device, args.min_words)
    case = dict(op=OP, n=n, t=args.words, r=args.regions, d=args.dim, dtype=args.dtype,
                valid_frac=float(x.mask.float().mean()))
    baselines = sweeps.Baselines("reference", GEMM.name)
    rows = baselines.recorded(_rows_of_size(x, args, device, dtype, chosen), loss_abs_tol=1e-3)
    return sweeps.report(rows, lambda row: to_csv_row(row, meta, case, baselines),
                         lambda row: print_row(n, row), args.out, COLUMNS)


def _judged(args, device) -> bool:
    """Whether this run has the shape, dtype and device the targets are set at."""
    return (args.words == TARGET["t"] and args.regions == TARGET["r"] and args.dim == TARGET["d"]
            and args.dtype == TARGET["dtype"] and device.type == "cpu")


def _print_check(label, value, sign, target, unit, judged) -> None:
    if value is None:
        print(f"  {label:<34} n/a (not measured)  target {sign} {target:g}{unit}", flush=True)
        return
    ok = value >= target if sign == ">=" else value <= target
    verdict = sweeps.verdict(ok) if judged else "(not judged: not the target shape / device)"
    print(f"  {label:<34} {value:9.3f}{unit:<3}  target {sign} {target:g}{unit}  {verdict}",
          flush=True)


def print_summary(rows: list, args, device, dtype) -> None:
    """PASS/FAIL of the issue's targets for the default fused backend (full mode)."""
    backend = f"fastxmc-{default_backend(device, dtype, args.regions)}"
    full = {r["n"]: r for r in rows if r["mode"] == TARGET["mode"] and r["provider"] == backend
            and r["status"] == "ok"}
    judged = _judged(args, device)
    print(f"summary {OP}: {backend} (default backend), T={args.words} R={args.regions} "
          f"d={args.dim} {args.dtype} full on {device.type}, valid words "
          f"{'all' if args.min_words is None else f'>= {args.min_words} per caption'}; "
          f"load average {common.load_average()}", flush=True)
    for n, checks in CHECKS:
        row = full.get(n)
        if row is None:
            print(f"  no full-mode measurement of {backend} at B={n}", flush=True)
            continue
        for label, column, sign, target, unit in checks:
            _print_check(f"B={n} {label}", row[column], sign, TARGET[target], unit, judged)


# ---------------------------------------------------------------- command line
def parse_args(argv=None):
    p = sweeps.argument_parser(__doc__)
    p.add_argument("--sizes", type=lambda s: sweeps.csv_list(s, int), default=None,
                   help="batch sizes B (default 8,64,256; --quick: 8,64)")
    p.add_argument("--words", type=int, default=17, help="T, tokens per caption")
    p.add_argument("--regions", type=int, default=256, help="R, regions per image")
    p.add_argument("--dim", type=int, default=768, help="d, the feature size")
    p.add_argument("--min-words", type=int, default=8,
                   help="captions have between this many and T real tokens")
    p.add_argument("--full-mask", action="store_true", help="every token real (no padding)")
    sweeps.add_device_args(p)
    sweeps.add_modes_arg(p)
    p.add_argument("--providers", type=sweeps.csv_list, default=None,
                   help="comma list (default: every available one); the GEMM baseline always runs")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--reps", type=int, default=None, help="maximum timed repetitions (default 10)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds per (size, provider, mode) that set the repetitions (default 20)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="cap on the wall time of one (size, provider, mode) (default 60)")
    sweeps.add_output_args(p, "B = 8, 64, full mode, few repetitions (a few minutes)",
                           DEFAULT_OUT)
    args = p.parse_args(argv)
    args.modes = sweeps.resolve_modes(p, args.modes, ["full"] if args.quick else list(sweeps.MODES))
    args.sizes = args.sizes or ([8, 64] if args.quick else [8, 64, 256])
    if args.full_mask:
        args.min_words = None
    quick = args.quick
    args.policy = common.RepPolicy(
        warmup=1, min_reps=2 if quick else 3, max_reps=args.reps or (3 if quick else 10),
        budget_s=args.budget or (5.0 if quick else 20.0),
        max_s=args.max_seconds or (20.0 if quick else 60.0))
    return args


def sweep(args, device, dtype, meta) -> None:
    """Every batch size of the command line, then the verdicts."""
    sweeps.print_run_header(f"{OP}: B in {args.sizes}, T={args.words} R={args.regions} "
                            f"d={args.dim} {args.dtype}, modes {args.modes}", meta)
    print(f"# reps: {args.policy}", flush=True)
    chosen = select_providers(args.providers, device, dtype, args.regions)
    sweeps.print_table_start([p.name for p in chosen], args.out, HEADER)
    rows = []
    for n in args.sizes:
        rows += run_size(n, args, device, dtype, chosen, meta)
    print_summary(rows, args, device, dtype)


def main(argv=None) -> int:
    return sweeps.run_main(parse_args(argv), sweep)


if __name__ == "__main__":
    sys.exit(main())
