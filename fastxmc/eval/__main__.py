"""``python -m fastxmc.eval --run DIR``: FID/KID (dual encoder or InceptionV3), IS, R-precision,
precision / recall / density / coverage, the per-caption spread across noise and, on the shapes
dataset, attribute accuracy of a trained run; see :mod:`fastxmc.eval.run`."""
from __future__ import annotations

import argparse
import sys

from fastxmc.atomic import FileWriteError

from fastxmc.eval.run import EvalOptions, evaluate


def parse_args(argv) -> EvalOptions:
    parser = argparse.ArgumentParser(prog="python -m fastxmc.eval",
                                     description="Evaluate a python -m fastxmc.train run; writes "
                                                 "DIR/eval/metrics.json and DIR/eval/report.md.")
    parser.add_argument("--run", required=True, help="run directory (python -m fastxmc.train --out)")
    parser.add_argument("--dual", default=None,
                        help="pretrained dual encoder: a python -m fastxmc.pretrain run dir or its "
                             "dual_encoder.pt (R-precision, fid_dual)")
    parser.add_argument("--inception", default=None,
                        help="local InceptionV3 weights file (fid_inception, kid_inception, IS)")
    parser.add_argument("--n", type=int, default=2048, help="generated images (default 2048)")
    parser.add_argument("--n-real", type=int, default=0,
                        help="real validation images for FID/KID (default 0: all of them)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="auto, cpu or cuda (default cpu)")
    parser.add_argument("--checkpoint", default=None, help="a checkpoint file (default: the latest)")
    parser.add_argument("--probe-n", type=int, default=256,
                        help="shapes runs: single-object validation images of the D probe (default "
                             "256; 0: no probe)")
    parser.add_argument("--spread-n", type=int, default=32,
                        help="captions of the per-caption spread of G_ema across noise (default 32; "
                             "0: no spread); costs spread-n x spread-z generated images and at most "
                             "as many real ones")
    parser.add_argument("--spread-z", type=int, default=16,
                        help="noise vectors per caption of the spread, and real images per group "
                             "(default 16)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    return EvalOptions(run_dir=args.run, dual=args.dual, inception=args.inception, num_samples=args.n,
                       num_real=args.n_real, batch_size=args.batch_size, seed=args.seed,
                       device=args.device, checkpoint=args.checkpoint, probe_samples=args.probe_n,
                       spread_captions=args.spread_n, spread_z=args.spread_z,
                       progress=not args.quiet)


def main(argv=None) -> int:
    try:
        opts = parse_args(sys.argv[1:] if argv is None else argv)
        metrics = evaluate(opts)
    except FileWriteError as err:
        print(f"fastxmc.eval: error: {err}", file=sys.stderr)
        return 3
    except (FileNotFoundError, ValueError) as err:
        print(f"fastxmc.eval: error: {err}", file=sys.stderr)
        return 2
    shown = {k: v for k, v in metrics.items() if k.startswith(("fid_", "r_precision"))}
    print(f"wrote {opts.run_dir}/eval/metrics.json and report.md: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
