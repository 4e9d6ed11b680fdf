"""XMC-GAN's contrastive-loss ablation on the embedded shapes dataset (the paper's Table 4, small).

    python -m fastxmc.experiments ablation [--steps N] [--jobs J] [--out runs/ablation]

1. **Evaluator.** Pretrains the dual encoder (``python -m fastxmc.pretrain``) on the same data as the
   GAN runs, once, in ``OUT/dual``: it gives R-precision and FID_dual.
2. **Variants.** Trains every variant of :data:`VARIANTS` with ``python -m fastxmc.train``: the same
   preset, seed and number of steps, only the loss terms differ. ``--jobs`` runs go at once, each on
   ``--threads`` torch threads (small networks use 2 cores better as 2 one-thread runs than as one
   two-thread run). A run already in ``OUT/<variant>`` is resumed, a finished one is kept.
3. **Evaluation.** ``python -m fastxmc.eval`` on each run's final G_ema (FID/KID in the dual
   encoder's feature space, R-precision, attribute accuracy).
4. **Report.** ``--report`` (default ``benchmarks/results/ablation_shapes.md``): the settings, a table
   per variant, the verdict of the target (full XMC-GAN beats the no-contrastive baseline on
   R-precision, attribute accuracy and FID), a sample figure (``<report stem>.png``: every variant on
   the same captions and noise) and the loss curves (``<report stem>_losses.png``).

Every step is a subprocess whose output goes to ``OUT/logs/``; a failed step names its log.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fastxmc.atomic import atomic_write_text
from fastxmc.models.dual_encoder import DUAL_ENCODER_FILE
from fastxmc.pretrain.config import preset_config as pretrain_preset
from fastxmc.train.checkpoint import latest_checkpoint
from fastxmc.train.config import build_config

# name -> (what it trains with, the train overrides that make it)
VARIANTS = {
    "none": ("hinge loss only (no contrastive term)",
             {"loss.sentence_weight": "0", "loss.word_weight": "0", "loss.image_weight": "0"}),
    "sentence": ("+ sentence-image contrastive",
                 {"loss.word_weight": "0", "loss.image_weight": "0"}),
    "sentence+word": ("+ region-word contrastive", {"loss.image_weight": "0"}),
    "full": ("+ image-image contrastive (XMC-GAN)", {}),
    "full+supcon": ("+ label-guided SupCon (two captions per image)", {"loss.supcon": "true"}),
}
BASELINE, FULL = "none", "full"
# Applied to every variant before --set: the paper's table varies the contrastive terms alone, and
# the shapes preset's auxiliary class head is label supervision outside it, so every
# variant leaves it out (--set loss.class_weight=10 puts it back in all of them).
COMMON_OVERRIDES = {"loss.class_weight": "0"}
ATTRIBUTES = ("shape", "color", "size", "position")
FIGURE_CAPTIONS = (
    "a large red circle at the top left",
    "a large blue square in the center",
    "a large green triangle at the bottom right",
    "a large yellow star at the top",
    "a large purple diamond on the left",
    "a large orange cross at the bottom",
    "a large cyan circle at the right",
    "a large pink square at the bottom left",
)


@dataclass(frozen=True)
class AblationOptions:
    out: str = "runs/ablation"
    report: str = "benchmarks/results/ablation_shapes.md"
    preset: str = "shapes"
    steps: int | None = None            # None: the preset's run.steps
    seed: int = 0
    jobs: int = 2                       # runs at once
    threads: int = 1                    # torch threads per run
    variants: tuple = tuple(VARIANTS)
    overrides: tuple = ()               # (key, value) applied to every variant
    dual_steps: int | None = None       # None: the pretrain preset's run.steps
    eval_samples: int = 2048
    progress: bool = True

    def __post_init__(self):
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ValueError(f"--variants must name some of {list(VARIANTS)}, got {list(self.variants)}")
        for name in ("jobs", "threads", "eval_samples", "steps", "dual_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"--{name.replace('_', '-')} must be a positive int, got {value!r}")


# ---------------------------------------------------------------- configs and commands
def train_config(opts: AblationOptions, variant: str):
    """The resolved train config of ``variant`` (validates every override up front)."""
    overrides = [*variant_overrides(opts, variant), ("run.seed", str(opts.seed))]
    if opts.steps is not None:
        overrides.append(("run.steps", str(opts.steps)))
    return build_config(opts.preset, overrides)


def variant_overrides(opts: AblationOptions, variant: str) -> list:
    """The train overrides of ``variant``: :data:`COMMON_OVERRIDES`, then ``--set``, then the variant's."""
    return [*COMMON_OVERRIDES.items(), *opts.overrides, *VARIANTS[variant][1].items()]


def run_dir(opts: AblationOptions, name: str) -> Path:
    return Path(opts.out) / name


def train_command(opts: AblationOptions, variant: str) -> list:
    cfg = train_config(opts, variant)
    args = [sys.executable, "-m", "fastxmc.train", "--preset", opts.preset,
            "--out", str(run_dir(opts, variant)), "--steps", str(cfg.run.steps), "--seed", str(opts.seed),
            f"--run.threads={opts.threads}", "--run.quiet=true"]
    args += [f"--{k}={v}" for k, v in variant_overrides(opts, variant)]
    if latest_checkpoint(run_dir(opts, variant)) is not None:
        args.append("--resume")
    return args


# How the GAN runs sample their batches, not which data they see: the evaluator keeps its own.
SAMPLING_FIELDS = ("label_groups", "group_by")


def data_overrides_for_pretrain(opts: AblationOptions) -> list:
    """``--data.*`` overrides that give the evaluator exactly the GAN runs' data."""
    train_data = train_config(opts, FULL).data
    pretrain_data = pretrain_preset(opts.preset).data
    return [(f"data.{f.name}", _text(getattr(train_data, f.name)))
            for f in dataclasses.fields(train_data)
            if f.name not in SAMPLING_FIELDS
            and getattr(train_data, f.name) != getattr(pretrain_data, f.name)]


def _text(value) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return "none" if value is None else str(value)


def pretrain_command(opts: AblationOptions) -> list:
    out = run_dir(opts, "dual")
    args = [sys.executable, "-m", "fastxmc.pretrain", "--preset", opts.preset, "--out", str(out),
            "--seed", str(opts.seed), f"--run.threads={opts.threads * opts.jobs}", "--run.quiet=true"]
    if opts.dual_steps is not None:
        args += ["--steps", str(opts.dual_steps)]
    args += [f"--{k}={v}" for k, v in data_overrides_for_pretrain(opts)]
    if latest_checkpoint(out) is not None:
        args.append("--resume")
    return args


def eval_command(opts: AblationOptions, variant: str) -> list:
    return [sys.executable, "-m", "fastxmc.eval", "--run", str(run_dir(opts, variant)),
            "--dual", str(run_dir(opts, "dual")), "--n", str(opts.eval_samples),
            "--seed", str(opts.seed), "--quiet"]


# ---------------------------------------------------------------- running subprocesses
@dataclass
class Job:
    name: str
    args: list
    log: Path
    threads: int
    progress_file: Path | None = None   # a metrics.jsonl whose last step is shown
    total_steps: int = 0
    process: subprocess.Popen | None = None
    started: float = 0.0
    seconds: float = 0.0


def _environment(threads: int) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def _start(job: Job) -> None:
    job.log.parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "a") as log:
        log.write(f"\n$ {' '.join(job.args)}\n")
        log.flush()
        job.process = subprocess.Popen(job.args, stdout=log, stderr=subprocess.STDOUT,
                                       env=_environment(job.threads))
    job.started = time.monotonic()


def _last_step(path: Path | None) -> int:
    if path is None or not path.is_file():
        return 0
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
        lines = f.read().decode(errors="replace").strip().splitlines()
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return 0


def _status(jobs: list) -> str:
    parts = []
    for job in jobs:
        if job.progress_file is not None and job.total_steps:
            parts.append(f"{job.name} {_last_step(job.progress_file)}/{job.total_steps}")
        else:
            parts.append(f"{job.name} {time.monotonic() - job.started:.0f}s")
    return ", ".join(parts)


def _failure(job: Job) -> RuntimeError:
    tail = job.log.read_text(errors="replace").strip().splitlines()[-15:]
    return RuntimeError(f"{job.name} failed (exit {job.process.returncode}); log {job.log}:\n"
                        + "\n".join(tail))


def run_jobs(jobs: list, parallel: int, progress: bool, every: float = 60.0) -> None:
    """Run ``jobs`` with at most ``parallel`` at once; a status line every ``every`` seconds.
    Stops everything and raises when one fails."""
    waiting, running = list(jobs), []
    last_print = time.monotonic()
    try:
        while waiting or running:
            while waiting and len(running) < parallel:
                job = waiting.pop(0)
                _start(job)
                running.append(job)
                _say(progress, f"started {job.name} (log {job.log})")
            time.sleep(1.0)
            for job in [j for j in running if j.process.poll() is not None]:
                running.remove(job)
                job.seconds = time.monotonic() - job.started
                if job.process.returncode != 0:
                    raise _failure(job)
                _say(progress, f"finished {job.name} in {job.seconds / 60:.1f} min")
            if running and time.monotonic() - last_print >= every:
                last_print = time.monotonic()
                _say(progress, "running: " + _status(running))
    finally:
        for job in running:
            if job.process.poll() is None:
                job.process.terminate()
                job.process.wait()


def _say(progress: bool, text: str) -> None:
    if progress:
        print(f"[ablation {time.strftime('%H:%M:%S')}] {text}", flush=True)


# ---------------------------------------------------------------- the phases
def finished(path: Path, steps: int) -> bool:
    latest = latest_checkpoint(path)
    return latest is not None and int(latest.stem.split("-")[1]) >= steps


def pretrain_evaluator(opts: AblationOptions, timings: dict) -> None:
    out = run_dir(opts, "dual")
    steps = opts.dual_steps or pretrain_preset(opts.preset).run.steps
    if finished(out, steps) and (out / DUAL_ENCODER_FILE).is_file():
        _say(opts.progress, f"evaluator: reusing {out}")
        return
    job = Job("dual encoder", pretrain_command(opts), Path(opts.out) / "logs" / "dual.log",
              opts.threads * opts.jobs, out / "metrics.jsonl", steps)
    run_jobs([job], 1, opts.progress)
    _add(timings["runs"], "dual", job.seconds)
    _add(timings["phases"], "evaluator", job.seconds)


def train_variants(opts: AblationOptions, timings: dict) -> None:
    jobs = []
    for variant in opts.variants:
        steps = train_config(opts, variant).run.steps
        if finished(run_dir(opts, variant), steps):
            _say(opts.progress, f"{variant}: reusing the finished run in {run_dir(opts, variant)}")
            continue
        jobs.append(Job(variant, train_command(opts, variant), Path(opts.out) / "logs" / f"{variant}.log",
                        opts.threads, run_dir(opts, variant) / "metrics.jsonl", steps))
    # Longest first (a label-guided run passes two captions per image through G and D): the
    # parallel slots then finish together instead of one long run ending alone.
    jobs.sort(key=lambda job: -relative_cost(opts, job.name))
    start = time.monotonic()
    run_jobs(jobs, opts.jobs, opts.progress)
    _add(timings["phases"], "training", time.monotonic() - start if jobs else 0.0)
    for job in jobs:
        _add(timings["runs"], job.name, job.seconds)


def relative_cost(opts: AblationOptions, variant: str) -> float:
    cfg = train_config(opts, variant)
    return cfg.run.steps * (2.0 if cfg.loss.supcon else 1.0)


def evaluate_variants(opts: AblationOptions, timings: dict) -> dict:
    jobs = [Job(f"eval {v}", eval_command(opts, v), Path(opts.out) / "logs" / f"eval-{v}.log",
                opts.threads) for v in opts.variants]
    start = time.monotonic()
    run_jobs(jobs, opts.jobs, opts.progress)
    timings["phases"]["evaluation"] = time.monotonic() - start  # every invocation evaluates anew
    return {v: json.loads((run_dir(opts, v) / "eval" / "metrics.json").read_text())
            for v in opts.variants}


def _add(totals: dict, key: str, seconds: float) -> None:
    totals[key] = totals.get(key, 0.0) + seconds


def load_timings(opts: AblationOptions) -> dict:
    """Seconds spent so far: ``runs`` (each subprocess, summed over resumptions) and ``phases``
    (wall clock of the evaluator, training and evaluation phases; runs overlap within a phase)."""
    path = Path(opts.out) / "timings.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    return {"runs": saved.get("runs", {}), "phases": saved.get("phases", {})}


def save_timings(opts: AblationOptions, timings: dict) -> None:
    atomic_write_text(json.dumps(timings, indent=2) + "\n", Path(opts.out) / "timings.json")


def run_ablation(opts: AblationOptions) -> Path:
    """All four phases; returns the report's path."""
    for variant in opts.variants:  # bad overrides fail here, before any training
        train_config(opts, variant)
    Path(opts.out).mkdir(parents=True, exist_ok=True)
    timings = load_timings(opts)
    try:
        pretrain_evaluator(opts, timings)
        train_variants(opts, timings)
    finally:
        save_timings(opts, timings)
    metrics = evaluate_variants(opts, timings)
    save_timings(opts, timings)
    from fastxmc.experiments.report import write_report

    return write_report(opts, metrics, timings)


def machine_description() -> str:
    return f"{platform.machine()}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}"


