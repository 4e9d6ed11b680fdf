"""Offline sm_90 compile report of the InfoNCE Triton kernels: registers, shared memory and spills
of every autotune config, without a GPU.

    python -m benchmarks.triton_compile_report [--dtypes bf16,fp16,fp32] [--kernels NAME,...]
        [--arch 90] [--csv PATH]

Every config the autotuners of :mod:`fastxmc.ops.triton.infonce` (default ``triton`` backend) and
:mod:`fastxmc.ops.triton.infonce_atomic` (``triton-atomic``) may pick for a dtype (with
``--all``, also those the default kernels' dtype rules prune) is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``: Triton's own pipeline down
to a cubin, with its bundled ptxas, as a launch on that GPU would build it. Nothing is launched.

Per config: registers a thread and stack frame (``cuobjdump --dump-resource-usage`` of the
cubin), spill stores / loads (ptxas's ``-v`` log of that compile), shared memory (Triton's dynamic
allocation plus the cubin's static part) and the resulting programs per SM. Flags: ``SPILL``
(spilled registers or local memory), ``SMEM`` (over the 227 KB a block may use), ``REGS`` (over
255 a thread), ``NOFIT`` (not one program per SM). The H100 limits (sm_90): 228 KB shared memory
and 64K 32-bit registers per SM, 227 KB shared memory per block, 255 registers per thread, 64
warps and 32 blocks per SM; 1 KB of shared memory per block is reserved by the driver.

The compiled variant of each kernel is its heaviest: ``EXCLUDE_DIAG`` and every optional term on
(both LSE directions, grad_scale where the launch computes it), pointers 16-byte aligned and D a
multiple of 16 (as Triton specializes them at launch for D = 256 or 768); N and M are left
unspecialized. The exit status is 2 when a config fails to compile, 1 when one that the default
kernels run is flagged (the ``triton-atomic`` baseline keeps its original space and its flags are
only reported), else 0.

TRITON_INTERPRET is forced to 0 here (the kernels must be compiled, not interpreted).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

os.environ["TRITON_INTERPRET"] = "0"   # before triton and fastxmc are imported

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastxmc.ops.triton import infonce as default  # noqa: E402
from fastxmc.ops.triton import infonce_atomic as atomic  # noqa: E402

# sm_90 (H100) limits.
SMEM_PER_SM = 228 * 1024
SMEM_PER_BLOCK = 227 * 1024
SMEM_RESERVED_PER_BLOCK = 1024
REGS_PER_SM = 64 * 1024
REGS_PER_THREAD = 255
REG_ALLOC_UNIT = 256          # registers are allocated per warp in units of 256
WARPS_PER_SM = 64
BLOCKS_PER_SM = 32

TRITON_DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Input pointers take the input dtype; every other pointer is an fp32 buffer.
INPUT_POINTERS = {"a_ptr", "b_ptr", "x_ptr", "y_ptr"}
# Integer arguments that a launch sees as multiples of 16 (D = 256 / 768, splits of 128 columns,
# power-of-two buckets): Triton marks them divisible by 16.
ALIGNED_INTS = {"D", "cols_per_split", "N_BUCKET", "M_BUCKET"}


@dataclass
class KernelCase:
    """One kernel as a backend launches it: its autotuner (for the configs), its flags, and which
    of the autotuner's configs it may run for the report's dtype (the rest are pruned at launch)."""

    name: str
    tuned: object          # triton Autotuner
    flags: dict            # constexpr flags other than the config's
    allowed: Callable = lambda config: True
    baseline: bool = False  # the triton-atomic kernels: flags reported, not failed

    @property
    def fn(self):
        return self.tuned.fn


def _flags(dtype: str, **kw) -> dict:
    flags = dict(INPUT_PRECISION=default.FP32_INPUT_PRECISION if dtype == "fp32" else "tf32",
                 UPCAST=False, EXCLUDE_DIAG=True, PART_BLOCK_M=default._GPU_PART_BLOCK_M)
    flags.update(kw)
    return flags


def _default_allows(kernel: str, dtype: str) -> Callable:
    """The default kernels' dtype rules (:func:`fastxmc.ops.triton.infonce.config_allowed`), for
    any D."""
    torch_dtype = TORCH_DTYPES[dtype]
    return lambda config: default.config_allowed(kernel, torch_dtype, None, config.kwargs,
                                                 config.num_warps)


def kernel_cases(dtype: str) -> list:
    fp16 = dtype == "fp16"
    return [
        KernelCase("fwd", default._fwd_tuned, _flags(dtype, WITH_COLS=True),
                   _default_allows("fwd", dtype)),
        KernelCase("bwd-rows", default._bwd_rows_tuned,
                   _flags(dtype, OWN_TERM=True, OTHER_TERM=True, SCALE_GRAD=True,
                          RESCALE_DS=fp16), _default_allows("bwd", dtype)),
        KernelCase("bwd-cols", default._bwd_cols_tuned,
                   _flags(dtype, OWN_TERM=True, OTHER_TERM=True, SCALE_GRAD=False,
                          RESCALE_DS=fp16), _default_allows("bwd", dtype)),
        KernelCase("atomic-fwd", atomic._fwd_tuned,
                   _flags(dtype, WITH_COLS=True, PART_BLOCK_M=atomic._GPU_PART_BLOCK_M),
                   baseline=True),
        KernelCase("atomic-bwd", atomic._bwd_tuned,
                   _flags(dtype, WITH_COLS=True, RESCALE_DS=fp16,
                          PART_BLOCK_M=atomic._GPU_PART_BLOCK_M), baseline=True),
    ]


@dataclass
class Report:
    kernel: str
    dtype: str
    config: str
    num_warps: int
    regs: Optional[int] = None
    local_bytes: Optional[int] = None
    spill_stores: Optional[int] = None
    spill_loads: Optional[int] = None
    smem_dynamic: Optional[int] = None
    smem_static: Optional[int] = None
    blocks_per_sm: Optional[int] = None
    limiter: str = ""
    seconds: float = 0.0
    error: str = ""
    pruned: bool = False   # a config of the space that this kernel never runs for this dtype
    baseline: bool = False
    flags: list = field(default_factory=list)

    @property
    def smem_total(self) -> Optional[int]:
        if self.smem_dynamic is None:
            return None
        return self.smem_dynamic + (self.smem_static or 0)


def _signature(fn, dtype: str, constexprs: dict):
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + (TRITON_DTYPES[dtype] if name in INPUT_POINTERS else "fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if name in ALIGNED_INTS:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _tool(name: str) -> str:
    from triton.backends.nvidia import compiler as nv
    return str(Path(nv.__file__).parent / "bin" / name)


def _resource_usage(cubin: bytes) -> dict:
    """REG / STACK / SHARED / LOCAL of the cubin's kernel, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        match = re.search(rf"\b{key}:(\d+)", out)
        if match:
            usage[key] = int(match.group(1))
    return usage


def _spills(ptxas_log: str) -> tuple:
    match = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    return (int(match.group(1)), int(match.group(2))) if match else (None, None)


def _occupancy(regs: int, num_warps: int, smem: int) -> tuple:
    """(programs per SM, what limits them) on sm_90."""
    regs_per_warp = -(-regs * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    limits = {"warps": WARPS_PER_SM // num_warps, "blocks": BLOCKS_PER_SM,
              "regs": (REGS_PER_SM // regs_per_warp) // num_warps,
              "smem": SMEM_PER_SM // (smem + SMEM_RESERVED_PER_BLOCK)}
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter


def compile_one(case: KernelCase, config, dtype: str, arch: int) -> Report:
    constexprs = dict(case.flags, **config.kwargs)
    report = Report(case.name, dtype,
                    "x".join(str(config.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")),
                    config.num_warps, pruned=not case.allowed(config), baseline=case.baseline)
    sig, attrs = _signature(case.fn, dtype, constexprs)
    src = ASTSource(case.fn, sig, constexprs, attrs)
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                    options={"num_warps": config.num_warps,
                                             "num_stages": config.num_stages})
    except Exception as err:  # noqa: BLE001 - reported per config, the others go on
        report.error = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        return report
    finally:
        report.seconds = time.perf_counter() - start
    usage = _resource_usage(kernel.asm["cubin"])
    report.regs = usage.get("REG")
    report.local_bytes = usage.get("LOCAL", 0) + usage.get("STACK", 0)
    report.spill_stores, report.spill_loads = _spills(log.getvalue())
    report.smem_dynamic = kernel.metadata.shared
    report.smem_static = usage.get("SHARED", 0)
    report.blocks_per_sm, report.limiter = _occupancy(report.regs or 0, config.num_warps,
                                                      report.smem_total)
    if (report.spill_stores or 0) + (report.spill_loads or 0) + report.local_bytes > 0:
        report.flags.append("SPILL")
    if report.smem_total > SMEM_PER_BLOCK:
        report.flags.append("SMEM")
    if (report.regs or 0) > REGS_PER_THREAD:
        report.flags.append("REGS")
    if report.blocks_per_sm < 1:
        report.flags.append("NOFIT")
    return report


HEADER = (f"{'kernel':<11} {'dtype':<5} {'BMxBNxBK':<11} {'warps':>5} {'regs':>5} "
          f"{'spill st/ld B':>13} {'stack B':>7} {'smem KB':>8} {'progs/SM':>8} "
          f"{'limit':<6} {'s':>5}  flags")


def format_row(r: Report) -> str:
    if r.error:
        return f"{r.kernel:<11} {r.dtype:<5} {r.config:<11} {r.num_warps:>5}  FAILED: {r.error}"
    spills = f"{r.spill_stores}/{r.spill_loads}" if r.spill_stores is not None else "?"
    return (f"{r.kernel:<11} {r.dtype:<5} {r.config:<11} {r.num_warps:>5} {r.regs:>5} "
            f"{spills:>13} {r.local_bytes:>7} {r.smem_total / 1024:>8.1f} {r.blocks_per_sm:>8} "
            f"{r.limiter:<6} {r.seconds:>5.1f}  {','.join(r.flags) or 'ok'}"
            + ("  (pruned: never run)" if r.pruned else ""))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtypes", default="bf16,fp16,fp32")
    p.add_argument("--kernels", default=None,
                   help="comma list of fwd, bwd-rows, bwd-cols, atomic-fwd, atomic-bwd "
                        "(default: all)")
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90)")
    p.add_argument("--csv", type=Path, default=None, help="also write the table as CSV")
    p.add_argument("--all", action="store_true",
                   help="also compile the configs of the space that a kernel never runs for a "
                        "dtype (reported, not flagged)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # Compile every config afresh (a cache hit would skip ptxas and its log) and keep ptxas's -v
    # log, which Triton prints to stdout when asked and compile_one captures.
    triton.knobs.compilation.always_compile = True
    triton.knobs.nvidia.dump_ptxas_log = True
    dtypes = args.dtypes.split(",")
    wanted = set(args.kernels.split(",")) if args.kernels else None
    print(f"# triton {triton.__version__}, target sm_{args.arch} (GPUTarget('cuda', {args.arch}, "
          f"32)), ptxas {_tool('ptxas')}", flush=True)
    print(HEADER, flush=True)
    reports = []
    for dtype in dtypes:
        for case in kernel_cases(dtype):
            if wanted is not None and case.name not in wanted:
                continue
            for config in case.tuned.configs:
                if not args.all and not case.allowed(config):
                    continue
                report = compile_one(case, config, dtype, args.arch)
                reports.append(report)
                print(format_row(report), flush=True)
    flagged = [r for r in reports if r.flags and not r.pruned]
    flagged_default = [r for r in flagged if not r.baseline]
    failed = [r for r in reports if r.error]
    pruned = sum(r.pruned for r in reports)
    print(f"# {len(reports)} configs compiled ({pruned} pruned ones among them); flagged among "
          f"those that run: {len(flagged_default)} of the default kernels, "
          f"{len(flagged) - len(flagged_default)} of the triton-atomic baseline; "
          f"{len(failed)} failed", flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["kernel", "dtype", "config", "num_warps", "regs", "spill_stores",
                             "spill_loads", "local_bytes", "smem_bytes", "blocks_per_sm",
                             "limiter", "seconds", "flags", "pruned", "error"])
            for r in reports:
                writer.writerow([r.kernel, r.dtype, r.config, r.num_warps, r.regs,
                                 r.spill_stores, r.spill_loads, r.local_bytes, r.smem_total,
                                 r.blocks_per_sm, r.limiter, f"{r.seconds:.2f}",
                                 ";".join(r.flags), int(r.pruned), r.error])
    return 2 if failed else (1 if flagged_default else 0)


if __name__ == "__main__":
    sys.exit(main())
