"""A performance model on paper of fastxmc's fused GPU ops: the work each one must do at a shape,
the H100 SXM's ceilings, and how close a measured time comes to the resulting bound.

    from benchmarks.roofline import percent_of_bound, bound
    percent_of_bound("infonce_full", {"n": 65536, "m": 65536, "d": 768}, "bf16", 0.0668)  # ~50.0
    bound("infonce_full", {"n": 65536, "m": 65536, "d": 768}, "bf16").limiter             # "matmul"

    python -m benchmarks.roofline        # the bound of every op at the benchmarks' shapes

Kernels are ``<op>_<mode>``: op ``infonce``, ``region_word``, ``word_attention`` or
``modulated_bn``, mode ``fwd``, ``bwd`` or ``full`` (= fwd + bwd, as the benchmarks' full mode).
Each op is counted as its contract in ``csrc/<op>/<op>.h`` states it, four resources apart:

- ``matmul``: the FLOPs of its matrix products (2 per multiply-add), at the tensor-core rate of
  the input dtype: bf16 / fp16 tensor cores, ``tf32`` tensor cores, or for ``fp32`` the CUDA cores'
  FMA rate (the project's fp32 paths compute exact fp32 products: Triton ``input_precision="ieee"``,
  cuBLAS without TF32, the CUDA kernels' FMA loops);
- ``simt``: the element-wise FLOPs beside them (scaling, max-shifts, sums; normalisations), at the
  CUDA cores' fp32 rate; approximate counts per element, small beside the products except for the
  memory-bound modulated batch norm;
- ``sfu``: exponentials, one special-function (MUFU) operation each;
- ``hbm``: the fewest bytes of device memory: each input read once, each output written once, in
  the dtypes of the contract (the fused ops' outputs and saved statistics are fp32).

The resources work concurrently, so the bound is the largest of the four times and ``limiter``
names it. A kernel that re-reads its inputs (tiles of b once per block of rows, say), spills, or
leaves a unit idle lands below 100%; nothing correct lands above it, except by caching an input
between the forward and the backward, which the ``full`` bytes count twice (the backward needs
the forward's finished log-sum-exps, so a second pass over the inputs is inherent).

The ceilings (:data:`H100_SXM`): bf16 / fp16 at 790 TFLOP/s, the rate a cuBLAS 8192^3 bf16
product reached on the H100 SXM lent to this project (798 TFLOP/s, and 769-798 on the H200 of the
same image), not the datasheet's 989.4 dense: the datasheet rate is not reached at the clocks and
power the card runs, so judged against it every kernel would look ~20% worse than the best matrix
product on the same card does. TF32 at 395 TFLOP/s (the datasheet's 494.7 in the same 790/989.4
ratio); CUDA-core fp32 at the datasheet's 67 TFLOP/s (132 SMs x 128 lanes x 2 x 1.98 GHz);
exponentials at 3.9 T/s (132 SMs x 16 MUFU results per clock at ~1.83 GHz, the special-function
rate quoted for the H100 SXM); HBM3 at the datasheet's 3.35 TB/s (a device-to-device copy on the
lent card measured ~3.0 TB/s counting both directions, so a memory-bound kernel tops out near 90%).
:data:`H100_SXM_DATASHEET` holds the datasheet's matrix rates for comparison.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Mapping, Optional

OPS = ("infonce", "region_word", "word_attention", "modulated_bn")
MODES = ("fwd", "bwd", "full")
KERNELS = tuple(f"{op}_{mode}" for op in OPS for mode in MODES)
RESOURCES = ("matmul", "simt", "sfu", "hbm")


@dataclass(frozen=True)
class Device:
    """Peak rates: ``matmul`` FLOP/s per math mode ("bf16", "fp16", "tf32", "fp32"), ``simt``
    fp32 FLOP/s of the CUDA cores, ``sfu`` exponentials per second, ``hbm`` bytes per second."""

    name: str
    matmul: Mapping[str, float]
    simt: float
    sfu: float
    hbm: float


H100_SXM = Device("H100 SXM (bf16 at the measured 790 TFLOP/s, HBM3 3.35 TB/s)",
                  {"bf16": 790e12, "fp16": 790e12, "tf32": 395e12, "fp32": 67e12},
                  simt=67e12, sfu=3.9e12, hbm=3.35e12)
H100_SXM_DATASHEET = Device("H100 SXM datasheet (dense)",
                            {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 67e12},
                            simt=67e12, sfu=3.9e12, hbm=3.35e12)

# Element sizes of the input dtypes, by the names :func:`math_of` accepts.
_ELEM = {"bf16": 2, "fp16": 2, "tf32": 4, "fp32": 4}
_ALIASES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
            "tf32": "tf32", "fp32": "fp32", "float32": "fp32", "float": "fp32"}
FP32 = 4  # bytes of the contracts' fp32 outputs and statistics


@dataclass(frozen=True)
class Work:
    """What a kernel must do: FLOPs of matrix products and of element-wise arithmetic,
    exponentials, and the fewest bytes of device memory."""

    matmul_flops: float
    simt_flops: float
    exps: float
    bytes: float

    def __add__(self, other: "Work") -> "Work":
        return Work(self.matmul_flops + other.matmul_flops, self.simt_flops + other.simt_flops,
                    self.exps + other.exps, self.bytes + other.bytes)


@dataclass(frozen=True)
class Bound:
    """The time each resource needs (seconds), the bound (their maximum) and its resource."""

    times: Mapping[str, float]
    seconds: float
    limiter: str


def math_of(dtype) -> str:
    """"bf16" / "fp16" / "tf32" / "fp32" for a name ("bfloat16", "float32", ...) or a torch dtype."""
    name = str(dtype).lower().removeprefix("torch.")
    if name not in _ALIASES:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(set(_ALIASES))} or a torch "
                         "float16 / bfloat16 / float32 dtype")
    return _ALIASES[name]


def _split(kernel: str) -> tuple:
    op, _, mode = kernel.rpartition("_")
    if op not in OPS or mode not in MODES:
        raise ValueError(f"unknown kernel {kernel!r}: expected one of {list(KERNELS)}")
    return op, mode


def _dims(shape: Mapping, *names: str) -> list:
    missing = [n for n in names if n not in shape]
    if missing:
        raise ValueError(f"shape {dict(shape)} lacks {missing}")
    values = [shape[n] for n in names]
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
        raise ValueError(f"shape {dict(shape)}: {list(names)} must be positive integers")
    return values


# ---------------------------------------------------------------- the ops
def _infonce(mode: str, shape: Mapping, e: int) -> Work:
    """S = scale a b^T (a: n x d, b: m x d); row and, with ``with_cols`` (default: the symmetric
    CLIP loss), column log-sum-exps. Backward: recompute S, dS, grad_a = dS b, grad_b = dS^T a.
    Element-wise per S entry: forward ~5 (scale, max-shifts, sums), backward ~6 (scale, shifts,
    two products with the upstream gradients, the sum, the grad_scale term)."""
    n, m, d = _dims(shape, "n", "m", "d")
    cols = bool(shape.get("with_cols", True))
    nm = n * m
    exps = nm * (2 if cols else 1)
    fwd = Work(2 * nm * d, 5 * nm, exps,
               (n + m) * d * e + FP32 * n + (FP32 * m if cols else 0))
    bwd = Work(6 * nm * d, 6 * nm, exps,
               (n + m) * d * e                       # a, b
               + 2 * FP32 * n + (2 * FP32 * m if cols else 0)  # grad_row, row_lse (and columns)
               + FP32 * (n + m) * d + FP32)          # grad_a, grad_b, grad_scale
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


def _region_word(mode: str, shape: Mapping, e: int) -> Work:
    """regions (b_img, r, d), words (b_cap, t, d) (``b`` sets both), all image-caption pairs;
    P = b_img b_cap t r similarity entries. Forward: sim (2 P d), H = A G (2 P r), the Gram
    matrices G (2 b_img r^2 d), softmax (P exps). Backward: recomputed sim and H, dG = (A dq)^T A
    (2 P r), d words and d regions (2 x 2 P d), 2 dG rn (2 b_img r^2 d), softmax and the caption
    LSE again. Element-wise ~6 per entry forward (scale, shift, sum, A sim, A H), ~10 backward."""
    b_img = shape.get("b_img", shape.get("b"))
    b_cap = shape.get("b_cap", shape.get("b"))
    b_img, b_cap, t, r, d = _dims({**shape, "b_img": b_img, "b_cap": b_cap},
                                  "b_img", "b_cap", "t", "r", "d")
    p = b_img * b_cap * t * r
    gram = 2 * b_img * r * r * d
    inputs = b_img * r * d * e + b_cap * t * d * e + b_cap * t  # regions, words, the bool mask
    fwd = Work(2 * p * d + 2 * p * r + gram, 6 * p, p + b_img * b_cap * t,
               inputs + FP32 * b_img * b_cap + FP32 * b_img * r * r)          # S, gram
    bwd = Work(3 * 2 * p * d + 2 * 2 * p * r + gram, 10 * p, p + b_img * b_cap * t,
               inputs + 2 * FP32 * b_img * b_cap + FP32 * b_img * r * r      # grad_s, S, gram
               + FP32 * (b_img * r + b_cap * t) * d)                          # the gradients
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


def _word_attention(mode: str, shape: Mapping, e: int) -> Work:
    """queries (b, r, d), words (b, t, d). Forward: s = q^ w^T and context = P w^ (2 x 2 b r t d),
    softmax (b r t exps). Backward: recomputed s, dP = g w^T, grad q^ = dS w^, grad w^ = P^T g +
    dS^T q^ (5 x 2 b r t d). Element-wise ~4 per score forward, ~6 backward, and the
    normalisations (~4 per input value)."""
    b, r, t, d = _dims(shape, "b", "r", "t", "d")
    brt, values = b * r * t, b * (r + t) * d
    inputs = values * e + b * t                                      # q, w, the bool mask
    fwd = Work(2 * 2 * brt * d, 4 * brt + 4 * values, brt,
               inputs + FP32 * b * r * d + FP32 * b * r)             # context, lse
    bwd = Work(5 * 2 * brt * d, 6 * brt + 8 * values, brt,
               inputs + FP32 * b * r * d + FP32 * b * r               # grad_context, lse
               + FP32 * values)                                       # grad_q, grad_w
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


def _modulated_bn(mode: str, shape: Mapping, e: int) -> Work:
    """x (b, c, h, w); gamma and beta per pixel (``modulation="pixel"``, the default) or per
    channel ((b, c)); ``relu`` (default True) adds the uint8 mask. Element-wise only: ~8 FLOPs per
    value forward (statistics, normalise, modulate, ReLU), ~14 backward."""
    b, c, h, w = _dims(shape, "b", "c", "h", "w")
    modulation = shape.get("modulation", "pixel")
    if modulation not in ("pixel", "channel"):
        raise ValueError(f"modulation {modulation!r}: expected 'pixel' or 'channel'")
    relu = bool(shape.get("relu", True))
    numel = b * c * h * w
    mod = numel if modulation == "pixel" else b * c
    mask = numel if relu else 0
    fwd = Work(0, 8 * numel, 0,
               numel * e + 2 * mod * e                  # x, gamma, beta
               + numel * e + mask + 3 * FP32 * c)       # y, the mask, mean / invstd / var
    bwd = Work(0, 14 * numel, 0,
               2 * numel * e + mod * e + mask + 2 * FP32 * c   # grad_y, x, gamma, mask, stats
               + numel * e + 2 * mod * e)                      # dx, dgamma, dbeta
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


_OPS = {"infonce": _infonce, "region_word": _region_word, "word_attention": _word_attention,
        "modulated_bn": _modulated_bn}


# ---------------------------------------------------------------- the bound
def work(kernel: str, shape: Mapping, dtype) -> Work:
    """The :class:`Work` of ``kernel`` (see :data:`KERNELS`) at ``shape`` with inputs of ``dtype``."""
    op, mode = _split(kernel)
    return _OPS[op](mode, shape, _ELEM[math_of(dtype)])


def bound(kernel: str, shape: Mapping, dtype, device: Device = H100_SXM) -> Bound:
    """The fastest ``kernel`` can run at ``shape`` on ``device``: the slowest resource's time."""
    w, math = work(kernel, shape, dtype), math_of(dtype)
    times = {"matmul": w.matmul_flops / device.matmul[math], "simt": w.simt_flops / device.simt,
             "sfu": w.exps / device.sfu, "hbm": w.bytes / device.hbm}
    limiter = max(RESOURCES, key=lambda k: times[k])
    return Bound(times, times[limiter], limiter)


def percent_of_bound(kernel: str, shape: Mapping, dtype, seconds: float,
                     device: Device = H100_SXM) -> float:
    """100 x the bound / ``seconds``: how close a measured time comes to the bound (100: at it)."""
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds!r}")
    return 100.0 * bound(kernel, shape, dtype, device).seconds / seconds


def with_bound_note(op: str, row: dict, shape: Mapping) -> dict:
    """``row`` (a benchmark's printed row: status, device, mode, dtype, median_ms, note) with its
    percent of the H100 bound put in front of its note when it is a measured GPU row; other rows
    are returned as they are. The CSV keeps its columns: the figure follows from them."""
    if row.get("status") != "ok" or not str(row.get("device", "")).startswith("cuda") \
            or not row.get("median_ms"):
        return row
    pct = percent_of_bound(f"{op}_{row['mode']}", shape, row["dtype"], row["median_ms"] / 1e3)
    return {**row, "note": f"{pct:.0f}% of the H100 bound; {row.get('note') or ''}".rstrip("; ")}


# ---------------------------------------------------------------- the benchmarks' shapes
def benchmark_shapes() -> list:
    """(op, shape) of the shapes the GPU benchmarks measure: bench_infonce in gpu_check.sh quick,
    and the defaults of bench_region_word, bench_word_attention (generator and shapes cases) and
    bench_modulation (the 128 px generator's stages at B = 8 and 56, per-pixel + ReLU)."""
    shapes = [("infonce", {"n": n, "m": n, "d": 768}) for n in (16384, 32768, 65536)]
    shapes += [("region_word", {"b": b, "t": 17, "r": 256, "d": 768}) for b in (8, 64, 256)]
    shapes += [("word_attention", {"b": b, "r": 256, "t": 17, "d": 768}) for b in (8, 16, 32, 56)]
    shapes += [("word_attention", {"b": b, "r": 256, "t": 24, "d": 384}) for b in (16, 32)]
    shapes += [("modulated_bn", {"b": b, "c": c, "h": h, "w": h})
               for b in (8, 56) for c, h in ((1536, 8), (768, 16), (384, 32), (192, 64), (96, 128))]
    return shapes


def table(dtypes=("bf16", "fp32"), mode: str = "full", device: Device = H100_SXM) -> str:
    """One line per benchmark shape and dtype: the work, each resource's time and the bound."""
    lines = [f"# {device.name}; mode {mode}",
             f"{'kernel':<20} {'shape':<34} {'dtype':<5} {'GFLOP':>9} {'Gexp':>7} {'MB':>9} "
             f"{'matmul us':>10} {'simt us':>8} {'sfu us':>8} {'hbm us':>8} {'bound us':>9}  limiter"]
    for op, shape in benchmark_shapes():
        for dtype in dtypes:
            kernel = f"{op}_{mode}"
            w, b = work(kernel, shape, dtype), bound(kernel, shape, dtype, device)
            dims = ",".join(f"{k}={v}" for k, v in shape.items())
            lines.append(f"{kernel:<20} {dims:<34} {dtype:<5} {w.matmul_flops / 1e9:>9.1f} "
                         f"{w.exps / 1e9:>7.2f} {w.bytes / 1e6:>9.1f} "
                         f"{b.times['matmul'] * 1e6:>10.1f} {b.times['simt'] * 1e6:>8.1f} "
                         f"{b.times['sfu'] * 1e6:>8.1f} "
                         f"{b.times['hbm'] * 1e6:>8.1f} {b.seconds * 1e6:>9.1f}  {b.limiter}")
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=MODES, default="full")
    p.add_argument("--dtypes", default="bf16,fp32", help="comma list (default bf16,fp32)")
    p.add_argument("--datasheet", action="store_true", help="the datasheet's matrix rates")
    args = p.parse_args(argv)
    device = H100_SXM_DATASHEET if args.datasheet else H100_SXM
    print(table([d for d in args.dtypes.split(",") if d], args.mode, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
