"""Plots of a results CSV: ``python -m benchmarks.plot_results [CSV] [--op OP] [--mode full]``.

One PNG per op next to the CSV (``<stem>_<op>_<mode>.png``): median time vs N on log-log axes,
one line per provider (newest measurement of each point), the GEMM baseline dashed.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks import common


def plot_all(csv_path: Path, ops=None, mode: str = "full") -> list:
    written = []
    for op in ops or common.ops_in(csv_path):
        png = common.plot_time_vs_size(csv_path, op, mode)
        if png is None:
            print(f"# plot {op}: no '{mode}' rows with status ok in {csv_path}")
        else:
            print(f"# plot {op}: {png}")
            written.append(png)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", type=Path, nargs="?", default=Path("benchmarks/results/infonce.csv"))
    p.add_argument("--op", action="append", help="op to plot (repeatable; default: every op)")
    p.add_argument("--mode", default="full", choices=["fwd", "bwd", "full"])
    args = p.parse_args(argv)
    if not args.csv.exists():
        p.error(f"{args.csv} does not exist; run a benchmark first")
    plot_all(args.csv, args.op, args.mode)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
