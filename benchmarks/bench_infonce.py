"""Benchmark of the fused InfoNCE / SupCon losses against materialized baselines.

    python -m benchmarks.bench_infonce [--sizes 1024,4096,16384] [--dim 256] [--device cpu|cuda]
        [--modes fwd,bwd,full] [--labels] [--providers ...] [--reps K] [--quick]
        [--out benchmarks/results/infonce.csv] [--plot]

Op ``info_nce`` (default): symmetric CLIP loss of a (N x D) and b (N x D), one positive per row.
Op ``supcon`` (``--labels``): supervised contrastive loss of one (N x D) set with labels.
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

import argparse
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from benchmarks import common
from fastxmc.losses import info_nce, supcon
from fastxmc.ops.infonce import registry
from fastxmc.ops.registry import Request

DEFAULT_OUT = Path("benchmarks/results/infonce.csv")
COLUMNS = ["timestamp", "run_id", "commit", "machine", "device", "torch", "python", "threads",
           "loadavg", "op", "provider", "mode", "n", "m", "d", "dtype", "labels", "temperature",
           "median_ms", "p20_ms", "p80_ms", "reps", "peak_extra_mb", "baseline", "baseline_ms",
           "ratio_to_4mm", "speedup_vs_materialized", "loss", "status", "note"]
GEMMS_PER_MODE = {"fwd": 1, "bwd": 3, "full": 4}
MODES = ("fwd", "bwd", "full")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "fp64": torch.float64}
# The targets of design/kernels.md section 1 (CPU, one run).
TARGET = dict(n=16384, d=256, dtype="fp32", mode="full", speedup=4.0, ratio_to_4mm=1.5,
              extra_mb=256.0)
MEMORY_SHARE = 0.7  # skip a provider whose estimated peak exceeds this share of available memory


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
    if backend in ("triton", "cuda") and device.type != "cuda":
        return "GPU-only backend (on CPU, Triton's interpreter is for tests, not timing)"
    why = registry.reasons(Request(device, dtype)).get(backend)
    return "; ".join(why) if why else None


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
    fused = [_fastxmc_provider(op, name) for name in ("cpu", "torch", "triton", "cuda")]
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return registry.select(Request(device, dtype), None)


def estimated_bytes(provider: Provider, n: int, m: int, d: int, dtype) -> int:
    elem = torch.finfo(dtype).bits // 8
    # O((N + M) D): inputs' normalized copies and gradients; fused workspaces are a few chunks.
    linear = 8 * (n + m) * d * max(elem, 4) + (256 << 20)
    return int(provider.matrices * n * m * elem + linear)


# ---------------------------------------------------------------- one measurement
def _mode_calls(loss_fn: Callable, x: Inputs, mode: str):
    """(setup, timed call) for ``mode``; gradients are cleared before every call."""
    def clear():
        for p in x.params():
            p.grad = None

    def forward(_):
        return loss_fn(x)

    def backward_only():
        clear()
        return loss_fn(x)

    def full(_):
        loss = loss_fn(x)
        loss.backward()
        return loss.detach()

    if mode == "fwd":
        return clear, forward
    if mode == "bwd":
        return backward_only, lambda loss: loss.backward()
    return clear, full


def _gemm_calls(x: Inputs, k: int):
    a = x.a.detach()
    b = a if x.b is None else x.b.detach()
    out = torch.empty(a.shape[0], b.shape[0], device=a.device, dtype=a.dtype)

    def gemms(_):
        for _ in range(k):
            torch.mm(a, b.T, out=out)
    return gemms


@dataclass
class Row:
    provider: str
    mode: str
    status: str
    result: Optional[common.Measurement] = None
    note: str = ""

    def __post_init__(self):
        # When it was measured, and how loaded the machine was then.
        self.timestamp, self.loadavg = common.timestamp(), common.load_average()


def _measure(fn_pair, device, policy) -> common.Measurement:
    setup, call = fn_pair
    return common.measure(call, setup=setup, device=device, policy=policy)


def _failed(provider: str, mode: str, err: BaseException) -> Row:
    oom = isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()
    first_line = (str(err).splitlines() or [""])[0][:200]
    return Row(provider, mode, "oom" if oom else "error", note=f"{type(err).__name__}: {first_line}")


def run_provider(provider: Provider, x: Inputs, modes, device, policy):
    """Yields one Row per mode as soon as it is measured."""
    try:
        loss_fn = provider.make()
    except Exception as err:  # noqa: BLE001 - report and go on with the other providers
        yield from (_failed(provider.name, mode, err) for mode in modes)
        return
    for mode in modes:
        try:
            row = Row(provider.name, mode, "ok",
                      _measure(_mode_calls(loss_fn, x, mode), device, policy))
        except Exception as err:  # noqa: BLE001
            row = _failed(provider.name, mode, err)
        finally:
            for p in x.params():
                p.grad = None
        yield row


def run_gemm_baseline(x: Inputs, modes, device, policy):
    for mode in modes:
        k = GEMMS_PER_MODE[mode]
        try:
            yield Row(f"{k}mm", mode, "ok", common.measure(_gemm_calls(x, k), device=device,
                                                           policy=policy))
        except Exception as err:  # noqa: BLE001
            yield _failed(f"{k}mm", mode, err)


# ---------------------------------------------------------------- reporting
HEADER = (f"{'op':<8} {'N':>6} {'provider':<15} {'mode':<4} {'median ms':>10} "
          f"{'p20-p80 ms':>19} {'reps':>4} {'extra MB':>9} {'x mm':>6} {'speedup':>7}  note")


def _cell(value, fmt):
    return format(value, fmt) if value is not None else "-"


def print_row(op, n, row: dict):
    if row["status"] != "ok":
        print(f"{op:<8} {n:>6} {row['provider']:<15} {row['mode']:<4} {row['status'].upper():>10}"
              f"  {row['note']}", flush=True)
        return
    spread = f"{row['p20_ms']:.1f}-{row['p80_ms']:.1f}"
    print(f"{op:<8} {n:>6} {row['provider']:<15} {row['mode']:<4} {row['median_ms']:>10.1f} "
          f"{spread:>19} {row['reps']:>4} {_cell(row['peak_extra_mb'], '9.1f')} "
          f"{_cell(row['ratio_to_4mm'], '6.2f')} {_cell(row['speedup_vs_materialized'], '7.2f')}"
          f"  {row['note']}", flush=True)


def to_csv_row(row: Row, meta: dict, case: dict, baselines: dict) -> dict:
    out = dict(meta, **case, timestamp=row.timestamp, loadavg=row.loadavg, provider=row.provider,
               mode=row.mode, status=row.status, note=row.note,
               baseline=f"{GEMMS_PER_MODE[row.mode]}mm")
    res = row.result
    if res is None:
        return out
    gemm, ref = baselines.get(("gemm", row.mode)), baselines.get(("ref", row.mode))
    out.update(median_ms=res.median_ms, p20_ms=res.p20_ms, p80_ms=res.p80_ms, reps=res.reps,
               peak_extra_mb=res.peak_extra_mb, loss=res.result,
               baseline_ms=gemm, ratio_to_4mm=res.median_ms / gemm if gemm else None,
               speedup_vs_materialized=ref / res.median_ms if ref else None)
    return out


def _loss_check(row: Row, reference: str, ref_loss: Optional[float]) -> None:
    """Flag a provider whose loss differs from the baseline's (they must compute the same)."""
    value = row.result.result if row.result is not None else None
    if value is None or ref_loss is None or row.provider == reference:
        return
    if not math.isclose(value, ref_loss, rel_tol=2e-3, abs_tol=1e-4):
        row.note = (row.note + f" LOSS MISMATCH {value:.6g} vs {reference} {ref_loss:.6g}").strip()


# ---------------------------------------------------------------- the sweep
def select_providers(op: str, requested: Optional[list], device, dtype, d) -> list:
    every = providers_for(op)
    names = requested or list(every)
    unknown = [p for p in names if p not in every and not p.endswith("mm")]
    if unknown:
        raise SystemExit(f"unknown providers for {op}: {unknown}; choose from {list(every)}")
    chosen = []
    for name in names:
        if name.endswith("mm"):
            continue  # the GEMM baseline always runs
        why = every[name].reason(device, dtype, d)
        if why:
            print(f"# skip {name}: {why}", flush=True)
        else:
            chosen.append(every[name])
    # The baseline runs first so that every later row can print its speedup.
    return sorted(chosen, key=lambda p: p.name != baseline_provider(op))


def _memory_skip(provider: Optional[Provider], n: int, d: int, dtype, device) -> Optional[str]:
    """Why ``provider`` (None: the GEMM baseline and its N x M output) would not fit, or None."""
    if provider is None:
        need = n * n * (torch.finfo(dtype).bits // 8)
    else:
        need = estimated_bytes(provider, n, n, d, dtype)
    free = common.available_memory_bytes(device)
    if need <= MEMORY_SHARE * free:
        return None
    return (f"estimated peak {need / common.MB:.0f} MB > {MEMORY_SHARE:.0%} of available "
            f"{free / common.MB:.0f} MB")


def _rows_of_size(op, n, args, device, dtype, providers):
    x = setup_inputs(op, n, args.dim, dtype, device, args.temperature)
    why = _memory_skip(None, n, args.dim, dtype, device)
    if why:
        yield from (Row(f"{GEMMS_PER_MODE[m]}mm", m, "skipped", note=why) for m in args.modes)
    else:
        yield from run_gemm_baseline(x, args.modes, device, args.policy)
    for provider in providers:
        why = _memory_skip(provider, n, args.dim, dtype, device)
        if why:
            yield from (Row(provider.name, mode, "skipped", note=why) for mode in args.modes)
        else:
            yield from run_provider(provider, x, args.modes, device, args.policy)


def run_size(op, n, args, device, dtype, providers, meta) -> list:
    """Measures every provider at N = M = n; prints and appends each row as it is measured."""
    case = dict(op=op, n=n, m=n, d=args.dim, dtype=args.dtype, labels=int(op == "supcon"),
                temperature=args.temperature)
    reference, baselines, ref_loss, out = baseline_provider(op), {}, None, []
    for row in _rows_of_size(op, n, args, device, dtype, providers):
        if row.status == "ok" and row.provider == f"{GEMMS_PER_MODE[row.mode]}mm":
            baselines[("gemm", row.mode)] = row.result.median_ms
        if row.status == "ok" and row.provider == reference:
            baselines[("ref", row.mode)] = row.result.median_ms
            ref_loss = row.result.result if row.result.result is not None else ref_loss
        _loss_check(row, reference, ref_loss)
        csv_row = to_csv_row(row, meta, case, baselines)
        print_row(op, n, csv_row)
        common.append_rows(args.out, [csv_row], COLUMNS)
        out.append(csv_row)
    return out


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


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
        verdict = _verdict(ok) if shape_ok else "(not judged at this size)"
        print(f"  {label:<28} {value:9.2f}{unit:<3}  target {op_sign} {target:g}{unit}  "
              f"{verdict}", flush=True)


# ---------------------------------------------------------------- command line
def _csv_list(text: str, cast=str) -> list:
    return [cast(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=lambda s: _csv_list(s, int), default=None,
                   help="N = M values (default 1024,4096,16384; --quick: 1024,4096)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--modes", type=_csv_list, default=None,
                   help="comma list of fwd,bwd,full (default all three; --quick: full)")
    p.add_argument("--labels", action="store_true",
                   help="the supcon op (labels) against pytorch-metric-learning's SupConLoss")
    p.add_argument("--providers", type=_csv_list, default=None,
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
    p.add_argument("--quick", action="store_true",
                   help="N = 1024, 4096, full mode, few repetitions (about a minute)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--plot", action="store_true", help="write a PNG per op next to the CSV")
    args = p.parse_args(argv)
    args.modes = args.modes or (["full"] if args.quick else list(MODES))
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"unknown modes {bad}; choose from {list(MODES)}")
    args.sizes = args.sizes or ([1024, 4096] if args.quick else [1024, 4096, 16384])
    quick = args.quick
    args.policy = common.RepPolicy(
        warmup=1,
        min_reps=args.min_reps or (2 if quick else 3),
        max_reps=args.reps or (5 if quick else 20),
        budget_s=args.budget or (1.5 if quick else 20.0),
        max_s=args.max_seconds or (10.0 if quick else 40.0))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch.cuda is not available on this machine", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    op = "supcon" if args.labels else "info_nce"
    meta = common.run_metadata(device)
    print(f"# {op}: sizes {args.sizes}, D={args.dim}, {args.dtype}, modes {args.modes}, "
          f"device {meta['device']}, {meta['machine']}, torch {meta['torch']}, "
          f"{meta['threads']} threads, commit {meta['commit']}, load average "
          f"{common.load_average()}", flush=True)
    print(f"# reps: {args.policy}", flush=True)
    providers = select_providers(op, args.providers, device, dtype, args.dim)
    print(f"# providers: {[p.name for p in providers]} + GEMM baseline; results -> {args.out}",
          flush=True)
    print(HEADER, flush=True)
    rows = []
    for n in args.sizes:
        rows += run_size(op, n, args, device, dtype, providers, meta)
    print_summary(op, rows, args, device, dtype)
    if args.plot:
        from benchmarks.plot_results import plot_all
        plot_all(args.out, ops=[op])
    return 0


if __name__ == "__main__":
    sys.exit(main())
