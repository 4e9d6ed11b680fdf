"""Benchmark of the fused word attention (XMC-GAN's attention in G) against the reference.

    python -m benchmarks.bench_word_attention [--cases generator,shapes] [--batches 16,32]
        [--regions 256] [--layout rows|conv] [--device cpu|cuda] [--dtype fp32] [--modes fwd,bwd,full]
        [--providers ...] [--reps K] [--quick] [--out benchmarks/results/word_attention.csv]

Cases (``--cases``): ``generator`` = the 128px generator's attention at 16x16 (R = 256 regions,
T = 17 tokens, d = 768, B = 8, 16, 32, 56); ``shapes`` = the shapes preset (T = 24, d = 384 from
MiniLM, B = 16, 32); ``ln`` = Localized Narratives captions (T = 64, d = 768, B = 16, 32).
``--batches`` replaces every case's batch sizes, ``--dim`` every case's d (e.g. the shapes preset
with its MiniLM words projected to a smaller d). ``--layout conv`` gives the queries and the
upstream gradient in G's layout, transposed views of (B, d, R) tensors (G's flattened 16x16 conv
output), which the cpu backend reads in place; its rows are recorded as case ``<case>-conv``.

Providers: ``reference`` (the materialized oracle, the baseline of ``speedup_vs_reference``) and
``fastxmc-<backend>`` for every fused backend that can run here. Modes: ``fwd`` the forward with
autograd recording, ``bwd`` the backward alone (its forward runs untimed before each call),
``full`` both. GEMM baseline measured in the same run: ``k`` batched products
(B, R, d) x (B, d, T) into a preallocated output, k = 2 (fwd), 4 (bwd), 6 (full): the products
autograd needs (the fused backward does one more, the recompute of q w^T). Peak extra memory is
the RSS high-water mark of the timed call (CPU) or the allocator's peak (CUDA).

Verdicts (no explicit target in the issue; the project's bar for the default CPU backend, full
mode, fp32): faster than the reference at every generator batch size (B >= 16), and never slower
at the shapes preset: PASS/FAIL per batch size.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from benchmarks import common, roofline
from benchmarks import sweep as sweeps
from fastxmc.ops import word_attention
from fastxmc.ops.registry import Request
from fastxmc.ops.word_attention import registry
from fastxmc.reference.region_word import word_attention_reference

DEFAULT_OUT = Path("benchmarks/results/word_attention.csv")
COLUMNS = ["timestamp", "run_id", "commit", "machine", "device", "torch", "python", "threads",
           "loadavg", "op", "case", "provider", "mode", "b", "r", "t", "d", "dtype", "median_ms",
           "p20_ms", "p80_ms", "reps", "peak_extra_mb", "baseline", "baseline_ms",
           "ratio_to_gemm", "speedup_vs_reference", "checksum", "status", "note"]
# k batched products (B, R, d) x (B, d, T) per mode.
GEMM = sweeps.GemmBaseline({"fwd": 2, "bwd": 4, "full": 6}, unit="bmm")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (tokens T, feature size d, batch sizes) per case.
CASES = {"generator": (17, 768, [8, 16, 32, 56]), "shapes": (24, 384, [16, 32]),
         "ln": (64, 768, [16, 32])}
# The verdicts: (case, smallest batch judged, required speedup vs the reference).
VERDICTS = {"generator": (16, 1.0), "shapes": (16, 1.0)}
RHO = 15.0


# ---------------------------------------------------------------- setup
@dataclass
class Inputs:
    queries: torch.Tensor  # (B, R, d), requires grad
    words: torch.Tensor    # (B, T, d), requires grad
    mask: torch.Tensor     # (B, T) bool: caption lengths spread between 40% and 100% of T
    grad: torch.Tensor     # (B, R, d) upstream gradient of the context

    def params(self):
        return [self.queries, self.words]


def setup_inputs(b: int, r: int, t: int, d: int, dtype, device, seed: int = 0,
                 layout: str = "rows") -> Inputs:
    """Random inputs; ``layout="conv"``: queries and upstream gradient as transposed (B, d, R)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    def rows(requires_grad=False):
        if layout == "conv":
            return rand(b, d, r).requires_grad_(requires_grad).transpose(1, 2)
        return rand(b, r, d).requires_grad_(requires_grad)

    lengths = torch.randint(max(1, (2 * t) // 5), t + 1, (b,), generator=gen)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).to(device)
    return Inputs(rows(True), rand(b, t, d).requires_grad_(), mask, rows())


# ---------------------------------------------------------------- providers
@dataclass
class Provider:
    name: str
    fn: Callable  # Inputs -> context


def providers(device, dtype, requested: Optional[list]) -> list:
    """The reference first (the baseline), then every fused backend that can run these inputs."""
    every = {"reference": Provider("reference", lambda x: word_attention_reference(
        x.queries, x.words, x.mask, RHO))}
    reasons = registry.reasons(Request(device, dtype))
    for backend in ("cpu", "cuda", "triton"):
        name = f"fastxmc-{backend}"
        if reasons[backend]:
            if requested is None or name in requested:
                print(f"# skip {name}: {'; '.join(reasons[backend])}", flush=True)
            continue
        every[name] = Provider(name, lambda x, impl=backend: word_attention(
            x.queries, x.words, x.mask, RHO, impl=impl))
    unknown = [n for n in requested or [] if n not in every and not n.startswith("fastxmc-")]
    if unknown:
        raise SystemExit(f"unknown providers {unknown}; choose from {list(every)}")
    return [p for n, p in every.items() if requested is None or n in requested]


def default_backend(device, dtype) -> str:
    return registry.select(Request(device, dtype))


# ---------------------------------------------------------------- one measurement
def _gemm_calls(x: Inputs, k: int):
    q, w = x.queries.detach(), x.words.detach()
    out = torch.empty(q.shape[0], q.shape[1], w.shape[1], device=q.device, dtype=q.dtype)

    def gemms(_):
        for _ in range(k):
            torch.bmm(q, w.transpose(1, 2), out=out)
    return gemms


def _checksum(provider: Provider, x: Inputs) -> float:
    """A scalar of the context, to check that every provider computes the same thing."""
    with torch.no_grad():
        return float(provider.fn(x).double().square().sum())


def measure_provider(provider: Provider, x: Inputs, modes, device, policy):
    """One Row per mode; the fwd row carries the checksum of the context."""
    return sweeps.run_provider(provider.name, lambda: provider.fn(x), x.params(), modes, device,
                               policy, upstream=x.grad, checksum=lambda: _checksum(provider, x))


# ---------------------------------------------------------------- reporting
HEADER = (f"{'case':<9} {'B':>3} {'provider':<16} {'mode':<4} {'median ms':>10} {'p20-p80 ms':>15} "
          f"{'reps':>4} {'extra MB':>9} {'x bmm':>6} {'speedup':>7}  note")


def print_row(row: dict) -> None:
    row = roofline.with_bound_note("word_attention", row, {"b": row["b"], "r": row["r"],
                                                           "t": row["t"], "d": row["d"]})
    sweeps.print_table_row(f"{row['case']:<9} {row['b']:>3} {row['provider']:<16} {row['mode']:<4}",
                           row, [("ratio_to_gemm", "6.2f"), ("speedup_vs_reference", "7.2f")],
                           median_fmt=">10.2f", spread_width=15)


def to_csv_row(row: sweeps.Row, meta: dict, case: dict, baselines: sweeps.Baselines) -> dict:
    out = sweeps.csv_row(row, meta, case, checksum=row.checksum, baseline=GEMM.name(row.mode))
    if row.result is not None:
        out.update(baseline_ms=baselines.gemm_ms.get(row.mode),
                   ratio_to_gemm=baselines.ratio_to_gemm(row),
                   speedup_vs_reference=baselines.speedup(row))
    return out


def _check_against_reference(row: sweeps.Row, ref_checksum: Optional[float]) -> None:
    if row.checksum is None or ref_checksum is None or row.provider == "reference":
        return
    if abs(row.checksum - ref_checksum) > 1e-3 * abs(ref_checksum) + 1e-6:
        row.note = (row.note + f" MISMATCH checksum {row.checksum:.6g} vs reference "
                    f"{ref_checksum:.6g}").strip()


# ---------------------------------------------------------------- the sweep
def run_point(case_name: str, b: int, t: int, d: int, args, device, dtype, chosen, meta) -> list:
    """Measures the GEMM baseline and every provider at one shape; prints and appends each row."""
    case = dict(op="word_attention", case=case_label(case_name, args.layout), b=b, r=args.regions,
                t=t, d=d, dtype=args.dtype)
    x = setup_inputs(b, args.regions, t, d, dtype, device, layout=args.layout)
    rows = list(GEMM.rows(lambda k: _gemm_calls(x, k), args.modes, device, args.policy))
    ref_checksum = None
    for provider in chosen:
        for row in measure_provider(provider, x, args.modes, device, args.policy):
            if row.status == "ok" and row.provider == "reference":
                ref_checksum = row.checksum if row.checksum is not None else ref_checksum
            _check_against_reference(row, ref_checksum)
            rows.append(row)
    # Every row is printed after the whole point is measured, with its ratios to both baselines.
    baselines = sweeps.Baselines("reference", GEMM.name)
    rows = list(baselines.recorded(rows))
    return sweeps.report(rows, lambda row: to_csv_row(row, meta, case, baselines), print_row,
                         args.out, COLUMNS)


def case_label(case_name: str, layout: str) -> str:
    return case_name if layout == "rows" else f"{case_name}-{layout}"


def print_verdicts(rows: list, args, device, dtype) -> None:
    """PASS/FAIL: the default backend (full mode) against the reference, per judged batch size."""
    backend = f"fastxmc-{default_backend(device, dtype)}"
    judged = device.type == "cpu" and args.dtype == "fp32" and args.regions == 256
    print(f"summary word_attention: {backend} (default backend), full mode, {args.dtype} on "
          f"{device.type}; load average {common.load_average()}", flush=True)
    for case_name, (min_b, speedup) in VERDICTS.items():
        label = case_label(case_name, args.layout)
        mine = [r for r in rows if r["case"] == label and r["mode"] == "full"
                and r["provider"] == backend and r["status"] == "ok"]
        for row in mine:
            value = row["speedup_vs_reference"]
            if value is None:
                print(f"  {case_name:<9} B={row['b']:<3} n/a (reference not measured)")
                continue
            in_scope = judged and row["b"] >= min_b
            verdict = sweeps.verdict(value >= speedup) if in_scope else "(not judged)"
            extra = sweeps.cell(row["peak_extra_mb"], ".1f")
            print(f"  {case_name:<9} B={row['b']:<3} T={row['t']:<3} d={row['d']:<4} speedup "
                  f"{value:6.2f}x (target >= {speedup:g}x)  extra MB {extra}  {verdict}",
                  flush=True)


# ---------------------------------------------------------------- command line
def parse_args(argv=None):
    p = sweeps.argument_parser(__doc__)
    p.add_argument("--cases", type=sweeps.csv_list, default=None,
                   help=f"comma list of {list(CASES)} (default generator,shapes)")
    p.add_argument("--batches", type=lambda s: sweeps.csv_list(s, int), default=None,
                   help="batch sizes for every case (default: each case's own; --quick: 16)")
    p.add_argument("--regions", type=int, default=256, help="R (default 256 = 16x16)")
    p.add_argument("--dim", type=int, default=None, help="d for every case (default: each case's)")
    p.add_argument("--layout", choices=["rows", "conv"], default="rows",
                   help="queries and upstream gradient as contiguous rows, or as G's transposed "
                        "(B, d, R) conv output (default rows)")
    sweeps.add_device_args(p, DTYPES)
    sweeps.add_modes_arg(p)
    p.add_argument("--providers", type=sweeps.csv_list, default=None,
                   help="comma list (default: every available one); the GEMM baseline always runs")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--reps", type=int, default=None, help="maximum timed repetitions (default 20)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds per (shape, provider, mode) that set the repetitions (default 10)")
    sweeps.add_output_args(p, "B = 16, full mode, few repetitions", DEFAULT_OUT)
    args = p.parse_args(argv)
    args.cases = args.cases or ["generator", "shapes"]
    bad = [c for c in args.cases if c not in CASES]
    if bad:
        p.error(f"unknown cases {bad}; choose from {list(CASES)}")
    args.modes = sweeps.resolve_modes(p, args.modes, ["full"] if args.quick else list(sweeps.MODES))
    if args.quick and args.batches is None:
        args.batches = [16]
    args.policy = common.RepPolicy(warmup=1, min_reps=2 if args.quick else 5,
                                   max_reps=args.reps or (5 if args.quick else 20),
                                   budget_s=args.budget or (1.5 if args.quick else 10.0),
                                   max_s=10.0 if args.quick else 30.0)
    return args


def sweep(args, device, dtype, meta) -> None:
    """Every case and batch size of the command line, then the verdicts."""
    sweeps.print_run_header(f"word_attention: cases {args.cases}, R={args.regions}, "
                            f"{args.dtype}, modes {args.modes}", meta)
    chosen = providers(device, dtype, args.providers)
    sweeps.print_table_start([p.name for p in chosen], args.out, HEADER)
    rows = []
    for case_name in args.cases:
        t, d, batches = CASES[case_name]
        d = args.dim or d
        for b in args.batches or batches:
            rows += run_point(case_name, b, t, d, args, device, dtype, chosen, meta)
    print_verdicts(rows, args, device, dtype)


def main(argv=None) -> int:
    return sweeps.run_main(parse_args(argv), sweep, DTYPES)


if __name__ == "__main__":
    sys.exit(main())
