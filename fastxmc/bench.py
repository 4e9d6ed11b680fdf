"""``fastxmc-bench NAME [options]``: run one of the kernel or training-step benchmarks.

The benchmark programs live in the source tree's ``benchmarks/`` folder (they compare against
peers that the package itself does not depend on), so this command runs them from a checkout:
the current directory or ``FASTXMC_SOURCE``. ``fastxmc-bench NAME --help`` shows a benchmark's
own options; ``python -m benchmarks.bench_NAME`` is the same program.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

BENCHMARKS = {"infonce": "bench_infonce", "region-word": "bench_region_word",
              "modulation": "bench_modulation", "word-attention": "bench_word_attention",
              "train-step": "bench_train_step", "pretrain": "bench_pretrain"}
SOURCE_ENV = "FASTXMC_SOURCE"


def usage() -> str:
    names = ", ".join(BENCHMARKS)
    return (f"usage: fastxmc-bench NAME [options]   (NAME: {names})\n"
            "Runs benchmarks/bench_<name>.py of a fastxmc checkout (the current directory or "
            f"${SOURCE_ENV}); results are appended under benchmarks/results/.")


def source_tree() -> Path | None:
    for candidate in (os.environ.get(SOURCE_ENV), os.getcwd()):
        if candidate and (Path(candidate) / "benchmarks" / "common.py").is_file():
            return Path(candidate).resolve()
    return None


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in BENCHMARKS:
        print(f"fastxmc-bench: error: unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}",
              file=sys.stderr)
        return 2
    root = source_tree()
    if root is None:
        print(f"fastxmc-bench: error: no benchmarks/ folder here or in ${SOURCE_ENV}: the benchmarks "
              "ship with the source tree; run this from a fastxmc checkout", file=sys.stderr)
        return 2
    sys.path.insert(0, str(root))
    module = importlib.import_module(f"benchmarks.{BENCHMARKS[name]}")
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
