"""Benchmark of the fused word attention (XMC-GAN's attention in G) against the reference.

    python -m benchmarks.bench_word_attention [--cases generator,shapes] [--batches 16,32]
        [--regions 256] [--device cpu|cuda] [--dtype fp32] [--modes fwd,bwd,full]
        [--providers ...] [--reps K] [--quick] [--out benchmarks/results/word_attention.csv]

Cases (``--cases``): ``generator`` = the 128px generator's attention at 16x16 (R = 256 regions,
T = 17 tokens, d = 768, B = 8, 16, 32, 56); ``shapes`` = the shapes preset (T = 24, d = 384 from
MiniLM, B = 16, 32); ``ln`` = Localized Narratives captions (T = 64, d = 768, B = 16, 32).
``--batches`` replaces every case's batch sizes, ``--dim`` every case's d (e.g. the shapes preset
with its MiniLM words projected to a smaller d).

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

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from benchmarks import common
from fastxmc.ops import word_attention
from fastxmc.ops.registry import Request
from fastxmc.ops.word_attention import registry
from fastxmc.reference.region_word import word_attention_reference

DEFAULT_OUT = Path("benchmarks/results/word_attention.csv")
COLUMNS = ["timestamp", "run_id", "commit", "machine", "device", "torch", "python", "threads",
           "loadavg", "op", "case", "provider", "mode", "b", "r", "t", "d", "dtype", "median_ms",
           "p20_ms", "p80_ms", "reps", "peak_extra_mb", "baseline", "baseline_ms",
           "ratio_to_gemm", "speedup_vs_reference", "checksum", "status", "note"]
MODES = ("fwd", "bwd", "full")
GEMMS_PER_MODE = {"fwd": 2, "bwd": 4, "full": 6}
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


def setup_inputs(b: int, r: int, t: int, d: int, dtype, device, seed: int = 0) -> Inputs:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    lengths = torch.randint(max(1, (2 * t) // 5), t + 1, (b,), generator=gen)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).to(device)
    return Inputs(rand(b, r, d).requires_grad_(), rand(b, t, d).requires_grad_(), mask,
                  rand(b, r, d))


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
def _mode_calls(fn: Callable, x: Inputs, mode: str):
    """(setup, timed call) for ``mode``; gradients are cleared before every call."""
    def clear():
        for p in x.params():
            p.grad = None

    def forward(_):
        return fn(x)

    def with_forward():
        clear()
        return fn(x)

    def full(_):
        out = fn(x)
        out.backward(x.grad)
        return out.detach()

    if mode == "fwd":
        return clear, forward
    if mode == "bwd":
        return with_forward, lambda out: out.backward(x.grad)
    return clear, full


def _gemm_calls(x: Inputs, k: int):
    q, w = x.queries.detach(), x.words.detach()
    out = torch.empty(q.shape[0], q.shape[1], w.shape[1], device=q.device, dtype=q.dtype)

    def gemms(_):
        for _ in range(k):
            torch.bmm(q, w.transpose(1, 2), out=out)
    return gemms


def _checksum(out) -> Optional[float]:
    """A scalar of the context, to check that every provider computes the same thing."""
    return float(out.double().square().sum()) if isinstance(out, torch.Tensor) else None


@dataclass
class Row:
    provider: str
    mode: str
    status: str
    result: Optional[common.Measurement] = None
    checksum: Optional[float] = None
    note: str = ""

    def __post_init__(self):
        self.timestamp, self.loadavg = common.timestamp(), common.load_average()


def _failed(provider: str, mode: str, err: BaseException) -> Row:
    oom = isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()
    first_line = (str(err).splitlines() or [""])[0][:200]
    return Row(provider, mode, "oom" if oom else "error",
               note=f"{type(err).__name__}: {first_line}")


def measure_provider(provider: Provider, x: Inputs, modes, device, policy):
    for mode in modes:
        try:
            setup, call = _mode_calls(provider.fn, x, mode)
            res = common.measure(call, setup=setup, device=device, policy=policy)
            with torch.no_grad():
                check = _checksum(provider.fn(x)) if mode == "fwd" else None
            yield Row(provider.name, mode, "ok", res, check)
        except Exception as err:  # noqa: BLE001 - report and go on with the other providers
            yield _failed(provider.name, mode, err)
        finally:
            for p in x.params():
                p.grad = None


def measure_gemms(x: Inputs, modes, device, policy):
    for mode in modes:
        k = GEMMS_PER_MODE[mode]
        try:
            yield Row(f"{k}bmm", mode, "ok",
                      common.measure(_gemm_calls(x, k), device=device, policy=policy))
        except Exception as err:  # noqa: BLE001
            yield _failed(f"{k}bmm", mode, err)


# ---------------------------------------------------------------- reporting
HEADER = (f"{'case':<9} {'B':>3} {'provider':<16} {'mode':<4} {'median ms':>10} {'p20-p80 ms':>15} "
          f"{'reps':>4} {'extra MB':>9} {'x bmm':>6} {'speedup':>7}  note")


def _cell(value, fmt):
    return format(value, fmt) if value is not None else "-"


def print_row(row: dict) -> None:
    head = f"{row['case']:<9} {row['b']:>3} {row['provider']:<16} {row['mode']:<4}"
    if row["status"] != "ok":
        print(f"{head} {row['status'].upper():>10}  {row['note']}", flush=True)
        return
    spread = f"{row['p20_ms']:.1f}-{row['p80_ms']:.1f}"
    print(f"{head} {row['median_ms']:>10.2f} {spread:>15} {row['reps']:>4} "
          f"{_cell(row['peak_extra_mb'], '9.1f')} {_cell(row['ratio_to_gemm'], '6.2f')} "
          f"{_cell(row['speedup_vs_reference'], '7.2f')}  {row['note']}", flush=True)


def to_csv_row(row: Row, meta: dict, case: dict, baselines: dict) -> dict:
    out = dict(meta, **case, timestamp=row.timestamp, loadavg=row.loadavg, provider=row.provider,
               mode=row.mode, status=row.status, note=row.note, checksum=row.checksum,
               baseline=f"{GEMMS_PER_MODE[row.mode]}bmm")
    res = row.result
    if res is None:
        return out
    gemm, ref = baselines.get(("gemm", row.mode)), baselines.get(("ref", row.mode))
    out.update(median_ms=res.median_ms, p20_ms=res.p20_ms, p80_ms=res.p80_ms, reps=res.reps,
               peak_extra_mb=res.peak_extra_mb, baseline_ms=gemm,
               ratio_to_gemm=res.median_ms / gemm if gemm else None,
               speedup_vs_reference=ref / res.median_ms if ref else None)
    return out


def _check_against_reference(row: Row, ref_checksum: Optional[float]) -> None:
    if row.checksum is None or ref_checksum is None or row.provider == "reference":
        return
    if abs(row.checksum - ref_checksum) > 1e-3 * abs(ref_checksum) + 1e-6:
        row.note = (row.note + f" MISMATCH checksum {row.checksum:.6g} vs reference "
                    f"{ref_checksum:.6g}").strip()


# ---------------------------------------------------------------- the sweep
def run_point(case_name: str, b: int, t: int, d: int, args, device, dtype, chosen, meta) -> list:
    """Measures the GEMM baseline and every provider at one shape; prints and appends each row."""
    case = dict(op="word_attention", case=case_name, b=b, r=args.regions, t=t, d=d,
                dtype=args.dtype)
    x = setup_inputs(b, args.regions, t, d, dtype, device)
    rows = list(measure_gemms(x, args.modes, device, args.policy))
    baselines, ref_checksum, out = {}, None, []
    for row in rows:
        if row.status == "ok":
            baselines[("gemm", row.mode)] = row.result.median_ms
    for provider in chosen:
        for row in measure_provider(provider, x, args.modes, device, args.policy):
            if row.status == "ok" and row.provider == "reference":
                baselines[("ref", row.mode)] = row.result.median_ms
                ref_checksum = row.checksum if row.checksum is not None else ref_checksum
            _check_against_reference(row, ref_checksum)
            rows.append(row)
    for row in rows:
        csv_row = to_csv_row(row, meta, case, baselines)
        print_row(csv_row)
        out.append(csv_row)
    common.append_rows(args.out, out, COLUMNS)
    return out


def print_verdicts(rows: list, args, device, dtype) -> None:
    """PASS/FAIL: the default backend (full mode) against the reference, per judged batch size."""
    backend = f"fastxmc-{default_backend(device, dtype)}"
    judged = device.type == "cpu" and args.dtype == "fp32" and args.regions == 256
    print(f"summary word_attention: {backend} (default backend), full mode, {args.dtype} on "
          f"{device.type}; load average {common.load_average()}", flush=True)
    for case_name, (min_b, speedup) in VERDICTS.items():
        mine = [r for r in rows if r["case"] == case_name and r["mode"] == "full"
                and r["provider"] == backend and r["status"] == "ok"]
        for row in mine:
            value = row["speedup_vs_reference"]
            if value is None:
                print(f"  {case_name:<9} B={row['b']:<3} n/a (reference not measured)")
                continue
            in_scope = judged and row["b"] >= min_b
            verdict = ("PASS" if value >= speedup else "FAIL") if in_scope else "(not judged)"
            extra = _cell(row["peak_extra_mb"], ".1f")
            print(f"  {case_name:<9} B={row['b']:<3} T={row['t']:<3} d={row['d']:<4} speedup "
                  f"{value:6.2f}x (target >= {speedup:g}x)  extra MB {extra}  {verdict}",
                  flush=True)


# ---------------------------------------------------------------- command line
def _csv_list(text: str, cast=str) -> list:
    return [cast(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=_csv_list, default=None,
                   help=f"comma list of {list(CASES)} (default generator,shapes)")
    p.add_argument("--batches", type=lambda s: _csv_list(s, int), default=None,
                   help="batch sizes for every case (default: each case's own; --quick: 16)")
    p.add_argument("--regions", type=int, default=256, help="R (default 256 = 16x16)")
    p.add_argument("--dim", type=int, default=None, help="d for every case (default: each case's)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--modes", type=_csv_list, default=None,
                   help="comma list of fwd,bwd,full (default all three; --quick: full)")
    p.add_argument("--providers", type=_csv_list, default=None,
                   help="comma list (default: every available one); the GEMM baseline always runs")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--reps", type=int, default=None, help="maximum timed repetitions (default 20)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds per (shape, provider, mode) that set the repetitions (default 10)")
    p.add_argument("--quick", action="store_true", help="B = 16, full mode, few repetitions")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    args.cases = args.cases or ["generator", "shapes"]
    bad = [c for c in args.cases if c not in CASES]
    if bad:
        p.error(f"unknown cases {bad}; choose from {list(CASES)}")
    args.modes = args.modes or (["full"] if args.quick else list(MODES))
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"unknown modes {bad}; choose from {list(MODES)}")
    if args.quick and args.batches is None:
        args.batches = [16]
    args.policy = common.RepPolicy(warmup=1, min_reps=2 if args.quick else 5,
                                   max_reps=args.reps or (5 if args.quick else 20),
                                   budget_s=args.budget or (1.5 if args.quick else 10.0),
                                   max_s=10.0 if args.quick else 30.0)
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
    print(f"# word_attention: cases {args.cases}, R={args.regions}, {args.dtype}, modes "
          f"{args.modes}, device {meta['device']}, {meta['machine']}, torch {meta['torch']}, "
          f"{meta['threads']} threads, commit {meta['commit']}, load average "
          f"{common.load_average()}", flush=True)
    chosen = providers(device, dtype, args.providers)
    print(f"# providers: {[p.name for p in chosen]} + GEMM baseline; results -> {args.out}",
          flush=True)
    print(HEADER, flush=True)
    rows = []
    for case_name in args.cases:
        t, d, batches = CASES[case_name]
        d = args.dim or d
        for b in args.batches or batches:
            rows += run_point(case_name, b, t, d, args, device, dtype, chosen, meta)
    print_verdicts(rows, args, device, dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
