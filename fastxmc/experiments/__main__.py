"""``python -m fastxmc.experiments ablation``: see :mod:`fastxmc.experiments.ablation`."""
from __future__ import annotations

import argparse
import sys

from fastxmc.experiments.ablation import VARIANTS, AblationOptions, run_ablation


def parse_override(text: str) -> tuple:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected SECTION.KEY=VALUE, got {text!r}")
    return key.lstrip("-"), value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastxmc.experiments")
    sub = p.add_subparsers(dest="experiment", required=True)
    a = sub.add_parser("ablation", help="XMC-GAN's contrastive-loss ablation on the shapes dataset",
                       description="Pretrain the evaluator, train every variant with the same seed "
                                   "and steps, evaluate them, write the report.")
    a.add_argument("--out", default="runs/ablation", help="run directories (default runs/ablation)")
    a.add_argument("--report", default="benchmarks/results/ablation_shapes.md",
                   help="the markdown report; its figures are written next to it")
    a.add_argument("--preset", default="shapes", help="train preset (default shapes)")
    a.add_argument("--steps", type=int, default=None, help="G steps per variant (default: the preset's)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--jobs", type=int, default=2, help="runs at once (default 2)")
    a.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    a.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)}")
    a.add_argument("--set", dest="overrides", action="append", default=[], type=parse_override,
                   metavar="SECTION.KEY=VALUE", help="a train override for every variant (repeatable)")
    a.add_argument("--dual-steps", type=int, default=None,
                   help="pretraining steps of the evaluator (default: the pretrain preset's)")
    a.add_argument("--eval-samples", type=int, default=2048, help="generated images per variant")
    a.add_argument("--quiet", action="store_true", help="no status lines")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        opts = AblationOptions(out=args.out, report=args.report, preset=args.preset, steps=args.steps,
                               seed=args.seed, jobs=args.jobs, threads=args.threads,
                               variants=tuple(v for v in args.variants.split(",") if v),
                               overrides=tuple(args.overrides), dual_steps=args.dual_steps,
                               eval_samples=args.eval_samples, progress=not args.quiet)
        report = run_ablation(opts)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as err:
        print(f"fastxmc.experiments: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
