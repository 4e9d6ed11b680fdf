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

import argparse
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from benchmarks import common
from fastxmc.losses import region_word_loss
from fastxmc.ops.region_word import registry, request_for
from fastxmc.ops.registry import Request

DEFAULT_OUT = Path("benchmarks/results/region_word.csv")
COLUMNS = ["timestamp", "run_id", "commit", "machine", "device", "torch", "python", "threads",
           "loadavg", "op", "provider", "mode", "n", "t", "r", "d", "dtype", "valid_frac",
           "median_ms", "p20_ms", "p80_ms", "reps", "peak_extra_mb", "baseline", "baseline_ms",
           "ratio_to_4mm", "speedup_vs_reference", "memory_vs_reference", "loss", "status", "note"]
OP = "region_word"
GEMMS_PER_MODE = {"fwd": 1, "bwd": 3, "full": 4}
MODES = ("fwd", "bwd", "full")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "fp64": torch.float64}
TARGET = dict(n=64, t=17, r=256, d=768, dtype="fp32", mode="full", speedup=3.0, memory_ratio=0.1,
              big_n=256, big_extra_mb=2048.0)
MEMORY_SHARE = 0.7
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
    if backend in ("triton", "cuda") and device.type != "cuda":
        return "GPU-only backend (on CPU, Triton's interpreter is for tests, not timing)"
    why = registry.reasons(_request(device, dtype, r)).get(backend)
    return "; ".join(why) if why else None


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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return registry.select(_request(device, dtype, r), None)


def estimated_bytes(provider: Provider, b: int, t: int, r: int, d: int, dtype) -> int:
    linear = 6 * b * (r + t) * d * 4 + (256 << 20)  # normalized copies, gradients, workspaces
    if not provider.materializes:
        return linear
    return int(REFERENCE_FACTOR * b * b * t * (r + d) * 4 + linear)


# ---------------------------------------------------------------- one measurement
def _mode_calls(loss_fn: Callable, x: Inputs, mode: str):
    """(setup, timed call) for ``mode``; gradients are cleared before every call."""
    def clear():
        for p in x.params():
            p.grad = None

    def backward_only():
        clear()
        return loss_fn(x)

    def full(_):
        loss = loss_fn(x)
        loss.backward()
        return loss.detach()

    if mode == "fwd":
        return clear, lambda _: loss_fn(x)
    if mode == "bwd":
        return backward_only, lambda loss: loss.backward()
    return clear, full


def _gemm_calls(x: Inputs, k: int):
    """k products (B T x d) x (d x B R) into one preallocated output."""
    w = x.words.detach().reshape(-1, x.words.shape[-1])
    r = x.regions.detach().reshape(-1, x.regions.shape[-1])
    out = torch.empty(w.shape[0], r.shape[0], device=w.device, dtype=w.dtype)

    def gemms(_):
        for _ in range(k):
            torch.mm(w, r.T, out=out)
    return gemms


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


def run_provider(provider: Provider, x: Inputs, modes, device, policy):
    """Yields one Row per mode as soon as it is measured."""
    for mode in modes:
        setup, call = _mode_calls(provider.loss, x, mode)
        try:
            row = Row(provider.name, mode, "ok",
                      common.measure(call, setup=setup, device=device, policy=policy))
        except Exception as err:  # noqa: BLE001 - report and go on with the other providers
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
HEADER = (f"{'B':>5} {'provider':<16} {'mode':<4} {'median ms':>10} {'p20-p80 ms':>19} "
          f"{'reps':>4} {'extra MB':>9} {'x mm':>6} {'speedup':>7} {'mem/ref':>7}  note")


def _cell(value, fmt):
    return format(value, fmt) if value is not None else "-"


def print_row(n, row: dict):
    if row["status"] != "ok":
        print(f"{n:>5} {row['provider']:<16} {row['mode']:<4} {row['status'].upper():>10}"
              f"  {row['note']}", flush=True)
        return
    spread = f"{row['p20_ms']:.1f}-{row['p80_ms']:.1f}"
    print(f"{n:>5} {row['provider']:<16} {row['mode']:<4} {row['median_ms']:>10.1f} "
          f"{spread:>19} {row['reps']:>4} {_cell(row['peak_extra_mb'], '9.1f')} "
          f"{_cell(row['ratio_to_4mm'], '6.2f')} {_cell(row['speedup_vs_reference'], '7.2f')} "
          f"{_cell(row['memory_vs_reference'], '7.3f')}  {row['note']}", flush=True)


def to_csv_row(row: Row, meta: dict, case: dict, baselines: dict) -> dict:
    out = dict(meta, **case, timestamp=row.timestamp, loadavg=row.loadavg, provider=row.provider,
               mode=row.mode, status=row.status, note=row.note,
               baseline=f"{GEMMS_PER_MODE[row.mode]}mm")
    res = row.result
    if res is None:
        return out
    gemm, ref = baselines.get(("gemm", row.mode)), baselines.get(("ref", row.mode))
    ref_mb = baselines.get(("ref_mb", row.mode))
    mb = res.peak_extra_mb
    out.update(median_ms=res.median_ms, p20_ms=res.p20_ms, p80_ms=res.p80_ms, reps=res.reps,
               peak_extra_mb=mb, loss=res.result, baseline_ms=gemm,
               ratio_to_4mm=res.median_ms / gemm if gemm else None,
               speedup_vs_reference=ref / res.median_ms if ref else None,
               memory_vs_reference=mb / ref_mb if ref_mb and mb is not None else None)
    return out


def _loss_check(row: Row, ref_loss: Optional[float]) -> None:
    """Flag a provider whose loss differs from the reference's (they must compute the same)."""
    value = row.result.result if row.result is not None else None
    if value is None or ref_loss is None or row.provider == "reference":
        return
    if not math.isclose(value, ref_loss, rel_tol=2e-3, abs_tol=1e-3):
        row.note = (row.note + f" LOSS MISMATCH {value:.6g} vs reference {ref_loss:.6g}").strip()


# ---------------------------------------------------------------- the sweep
def select_providers(requested: Optional[list], device, dtype, r: int) -> list:
    every = providers()
    names = requested or list(every)
    unknown = [p for p in names if p not in every and not p.endswith("mm")]
    if unknown:
        raise SystemExit(f"unknown providers: {unknown}; choose from {list(every)}")
    chosen = []
    for name in names:
        if name.endswith("mm"):
            continue  # the GEMM baseline always runs
        why = every[name].reason(device, dtype, r)
        if why:
            print(f"# skip {name}: {why}", flush=True)
        else:
            chosen.append(every[name])
    # The reference runs first so that every later row can print its ratios.
    return sorted(chosen, key=lambda p: p.name != "reference")


def _memory_skip(need: int, device) -> Optional[str]:
    free = common.available_memory_bytes(device)
    if need <= MEMORY_SHARE * free:
        return None
    return (f"estimated peak {need / common.MB:.0f} MB > {MEMORY_SHARE:.0%} of available "
            f"{free / common.MB:.0f} MB")


def _rows_of_size(x: Inputs, args, device, dtype, chosen):
    n = x.mask.shape[0]
    product = n * args.words * n * args.regions * (torch.finfo(dtype).bits // 8)
    why = _memory_skip(product, device)
    if why:
        yield from (Row(f"{GEMMS_PER_MODE[m]}mm", m, "skipped", note=why) for m in args.modes)
    else:
        yield from run_gemm_baseline(x, args.modes, device, args.policy)
    for provider in chosen:
        why = _memory_skip(estimated_bytes(provider, n, args.words, args.regions, args.dim, dtype),
                           device)
        if why:
            yield from (Row(provider.name, mode, "skipped", note=why) for mode in args.modes)
        else:
            yield from run_provider(provider, x, args.modes, device, args.policy)


def run_size(n, args, device, dtype, chosen, meta) -> list:
    """Measures every provider at batch size n; prints and appends each row as it is measured."""
    x = setup_inputs(n, args.words, args.regions, args.dim, dtype, device, args.min_words)
    case = dict(op=OP, n=n, t=args.words, r=args.regions, d=args.dim, dtype=args.dtype,
                valid_frac=float(x.mask.float().mean()))
    baselines, ref_loss, out = {}, None, []
    for row in _rows_of_size(x, args, device, dtype, chosen):
        if row.status == "ok" and row.provider == f"{GEMMS_PER_MODE[row.mode]}mm":
            baselines[("gemm", row.mode)] = row.result.median_ms
        if row.status == "ok" and row.provider == "reference":
            baselines[("ref", row.mode)] = row.result.median_ms
            baselines[("ref_mb", row.mode)] = row.result.peak_extra_mb
            ref_loss = row.result.result if row.result.result is not None else ref_loss
        _loss_check(row, ref_loss)
        csv_row = to_csv_row(row, meta, case, baselines)
        print_row(n, csv_row)
        common.append_rows(args.out, [csv_row], COLUMNS)
        out.append(csv_row)
    return out


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _judged(args, device) -> bool:
    """Whether this run has the shape, dtype and device the targets are set at."""
    return (args.words == TARGET["t"] and args.regions == TARGET["r"] and args.dim == TARGET["d"]
            and args.dtype == TARGET["dtype"] and device.type == "cpu")


def _print_check(label, value, sign, target, unit, judged) -> None:
    if value is None:
        print(f"  {label:<34} n/a (not measured)  target {sign} {target:g}{unit}", flush=True)
        return
    ok = value >= target if sign == ">=" else value <= target
    verdict = _verdict(ok) if judged else "(not judged: not the target shape / device)"
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
    row = full.get(TARGET["n"])
    if row is None:
        print(f"  no full-mode measurement of {backend} at B={TARGET['n']}", flush=True)
    else:
        _print_check(f"B={TARGET['n']} speedup vs reference", row["speedup_vs_reference"], ">=",
                     TARGET["speedup"], "x", judged)
        _print_check(f"B={TARGET['n']} extra memory / reference's", row["memory_vs_reference"],
                     "<=", TARGET["memory_ratio"], "x", judged)
    big = full.get(TARGET["big_n"])
    if big is None:
        print(f"  no full-mode measurement of {backend} at B={TARGET['big_n']}", flush=True)
    else:
        _print_check(f"B={TARGET['big_n']} extra peak memory", big["peak_extra_mb"], "<=",
                     TARGET["big_extra_mb"], " MB", judged)


# ---------------------------------------------------------------- command line
def _csv_list(text: str, cast=str) -> list:
    return [cast(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=lambda s: _csv_list(s, int), default=None,
                   help="batch sizes B (default 8,64,256; --quick: 8,64)")
    p.add_argument("--words", type=int, default=17, help="T, tokens per caption")
    p.add_argument("--regions", type=int, default=256, help="R, regions per image")
    p.add_argument("--dim", type=int, default=768, help="d, the feature size")
    p.add_argument("--min-words", type=int, default=8,
                   help="captions have between this many and T real tokens")
    p.add_argument("--full-mask", action="store_true", help="every token real (no padding)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--modes", type=_csv_list, default=None,
                   help="comma list of fwd,bwd,full (default all three; --quick: full)")
    p.add_argument("--providers", type=_csv_list, default=None,
                   help="comma list (default: every available one); the GEMM baseline always runs")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--reps", type=int, default=None, help="maximum timed repetitions (default 10)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds per (size, provider, mode) that set the repetitions (default 20)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="cap on the wall time of one (size, provider, mode) (default 60)")
    p.add_argument("--quick", action="store_true",
                   help="B = 8, 64, full mode, few repetitions (a few minutes)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    args.modes = args.modes or (["full"] if args.quick else list(MODES))
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"unknown modes {bad}; choose from {list(MODES)}")
    args.sizes = args.sizes or ([8, 64] if args.quick else [8, 64, 256])
    if args.full_mask:
        args.min_words = None
    quick = args.quick
    args.policy = common.RepPolicy(
        warmup=1, min_reps=2 if quick else 3, max_reps=args.reps or (3 if quick else 10),
        budget_s=args.budget or (5.0 if quick else 20.0),
        max_s=args.max_seconds or (20.0 if quick else 60.0))
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
    print(f"# {OP}: B in {args.sizes}, T={args.words} R={args.regions} d={args.dim} {args.dtype}, "
          f"modes {args.modes}, device {meta['device']}, {meta['machine']}, torch "
          f"{meta['torch']}, {meta['threads']} threads, commit {meta['commit']}, load average "
          f"{common.load_average()}", flush=True)
    print(f"# reps: {args.policy}", flush=True)
    chosen = select_providers(args.providers, device, dtype, args.regions)
    print(f"# providers: {[p.name for p in chosen]} + GEMM baseline; results -> {args.out}",
          flush=True)
    print(HEADER, flush=True)
    rows = []
    for n in args.sizes:
        rows += run_size(n, args, device, dtype, chosen, meta)
    print_summary(rows, args, device, dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
