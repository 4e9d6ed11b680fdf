"""The InfoNCE Triton kernels on a GPU, in one short run: the default ``triton`` kernels (2-D grids,
deterministic two-launch backward) against ``triton-atomic`` (1-D grid, atomic grad_b) and the
``cuda`` fallback, with the GEMM and materialized baselines of the same run, then the grid splits
of each size and the config each autotuner chose per key (D, size buckets of N and M, dtypes).

    python -m benchmarks.infonce_gpu_grid [--bf16-sizes 4096,16384,65536] [--fp32-sizes 4096,16384]
        [--dim 768] [--modes fwd,bwd] [--out benchmarks/results/infonce_grid.csv]

Each (size, provider, mode) is timed for about a second, at most five (``bench_infonce``'s rep
policy with a small budget), so the whole run, autotuning included, fits a lease of a few
minutes; ``benchmarks/gpu_check.sh infonce`` runs it after the GPU tests.
"""
from __future__ import annotations

import argparse
import sys

import torch

from benchmarks import bench_infonce
from benchmarks.sweep import csv_list

PROVIDERS = "materialized,fastxmc-triton,fastxmc-triton-atomic,fastxmc-cuda"
# bench_infonce's flags for a short run: about a second of timed calls per case, five at most.
SHORT_RUN = ["--budget", "1", "--max-seconds", "5", "--reps", "10", "--min-reps", "2"]


def print_splits(sizes: list, dim: int) -> None:
    """The splits the default kernels' launches take at N = M = size on this GPU."""
    from fastxmc.ops.triton import infonce as default

    device = torch.device("cuda")
    target = default.target_programs(device)
    block_m, block_n, _ = default._geometry()
    print(f"# grid: target {target} programs ({default.PROGRAMS_PER_SM} per SM), splits of "
          f"{block_n}-column granules, counted at BLOCK_M = {block_m}", flush=True)
    for n in sizes:
        fwd = default.split_extent(n, n, target, block_m, block_n)
        bwd = default.split_extent(n, n, target, block_m, block_n,
                                   max(1, default.PARTIAL_BUDGET_BYTES // (4 * n * dim)))
        print(f"#   N = M = {n}: forward {fwd[1]} splits of {fwd[0]} columns, each backward "
              f"launch {bwd[1]} of {bwd[0]}", flush=True)


def print_tuned() -> None:
    """Every autotuner's chosen config per key (the keys it met in this run)."""
    from fastxmc.ops.triton import infonce as default
    from fastxmc.ops.triton import infonce_atomic as atomic

    tuners = [("triton fwd", default._fwd_tuned), ("triton bwd grad_a", default._bwd_rows_tuned),
              ("triton bwd grad_b", default._bwd_cols_tuned),
              ("triton-atomic fwd", atomic._fwd_tuned), ("triton-atomic bwd", atomic._bwd_tuned)]
    print("# autotuned configs (key: D [, N bucket, M bucket], dtypes):", flush=True)
    for name, tuner in tuners:
        for key, config in tuner.cache.items():
            print(f"#   {name:<18} {key}: {config.kwargs} warps={config.num_warps} "
                  f"stages={config.num_stages}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bf16-sizes", type=lambda s: csv_list(s, int), default=[4096, 16384, 65536])
    p.add_argument("--fp32-sizes", type=lambda s: csv_list(s, int), default=[4096, 16384])
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--modes", default="fwd,bwd")
    p.add_argument("--out", default="benchmarks/results/infonce_grid.csv")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("infonce_gpu_grid: needs a CUDA GPU", file=sys.stderr)
        return 2
    status = 0
    for dtype, sizes in (("bf16", args.bf16_sizes), ("fp32", args.fp32_sizes)):
        if not sizes:
            continue
        print_splits(sizes, args.dim)
        status |= bench_infonce.main(
            ["--device", "cuda", "--dtype", dtype, "--dim", str(args.dim), "--sizes",
             ",".join(map(str, sizes)), "--modes", args.modes, "--providers", PROVIDERS,
             "--out", args.out, *SHORT_RUN])
    print_tuned()
    return status


if __name__ == "__main__":
    sys.exit(main())
