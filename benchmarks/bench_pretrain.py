"""Benchmark of dual-encoder pretraining: samples/s and peak memory, fused ops vs the reference.

    python -m benchmarks.bench_pretrain [--preset shapes] [--batches 64,256,512,1024]
        [--impls fused,reference] [--supcon] [--set SECTION.KEY=VALUE ...] [--steps N]
        [--budget S] [--long-step S]
        [--threads K] [--margin-mb M] [--timeout S] [--no-prepare] [--quick]
        [--out benchmarks/results/pretrain.csv]

Every point (implementation, batch) is a short ``python -m fastxmc.pretrain`` run of the preset
(CPU, ``--run.log_every=1``, no TensorBoard, quiet) in a child process and a temporary run
directory; its ``metrics.jsonl`` gives the time of every step (``step_time_s``) and the child's
peak resident memory so far (``peak_rss_mb``: ``ru_maxrss`` of the whole process, data pipeline
included). Implementations: ``fused`` = the default backend of every op, ``reference`` =
``FASTXMC_IMPL=reference`` (every fused op on its plain PyTorch oracle). The loss is the preset's:
the sentence InfoNCE and ``region_word_loss`` (``--supcon`` adds the label-guided terms and a
second caption branch).

Steps: the first step (data pipeline start, first touch of the memory) is a warm-up and not timed.
Without ``--steps``, a warm-up of ``--long-step`` seconds or more (default 120: the one-time costs,
about 3 s, are then negligible; on 2 cores only the fused batch 1024 takes that long) counts as
the first timed step, as in ``benchmarks.common.RepPolicy``. Timed steps: ``--steps N``, else as
many as fit ``--budget`` seconds (default 10), 2 to 10, never more than fit twice the budget (at
least one). The child is stopped (SIGKILL of its process group) once its
metrics hold the timed steps. samples/s = timed samples / their summed step time; the peak RSS is
the one logged with the last timed step. Before the points, one unmeasured step at the smallest
batch builds the data caches (``--no-prepare`` skips it), so that no measured child pays for them.

Memory guard: the reference ``region_word_loss`` materializes the (B, B, T, R) attention and the
(B, B, T, d) contexts (``fastxmc/reference/region_word.py``); one forward + backward of it peaked at
3.1-3.2 x B^2 T (R + d) x 4 bytes above the rest of the step (measured at B = 64-128, T = 24,
R = d = 256, fp32). Its estimate, that times :data:`REFERENCE_PAIR_FACTOR` per caption branch plus
the fused run's peak at the same batch (else :data:`BASE_MB`), must fit in ``MemAvailable``
(``/proc/meminfo``) minus ``--margin-mb``, else the point is skipped with the reason. A child that
dies of SIGKILL it was not sent (the OOM killer) is reported as "oom": it does not fit. After a
reference point that did not fit, the larger batches are skipped.

The table gives samples/s, peak RSS, the fused / reference ratios of samples/s and of peak RSS at
equal batch, the largest batch the reference fits next to the fused run at that batch, and the
verdict of the issue: "batch 1024 with both losses trains on a 24 GB CPU machine" (the fused run
at batch 1024 completes with a peak RSS <= 24 GiB).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from benchmarks import common
from fastxmc.ops.registry import IMPL_ENV
from fastxmc.pretrain.config import PRESETS, build_config, dual_encoder_config

DEFAULT_OUT = Path("benchmarks/results/pretrain.csv")
COLUMNS = ["timestamp", "run_id", "commit", "machine", "device", "torch", "python", "threads",
           "loadavg", "preset", "supcon", "impl", "batch", "tokens", "regions", "embed_dim",
           "warmup_s", "timed_steps", "median_step_ms", "samples_per_s", "peak_rss_mb",
           "estimate_mb", "available_mb", "speedup_vs_reference", "rss_vs_reference", "status",
           "note"]
IMPLS = ("fused", "reference")
DEFAULT_BATCHES = (64, 256, 512, 1024)
QUICK_BATCHES = (64, 256)
TARGET_BATCH = 1024                    # the issue: batch 1024 with both losses ...
TARGET_RSS_MB = 24 * 1024              # ... trains on a 24 GB CPU machine (MiB)
REFERENCE_PAIR_FACTOR = 3.2            # reference region-word peak / (B^2 T (R + d) x 4 bytes)
FLOAT_BYTES = 4                        # fp32 on CPU
BASE_MB = 2048                         # the rest of a step when no fused run measured it (MiB)
POLL_S = 0.5                           # how often a child's metrics are read


# ---------------------------------------------------------------- what one step computes
@dataclass(frozen=True)
class LossShapes:
    """The region-word loss inputs of one step: T tokens, R regions, d = embed_dim, and the
    caption branches (2 with ``--supcon``: the word loss runs on each)."""
    tokens: int
    regions: int
    embed_dim: int
    branches: int


def loss_shapes(preset: str, supcon: bool, overrides=()) -> LossShapes:
    """The shapes of ``preset`` with ``overrides`` ((key, text) pairs) and ``--supcon``."""
    cfg = build_config(preset, [*overrides, ("loss.supcon", str(supcon).lower())])
    model = dual_encoder_config(cfg, text_dim=1)
    return LossShapes(cfg.data.resolved_max_tokens(), model.region_size ** 2, model.embed_dim,
                      2 if supcon else 1)


def reference_estimate_mb(batch: int, shapes: LossShapes, base_mb: float) -> float:
    """Estimated peak RSS (MiB) of a reference step: ``base_mb`` (the rest of the step) plus the
    materialized region-word tensors, REFERENCE_PAIR_FACTOR x B^2 T (R + d) floats per branch."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    pair_floats = batch * batch * shapes.tokens * (shapes.regions + shapes.embed_dim)
    extra = REFERENCE_PAIR_FACTOR * shapes.branches * pair_floats * FLOAT_BYTES
    return base_mb + extra / common.MB


def available_memory_mb() -> float:
    """MemAvailable of this machine now (MiB)."""
    return common.available_memory_bytes(torch.device("cpu")) / common.MB


def skip_reason(estimate_mb: float, available_mb: float, margin_mb: float) -> Optional[str]:
    """Why a run estimated at ``estimate_mb`` must not start (None: it fits)."""
    room = available_mb - margin_mb
    if estimate_mb <= room:
        return None
    return (f"estimated peak {estimate_mb:.0f} MB > available {available_mb:.0f} MB - margin "
            f"{margin_mb:.0f} MB")


# ---------------------------------------------------------------- one child run
def child_command(args, batch: int, steps: int, run_dir: Path) -> list:
    """The ``python -m fastxmc.pretrain`` command line of one point (``args``: the parsed
    options: preset, overrides, threads, supcon)."""
    cmd = [sys.executable, "-m", "fastxmc.pretrain", "--preset", args.preset,
           *(f"--{key}={text}" for key, text in args.overrides), "--out", str(run_dir),
           "--steps", str(steps), "--batch-size", str(batch), "--quiet", "--run.tensorboard=false",
           "--run.log_every=1", "--run.checkpoint_every=0", "--run.device=cpu"]
    if args.threads:
        cmd.append(f"--run.threads={args.threads}")
    if args.supcon:
        cmd.append("--supcon")
    return cmd


def child_env(impl: str) -> dict:
    """The environment of a child: ``FASTXMC_IMPL=reference`` for the reference, none for fused;
    the repository importable."""
    env = {k: v for k, v in os.environ.items() if k != IMPL_ENV}
    if impl == "reference":
        env[IMPL_ENV] = "reference"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(common.REPO_ROOT),
                                                      env.get("PYTHONPATH")]))
    return env


def read_step_rows(metrics: Path) -> list:
    """The complete records of a (possibly still written) metrics.jsonl."""
    try:
        text = metrics.read_text()
    except FileNotFoundError:
        return []
    lines = text.split("\n")[:-1]  # the last piece is empty or a line still being written
    return [json.loads(line) for line in lines if line.strip()]


@dataclass
class StepPlan:
    """Which logged steps are timed: ``fixed`` timed steps after the warm-up, else the policy's
    count (from the warm-up step's time), the warm-up counting when it was long."""
    policy: common.RepPolicy
    fixed: Optional[int] = None

    def child_steps(self) -> int:
        return 1 + (self.fixed or self.policy.max_reps)

    def timed(self, rows: list) -> Optional[list]:
        """The timed rows once ``rows`` hold them all, else None."""
        if not rows:
            return None
        if self.fixed:
            need, candidates = self.fixed, rows[1:]
        else:
            warm = rows[0]["step_time_s"]
            need = self.policy.timed_calls(warm)
            candidates = rows if self.policy.warmup_counts(warm) else rows[1:]
        return candidates[:need] if len(candidates) >= need else None


@dataclass
class ChildOutcome:
    rows: list                  # every metrics record read
    timed: Optional[list]       # the timed ones (None: the child ended before them)
    returncode: Optional[int]   # None when this program stopped it
    ended: str                  # "measured", "exited" or "timeout"
    stderr_tail: str = ""


def _stop(proc: subprocess.Popen) -> None:
    """SIGKILL the child's process group (its own session: the child and its data workers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def watch_child(cmd: list, env: dict, run_dir: Path, plan: StepPlan,
                timeout_s: float) -> ChildOutcome:
    """Run ``cmd`` until its metrics hold the timed steps (then stop it), it exits, or
    ``timeout_s`` passes."""
    metrics, log = run_dir / "metrics.jsonl", run_dir.with_suffix(".stderr")
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=common.REPO_ROOT, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                exited = proc.poll() is not None
                rows = read_step_rows(metrics)
                timed = plan.timed(rows)
                if timed is not None or exited or time.monotonic() > deadline:
                    break
                time.sleep(POLL_S)
        finally:
            if proc.poll() is None:
                _stop(proc)
    ended = "measured" if timed is not None else "exited" if exited else "timeout"
    code = proc.returncode if exited else None
    return ChildOutcome(rows, timed, code, ended, _tail(log))


def _tail(path: Path, lines: int = 3) -> str:
    text = path.read_text(errors="replace").strip().splitlines()
    return " | ".join(text[-lines:])[-400:]


# ---------------------------------------------------------------- one point
@dataclass
class Point:
    """One (implementation, batch) of the sweep, as printed and written."""
    impl: str
    batch: int
    status: str                 # ok, skipped, oom, timeout, error
    note: str = ""
    warmup_s: Optional[float] = None
    timed_steps: Optional[int] = None
    median_step_ms: Optional[float] = None
    samples_per_s: Optional[float] = None
    peak_rss_mb: Optional[float] = None
    estimate_mb: Optional[float] = None
    available_mb: Optional[float] = None
    speedup_vs_reference: Optional[float] = None
    rss_vs_reference: Optional[float] = None

    def __post_init__(self):
        # When it was measured, and how loaded the machine was then.
        self.timestamp, self.loadavg = common.timestamp(), common.load_average()

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def point_from_outcome(impl: str, batch: int, out: ChildOutcome, timeout_s: float) -> Point:
    """The measured point, or why there is none."""
    if out.timed is not None:
        seconds = [r["step_time_s"] for r in out.timed]
        note = "warm-up step timed (long step)" if out.timed[0] is out.rows[0] else ""
        return Point(impl, batch, "ok", note, warmup_s=out.rows[0]["step_time_s"],
                     timed_steps=len(seconds), median_step_ms=statistics.median(seconds) * 1e3,
                     samples_per_s=batch * len(seconds) / sum(seconds),
                     peak_rss_mb=out.timed[-1]["peak_rss_mb"])
    done = f"after {len(out.rows)} logged step(s)"
    if out.ended == "timeout":
        return Point(impl, batch, "timeout", f"no result within {timeout_s:.0f} s ({done})")
    if out.returncode == -signal.SIGKILL:
        return Point(impl, batch, "oom",
                     f"killed by a SIGKILL this benchmark did not send (the OOM killer): does not "
                     f"fit ({done})")
    return Point(impl, batch, "error", f"exit code {out.returncode} {done}: {out.stderr_tail}")


def measure_point(impl: str, batch: int, args, workdir: Path) -> Point:
    """One child run of ``impl`` at ``batch`` in a fresh directory under ``workdir``."""
    run_dir = workdir / f"{impl}-{batch}"
    cmd = child_command(args, batch, args.plan.child_steps(), run_dir)
    out = watch_child(cmd, child_env(impl), run_dir, args.plan, args.timeout)
    return point_from_outcome(impl, batch, out, args.timeout)


def prepare_caches(args, workdir: Path) -> None:
    """One unmeasured step at the smallest batch: builds the dataset and caption caches."""
    run_dir = workdir / "prepare"
    cmd = child_command(args, min(args.batches), 1, run_dir)
    # A plan wanting a timed step after the only one: the child runs to its end.
    out = watch_child(cmd, child_env("fused"), run_dir, StepPlan(args.plan.policy, fixed=1),
                      args.timeout)
    if out.returncode != 0:
        why = f"no end within {args.timeout:.0f} s" if out.ended == "timeout" \
            else f"exit code {out.returncode}"
        raise RuntimeError(f"the data-cache run failed ({why}): {out.stderr_tail}")


# ---------------------------------------------------------------- the sweep
def reference_gate(batch: int, shapes: LossShapes, fused: Optional[Point], args,
                   blocked: Optional[str]) -> tuple:
    """(estimate MiB, available MiB, reason to skip or None) of the reference at ``batch``."""
    base = fused.peak_rss_mb if fused is not None and fused.ok else BASE_MB
    estimate = reference_estimate_mb(batch, shapes, base)
    available = available_memory_mb()
    return estimate, available, blocked or skip_reason(estimate, available, args.margin_mb)


def run_batch(batch: int, args, shapes: LossShapes, workdir: Path, blocked: Optional[str]) -> list:
    """The points of one batch: fused first (its peak is the base of the reference estimate)."""
    points, fused = [], None
    for impl in sorted(args.impls, key=IMPLS.index):
        if impl == "fused":
            point = fused = measure_point(impl, batch, args, workdir)
        else:
            estimate, available, why = reference_gate(batch, shapes, fused, args, blocked)
            point = (Point(impl, batch, "skipped", why) if why
                     else measure_point(impl, batch, args, workdir))
            point.estimate_mb, point.available_mb = estimate, available
        print_point(point)
        points.append(point)
    add_ratios(points)
    return points


def add_ratios(points: list) -> None:
    """fused / reference samples/s and peak RSS, on the fused point, when both were measured."""
    by_impl = {p.impl: p for p in points}
    fused, ref = by_impl.get("fused"), by_impl.get("reference")
    if fused is None or ref is None or not (fused.ok and ref.ok):
        return
    fused.speedup_vs_reference = fused.samples_per_s / ref.samples_per_s
    fused.rss_vs_reference = fused.peak_rss_mb / ref.peak_rss_mb


def run_all(args, shapes: LossShapes) -> list:
    points, blocked = [], None
    with tempfile.TemporaryDirectory(prefix="bench_pretrain-") as tmp:
        workdir = Path(tmp)
        if args.prepare:
            prepare_caches(args, workdir)
        for batch in sorted(args.batches):
            new = run_batch(batch, args, shapes, workdir, blocked)
            if any(p.impl == "reference" and p.status in ("skipped", "oom") for p in new):
                blocked = blocked or f"the reference did not fit at batch {batch}"
            points += new
    return points


# ---------------------------------------------------------------- output
def csv_rows(points: list, args, shapes: LossShapes, meta: dict) -> list:
    case = dict(preset=args.preset, supcon=args.supcon, tokens=shapes.tokens,
                regions=shapes.regions, embed_dim=shapes.embed_dim)
    rows = []
    for p in points:
        rows.append(dict(meta, **case, **vars(p)))
    return rows


def _cell(value, fmt: str) -> str:
    """``value`` in ``fmt``, or "-" right-aligned in the same width when it is None."""
    if value is not None:
        return format(value, fmt)
    width = fmt.split(".")[0].rstrip("d")
    return format("-", f">{width}")


HEADER = (f"{'impl':<10} {'batch':>6} {'samples/s':>10} {'step ms':>10} {'steps':>5} "
          f"{'peak RSS MB':>11} {'est. MB':>8} {'fused/ref samples/s':>19} {'fused/ref RSS':>13}"
          f"  status")


def print_point(p: Point) -> None:
    print(f"{p.impl:<10} {p.batch:>6} {_cell(p.samples_per_s, '10.2f')} "
          f"{_cell(p.median_step_ms, '10.0f')} {_cell(p.timed_steps, '5d')} "
          f"{_cell(p.peak_rss_mb, '11.0f')} {_cell(p.estimate_mb, '8.0f')} "
          f"{_cell(p.speedup_vs_reference, '19.2f')} {_cell(p.rss_vs_reference, '13.2f')}  "
          f"{p.status}{'  ' + p.note if p.note else ''}", flush=True)


def print_table(points: list) -> None:
    print(HEADER)
    for p in sorted(points, key=lambda p: (p.batch, IMPLS.index(p.impl))):
        print_point(p)


def largest_reference_summary(points: list) -> None:
    """The reference at the largest batch it fits, beside the fused run at that batch and at the
    largest batch the fused run measured."""
    refs = [p for p in points if p.impl == "reference" and p.ok]
    if not refs:
        print("reference: no batch fitted or none was run", flush=True)
        return
    ref = max(refs, key=lambda p: p.batch)
    fused = {p.batch: p for p in points if p.impl == "fused" and p.ok}
    line = (f"reference at its largest batch here ({ref.batch}): {ref.samples_per_s:.2f} "
            f"samples/s, peak {ref.peak_rss_mb:.0f} MB")
    if ref.batch in fused:
        same = fused[ref.batch]
        line += (f"; fused at {ref.batch}: {same.samples_per_s:.2f} samples/s "
                 f"({same.samples_per_s / ref.samples_per_s:.2f}x), peak {same.peak_rss_mb:.0f} MB "
                 f"({same.peak_rss_mb / ref.peak_rss_mb:.2f}x)")
    if fused and max(fused) > ref.batch:
        big = fused[max(fused)]
        line += (f"; fused at {big.batch}: {big.samples_per_s:.2f} samples/s, "
                 f"peak {big.peak_rss_mb:.0f} MB")
    print(line, flush=True)


def target_verdict(points: list) -> Optional[bool]:
    """Whether the fused run at TARGET_BATCH fits in TARGET_RSS_MB (None: not run)."""
    target = [p for p in points if p.impl == "fused" and p.batch == TARGET_BATCH]
    if not target:
        print(f"verdict batch {TARGET_BATCH} fused fits in 24 GB: not run (add {TARGET_BATCH} "
              f"to --batches)", flush=True)
        return None
    p = target[0]
    ok = p.ok and p.peak_rss_mb <= TARGET_RSS_MB
    detail = (f"peak RSS {p.peak_rss_mb:.0f} MiB <= {TARGET_RSS_MB} MiB" if p.ok
              else f"{p.status}: {p.note}")
    print(f"verdict batch {TARGET_BATCH} fused fits in 24 GB: {detail}  "
          f"{'PASS' if ok else 'FAIL'}", flush=True)
    return ok


# ---------------------------------------------------------------- command line
def _int_list(text: str) -> list:
    return [int(v) for v in text.split(",") if v.strip()]


def _str_list(text: str) -> list:
    return [v.strip() for v in text.split(",") if v.strip()]


def _override(text: str) -> tuple:
    key, sep, value = text.partition("=")
    if not sep or "." not in key:
        raise argparse.ArgumentTypeError(f"expected SECTION.KEY=VALUE, got {text!r}")
    return key.strip(), value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="shapes", help=f"pretrain preset, one of {list(PRESETS)}")
    p.add_argument("--batches", type=_int_list, default=None,
                   help="comma list of batch sizes (default 64,256,512,1024; --quick: 64,256)")
    p.add_argument("--impls", type=_str_list, default=list(IMPLS),
                   help="comma list of fused,reference (default both)")
    p.add_argument("--supcon", action="store_true", help="add the label-guided terms (--supcon)")
    p.add_argument("--set", dest="overrides", type=_override, action="append", default=[],
                   metavar="SECTION.KEY=VALUE",
                   help="a pretrain config override for every run, e.g. data.path=/data/coco "
                        "(repeatable)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per point after the warm-up (default: as many as fit "
                        "--budget, 2..10; --quick 1..3)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed steps per point (default 10; --quick 3)")
    p.add_argument("--long-step", type=float, default=120.0,
                   help="a warm-up step this long (s) counts as timed, without --steps "
                        "(default 120; inf: never)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the children (default: the preset's run.threads, else "
                        "torch's default)")
    p.add_argument("--margin-mb", type=float, default=2048.0,
                   help="memory kept free when deciding whether the reference fits (default 2048)")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds before a point's child is stopped (default 1800)")
    p.add_argument("--no-prepare", dest="prepare", action="store_false",
                   help="skip the unmeasured data-cache run before the points")
    p.add_argument("--quick", action="store_true", help="batches 64,256, a 3 s budget per point")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"CSV (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    _validate(p, args)
    args.batches = args.batches or list(QUICK_BATCHES if args.quick else DEFAULT_BATCHES)
    budget = args.budget or (3.0 if args.quick else 10.0)
    policy = common.RepPolicy(warmup=1, min_reps=1 if args.quick else 2,
                              max_reps=3 if args.quick else 10, budget_s=budget,
                              max_s=2 * budget, long_call_s=args.long_step)
    args.plan = StepPlan(policy, fixed=args.steps)
    return args


def _validate(p: argparse.ArgumentParser, args) -> None:
    if args.preset not in PRESETS:
        p.error(f"--preset: unknown {args.preset!r}; choose from {list(PRESETS)}")
    bad = [i for i in args.impls if i not in IMPLS]
    if bad or not args.impls:
        p.error(f"--impls: unknown or empty {bad or args.impls}; choose from {list(IMPLS)}")
    if args.batches is not None and (not args.batches or min(args.batches) < 1):
        p.error(f"--batches must be positive ints, got {args.batches}")
    for name in ("steps", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be >= 1, got {value}")
    for name in ("budget", "timeout", "long_step"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if args.margin_mb < 0:
        p.error(f"--margin-mb must be >= 0, got {args.margin_mb}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        shapes = loss_shapes(args.preset, args.supcon, args.overrides)
    except ValueError as err:
        print(f"bench_pretrain: error: {err}", file=sys.stderr)
        return 2
    meta = common.run_metadata(torch.device("cpu"))
    preset_threads = build_config(args.preset, args.overrides).run.threads
    meta["threads"] = args.threads or preset_threads or meta["threads"]
    print(f"# pretrain: preset {args.preset}{' +supcon' if args.supcon else ''}, batches "
          f"{args.batches}, impls {args.impls}, T={shapes.tokens} R={shapes.regions} "
          f"d={shapes.embed_dim}, {meta['machine']}, torch {meta['torch']}, {meta['threads']} "
          f"threads, commit {meta['commit']}, load average {common.load_average()}, "
          f"MemAvailable {available_memory_mb():.0f} MB; results -> {args.out}", flush=True)
    print(HEADER, flush=True)
    try:
        points = run_all(args, shapes)
    except RuntimeError as err:
        print(f"bench_pretrain: error: {err}", file=sys.stderr)
        return 1
    common.append_rows(args.out, csv_rows(points, args, shapes, meta), COLUMNS)
    print(f"\n# summary (load average at the end {common.load_average()})")
    print_table(points)
    largest_reference_summary(points)
    target_verdict(points)
    return 0


if __name__ == "__main__":
    sys.exit(main())
