"""Benchmark of the fused InfoNCE / SupCon losses against materialized baselines.

    python -m benchmarks.bench_infonce [--sizes 1024,4096,16384] [--dim 256] [--device cpu|cuda]
        [--modes fwd,bwd,full] [--labels] [--providers ...] [--reps K] [--quick]
        [--out benchmarks/results/infonce.csv] [--plot]

Op ``info_nce`` (default): symmetric CLIP loss of a (N x D) and b (N x D), one positive per row.
Op ``supcon`` (``--labels``): supervised contrastive loss of one (N x D) set with labels.
Providers: the materialized baselines and peers, and one ``fastxmc-<backend>`` per fused backend,
among them ``fastxmc-triton`` (the default GPU kernels: 2-D grids, deterministic backward) and
``fastxmc-triton-atomic`` (1-D grid, atomic grad_b), so one GPU run compares the two.
Every provider L2-normalizes its inputs inside the timed region; the temperature is a tensor that
requires grad, so ``bwd`` includes its gradient.

Modes: ``fwd`` the forward with autograd recording (as in training), ``bwd`` the backward alone
(its forward runs untimed before each call), ``full`` both. GEMM baseline measured in the same
run: ``k`` torch.mm of the N x M similarity product into a preallocated output, k = 1 (fwd),
3 (bwd: recompute + two gradient products), 4 (full): a fused loss can not beat it.
Ratios: ``ratio_to_4mm`` = time / that baseline, ``speedup_vs_materialized`` = time of
``materialized`` (``pml-supcon`` for supcon) / time.

Repetitions adapt to the call time (``--budget`` seconds per size, provider and mode, capped by
``--max-seconds``); a provider whose estimated peak memory exceeds 70% of the available memory
is skipped with a CSV row saying so. At the end, the design targets (N = M = 16384, D = 256,
fp32, full, CPU) are checked for the default fused backend: PASS/FAIL per target.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from benchmarks import common, roofline
from benchmarks import sweep as sweeps
from fastxmc.losses import info_nce, supcon
from fastxmc.ops.infonce import registry
from fastxmc.ops.registry import Request

DEFAULT_OUT = Path("benchmarks/results/infonce.csv")
COLUMNS = ["timestamp", "run_id", "commit", "machine", "device", "torch", "python", "threads",
           "loadavg", "op", "provider", "mode", "n", "m", "d", "dtype", "labels", "temperature",
           "median_ms", "p20_ms", "p80_ms", "reps", "peak_extra_mb", "baseline", "baseline_ms",
           "ratio_to_4mm", "speedup_vs_materialized", "loss", "status", "note"]
# k torch.mm of the N x M similarity product per mode.
GEMM = sweeps.GemmBaseline({"fwd": 1, "bwd": 3, "full": 4})
# The targets of design/kernels.md section 1 (CPU, one run).
TARGET = dict(n=16384, d=256, dtype="fp32", mode="full", speedup=4.0, ratio_to_4mm=1.5,
              extra_mb=256.0)


# ---------------------------------------------------------------- setup (one per op)
@dataclass
class Inputs:
    a: torch.Tensor  # (N, D) requires grad; the features for supcon
    b: Optional[torch.Tensor]  # (M, D) requires grad; None for supcon
    labels: Optional[torch.Tensor]  # (N,) for supcon
    t: torch.Tensor  # 0-dim temperature, requires grad

    def params(self):
        return [x for x in (self.a, self.b, self.t) if x is not None]


def setup_inputs(op: str, n: int, d: int, dtype, device, temperature: float, seed: int = 0):
    """Random embeddings; supcon labels come in classes of 4 (every anchor has 3 positives)."""
    gen = torch.Generator().manual_seed(seed)

    def emb(rows):
        return torch.randn(rows, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    t = torch.tensor(temperature, device=device).requires_grad_()
    if op == "supcon":
        classes = max(1, n // 4)
        labels = (torch.arange(n) % classes)[torch.randperm(n, generator=gen)].to(device)
        return Inputs(emb(n), None, labels, t)
    return Inputs(emb(n), emb(n), None, t)


# ---------------------------------------------------------------- providers
def materialized_info_nce(a, b, t):
    """Plain PyTorch CLIP loss: full N x M logits, cross-entropy in both directions."""
    logits = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / t
    target = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def _open_clip_loss():
    from open_clip.loss import ClipLoss
    loss = ClipLoss()
    return lambda x: loss(F.normalize(x.a, dim=1), F.normalize(x.b, dim=1), 1.0 / x.t)


def _pml_supcon_loss():
    from pytorch_metric_learning.losses import SupConLoss
    holder = {}

    def call(x):
        # pml divides by self.temperature, so a tensor temperature receives its gradient.
        if holder.get("t") is not x.t:
            holder["t"], holder["loss"] = x.t, SupConLoss(temperature=x.t)
        return holder["loss"](x.a, x.labels)
    return call


def _inf_cl_head_dim(d: int) -> Optional[int]:
    return next((h for h in (256, 128, 64, 32, 16) if d % h == 0), None)


def _inf_cl_loss():
    from inf_cl import cal_inf_loss

    def call(x):
        a, b, scale = F.normalize(x.a, dim=1), F.normalize(x.b, dim=1), 1.0 / x.t
        head = _inf_cl_head_dim(a.shape[1])
        # Inf-CL computes one direction (mean over rows of a): the symmetric loss takes two calls.
        return (cal_inf_loss(a, b, scale=scale, head_dim=head)
                + cal_inf_loss(b, a, scale=scale, head_dim=head)) / 2
    return call


def _importable(module: str) -> Optional[str]:
    try:
        __import__(module)
    except Exception as err:  # noqa: BLE001 - any import failure makes the provider unavailable
        return f"`import {module}` failed: {type(err).__name__}: {err}"
    return None


def _fastxmc_reason(backend: str, device, dtype) -> Optional[str]:
    return sweeps.backend_reason(registry, backend, Request(device, dtype))


@dataclass
class Provider:
    """``make()`` returns ``loss(inputs)``; ``reason`` says why it cannot run (None: it can);
    ``matrices`` estimates its peak memory in N x M matrices of the input dtype (plus O(N D))."""

    name: str
    op: str
    make: Callable
    reason: Callable  # (device, dtype, d) -> Optional[str]
    matrices: float


def _fastxmc_provider(op: str, backend: str) -> Provider:
    def make():
        if op == "supcon":
            return lambda x: supcon(x.a, x.labels, x.t, impl=backend)
        return lambda x: info_nce(x.a, x.b, x.t, impl=backend)
    return Provider(f"fastxmc-{backend}", op, make,
                    lambda device, dtype, d: _fastxmc_reason(backend, device, dtype), 0.0)


def _gpu_only(module: str, extra=None):
    def reason(device, dtype, d):
        if device.type != "cuda":
            return "GPU only"
        return _importable(module) or (extra(device, dtype, d) if extra else None)
    return reason


def providers_for(op: str) -> dict:
    """Every provider of ``op``; the memory factors are full-mode peaks measured at N = 4096."""
    fused = [_fastxmc_provider(op, name)
             for name in ("cpu", "torch", "triton", "triton-atomic", "cuda")]
    if op == "supcon":
        others = [Provider("pml-supcon", op, _pml_supcon_loss,
                           lambda *_: _importable("pytorch_metric_learning"), 13.0)]
    else:
        inf_cl_shape = (lambda device, dtype, d: None if _inf_cl_head_dim(d)
                        else f"D={d} is not a multiple of 16")
        others = [
            Provider("materialized", op, lambda: lambda x: materialized_info_nce(x.a, x.b, x.t),
                     lambda *_: None, 6.5),
            Provider("open_clip", op, _open_clip_loss, lambda *_: _importable("open_clip"), 5.0),
            Provider("inf-cl", op, _inf_cl_loss, _gpu_only("inf_cl", inf_cl_shape), 0.0),
        ]
    return {p.name: p for p in others + fused}


def baseline_provider(op: str) -> str:
    return "pml-supcon" if op == "supcon" else "materialized"


def default_backend(device, dtype) -> str:
    """What ``info_nce`` picks without ``impl=`` (the fused backend the targets are about)."""
    return sweeps.default_backend(registry, Request(device, dtype))


def estimated_bytes(provider: Provider, n: int, m: int, d: int, dtype) -> int:
    elem = torch.finfo(dtype).bits // 8
    # O((N + M) D): inputs' normalized copies and gradients; fused workspaces are a few chunks.
    linear = 8 * (n + m) * d * max(elem, 4) + (256 << 20)
    return int(provider.matrices * n * m * elem + linear)


# ---------------------------------------------------------------- one measurement
def _gemm_calls(x: Inputs, k: int):
    a = x.a.detach()
    b = a if x.b is None else x.b.detach()
    out = torch.empty(a.shape[0], b.shape[0], device=a.device, dtype=a.dtype)

    def gemms(_):
        for _ in range(k):
            torch.mm(a, b.T, out=out)
    return gemms


def run_provider(provider: Provider, x: Inputs, modes, device, policy):
    """Yields one Row per mode as soon as it is measured."""
    try:
        loss_fn = provider.make()
    except Exception as err:  # noqa: BLE001 - report and go on with the other providers
        yield from (sweeps.Row.failed(provider.name, mode, err) for mode in modes)
        return
    yield from sweeps.run_provider(provider.name, lambda: loss_fn(x), x.params(), modes, device,
                                   policy)


# ---------------------------------------------------------------- reporting
HEADER = (f"{'op':<8} {'N':>6} {'provider':<21} {'mode':<4} {'median ms':>10} "
          f"{'p20-p80 ms':>19} {'reps':>4} {'extra MB':>9} {'x mm':>6} {'speedup':>7}  note")


def print_row(op, n, row: dict):
    row = roofline.with_bound_note("infonce", row, {"n": row["n"], "m": row["m"], "d": row["d"],
                                                    "with_cols": op != "supcon"})
    sweeps.print_table_row(f"{op:<8} {n:>6} {row['provider']:<21} {row['mode']:<4}", row,
                           [("ratio_to_4mm", "6.2f"), ("speedup_vs_materialized", "7.2f")])


def to_csv_row(row: sweeps.Row, meta: dict, case: dict, baselines: sweeps.Baselines) -> dict:
    out = sweeps.csv_row(row, meta, case, baseline=GEMM.name(row.mode))
    if row.result is not None:
        out.update(loss=row.result.result, baseline_ms=baselines.gemm_ms.get(row.mode),
                   ratio_to_4mm=baselines.ratio_to_gemm(row),
                   speedup_vs_materialized=baselines.speedup(row))
    return out


# ---------------------------------------------------------------- the sweep
def select_providers(op: str, requested: Optional[list], device, dtype, d) -> list:
    """The baseline first (so that every later row can print its speedup)."""
    return sweeps.select_providers(providers_for(op), requested,
                                   lambda p: p.reason(device, dtype, d), baseline_provider(op),
                                   what=f"providers for {op}")


def _memory_skip(provider: Optional[Provider], n: int, d: int, dtype, device) -> Optional[str]:
    """Why ``provider`` (None: the GEMM baseline and its N x M output) would not fit, or None."""
    if provider is None:
        need = n * n * (torch.finfo(dtype).bits // 8)
    else:
        need = estimated_bytes(provider, n, n, d, dtype)
    return sweeps.memory_skip(need, device)


def _rows_of_size(op, n, args, device, dtype, providers):
    x = setup_inputs(op, n, args.dim, dtype, device, args.temperature)
    why = _memory_skip(None, n, args.dim, dtype, device)
    if why:
        yield from (sweeps.Row(GEMM.name(m), m, "skipped", note=why) for m in args.modes)
    else:
        yield from GEMM.rows(lambda k: _gemm_calls(x, k), args.modes, device, args.policy)
    for provider in providers:
        why = _memory_skip(provider, n, args.dim, dtype, device)
        if why:
            yield from sweeps.Row.skipped(provider.name, args.modes, why)
        else:
            yield from run_provider(provider, x, args.modes, device, args.policy)


def run_size(op, n, args, device, dtype, providers, meta) -> list:
    """Measures every provider at N = M = n; prints and appends each row as it is measured."""
    case = dict(op=op, n=n, m=n, d=args.dim, dtype=args.dtype, labels=int(op == "supcon"),
                temperature=args.temperature)
    baselines = sweeps.Baselines(baseline_provider(op), GEMM.name)
    rows = baselines.recorded(_rows_of_size(op, n, args, device, dtype, providers),
                              loss_abs_tol=1e-4)
    return sweeps.report(rows, lambda row: to_csv_row(row, meta, case, baselines),
                         lambda row: print_row(op, n, row), args.out, COLUMNS)


def print_summary(op: str, rows: list, args, device, dtype) -> None:
    """PASS/FAIL of the design targets for the default fused backend (full mode)."""
    backend = f"fastxmc-{default_backend(device, dtype)}"
    cpu_missing = _fastxmc_reason("cpu", device, dtype) if device.type == "cpu" else None
    full = [r for r in rows if r["mode"] == TARGET["mode"] and r["provider"] == backend
            and r["status"] == "ok"]
    if not full:
        print(f"summary {op}: no full-mode measurement of {backend}", flush=True)
        return
    at_target = [r for r in full if r["n"] == TARGET["n"]]
    row = at_target[0] if at_target else max(full, key=lambda r: r["n"])
    shape_ok = (row["n"] == TARGET["n"] and args.dim == TARGET["d"]
                and args.dtype == TARGET["dtype"] and device.type == "cpu")
    ref = baseline_provider(op)
    checks = [
        (f"speedup vs {ref}", row["speedup_vs_materialized"], ">=", TARGET["speedup"], "x"),
        ("time / 4mm", row["ratio_to_4mm"], "<=", TARGET["ratio_to_4mm"], "x"),
        ("extra peak memory", row["peak_extra_mb"], "<=", TARGET["extra_mb"], " MB"),
    ]
    where = (f"N=M={row['n']} D={args.dim} {args.dtype} full on {device.type}" +
             ("" if shape_ok else f" (indicative: the targets are set at N=M={TARGET['n']}, "
                                  f"D={TARGET['d']}, {TARGET['dtype']}, cpu)"))
    print(f"summary {op}: {backend} (default backend) at {where}; "
          f"load average {common.load_average()}", flush=True)
    if cpu_missing:
        print(f"  note: the fastxmc-cpu backend is unavailable ({cpu_missing})", flush=True)
    for label, value, op_sign, target, unit in checks:
        if value is None:
            print(f"  {label:<28} n/a (baseline not measured)  target {op_sign} {target:g}{unit}")
            continue
        ok = value >= target if op_sign == ">=" else value <= target
        # A verdict only where the target is defined; smaller runs (--quick) just show the ratio.
        verdict = sweeps.verdict(ok) if shape_ok else "(not judged at this size)"
        print(f"  {label:<28} {value:9.2f}{unit:<3}  target {op_sign} {target:g}{unit}  "
              f"{verdict}", flush=True)


# ---------------------------------------------------------------- command line
def parse_args(argv=None):
    p = sweeps.argument_parser(__doc__)
    p.add_argument("--sizes", type=lambda s: sweeps.csv_list(s, int), default=None,
                   help="N = M values (default 1024,4096,16384; --quick: 1024,4096)")
    p.add_argument("--dim", type=int, default=256)
    sweeps.add_device_args(p)
    sweeps.add_modes_arg(p)
    p.add_argument("--labels", action="store_true",
                   help="the supcon op (labels) against pytorch-metric-learning's SupConLoss")
    p.add_argument("--providers", type=sweeps.csv_list, default=None,
                   help="comma list (default: every available one); the GEMM baseline always runs")
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's choice, one per core)")
    p.add_argument("--reps", type=int, default=None,
                   help="maximum timed repetitions (default 20; --quick: 5)")
    p.add_argument("--min-reps", type=int, default=None, help="default 3 (--quick: 2)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds per (size, provider, mode) that set the repetitions "
                        "(default 20; --quick: 1.5)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="cap on the wall time of one (size, provider, mode), at least one call "
                        "is timed (default 40; --quick: 10)")
    sweeps.add_output_args(p, "N = 1024, 4096, full mode, few repetitions (about a minute)",
                           DEFAULT_OUT)
    p.add_argument("--plot", action="store_true", help="write a PNG per op next to the CSV")
    args = p.parse_args(argv)
    args.modes = sweeps.resolve_modes(p, args.modes, ["full"] if args.quick else list(sweeps.MODES))
    args.sizes = args.sizes or ([1024, 4096] if args.quick else [1024, 4096, 16384])
    quick = args.quick
    args.policy = common.RepPolicy(
        warmup=1,
        min_reps=args.min_reps or (2 if quick else 3),
        max_reps=args.reps or (5 if quick else 20),
        budget_s=args.budget or (1.5 if quick else 20.0),
        max_s=args.max_seconds or (10.0 if quick else 40.0))
    return args


def sweep(args, device, dtype, meta) -> None:
    """Every size of the command line, then the verdicts (and the plot with ``--plot``)."""
    op = "supcon" if args.labels else "info_nce"
    sweeps.print_run_header(f"{op}: sizes {args.sizes}, D={args.dim}, {args.dtype}, modes "
                            f"{args.modes}", meta)
    print(f"# reps: {args.policy}", flush=True)
    providers = select_providers(op, args.providers, device, dtype, args.dim)
    sweeps.print_table_start([p.name for p in providers], args.out, HEADER)
    rows = []
    for n in args.sizes:
        rows += run_size(op, n, args, device, dtype, providers, meta)
    print_summary(op, rows, args, device, dtype)
    if args.plot:
        from benchmarks.plot_results import plot_all
        plot_all(args.out, ops=[op])


def main(argv=None) -> int:
    return sweeps.run_main(parse_args(argv), sweep)


if __name__ == "__main__":
    sys.exit(main())
